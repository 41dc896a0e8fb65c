# Top-level Makefile: every make/*.mk contributes its own targets.
include make/*.mk
