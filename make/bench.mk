# Benchmarks. Included by the top-level Makefile.

.PHONY: bench bench-smoke bench-scale

bench: ## Benchmark direct vs passthrough vs terminate vs a floor of two TCP forwarders, and the scale-out case (~11 min on 2 cores); writes docs/bench-results.md
	go run ./bench/cmd/spectro-bench -out docs/bench-results.md

bench-smoke: ## The short benchmark CI runs inside `make test` (checks bytes arrive intact, no timings)
	go test -count=1 -run TestSmoke ./bench

bench-scale: ## Only the scale-out case: 10,000 idle tunnels over 3 relay replicas on etcd, a replica killed (~2 min); updates its rows and section of docs/bench-results.md
	go run ./bench/cmd/spectro-bench -scale-only -out docs/bench-results.md
