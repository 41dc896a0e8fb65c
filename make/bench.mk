# Benchmarks. Included by the top-level Makefile.

.PHONY: bench bench-smoke

bench: ## Benchmark direct vs passthrough vs terminate vs a floor of two TCP forwarders (~9 min on 2 cores); writes docs/bench-results.md
	go run ./bench/cmd/spectro-bench -out docs/bench-results.md

bench-smoke: ## The short benchmark CI runs inside `make test` (checks bytes arrive intact, no timings)
	go test -count=1 -run TestSmoke ./bench
