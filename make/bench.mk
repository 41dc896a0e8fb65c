# Benchmarks. Included by the top-level Makefile.

.PHONY: bench bench-smoke bench-scale

# REPS: repetitions (medians; the targets want at least 5, fewer is for
# iterating). BENCH_ARGS: more flags, e.g. -profile /tmp/prof (CPU and
# allocation profiles of relay and agent under small GETs), -skip bulk,watch,
# -idle-tunnels= -wan-delay 0; see go run ./bench/cmd/spectro-bench -h.
REPS ?= 5
BENCH_ARGS ?=

bench: ## Benchmark direct vs passthrough vs terminate vs floors of two TCP forwarders vs frp, and the scale-out case (~12 min on 2 cores); prints and writes issue 12's targets (ratios to the floors) to docs/bench-results.md. REPS=2 for a quick run
	go run ./bench/cmd/spectro-bench -reps $(REPS) -out docs/bench-results.md $(BENCH_ARGS)

bench-smoke: ## The short benchmark CI runs inside `make test` (checks bytes arrive intact, no timings)
	go test -count=1 -run TestSmoke ./bench

bench-scale: ## Only the scale-out case: 10,000 idle tunnels over 3 relay replicas on etcd, a replica killed (~2 min); updates its rows and section of docs/bench-results.md
	go run ./bench/cmd/spectro-bench -scale-only -out docs/bench-results.md
