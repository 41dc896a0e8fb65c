# Spectro Proxy. `make help` lists the targets.
GO      ?= go
KUBEBIN := $(HOME)/.cache/spectro-proxy/bin

.DEFAULT_GOAL := help
.PHONY: help build test run kube-bins lint fuzz clean

help: ## List targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

build: ## Build both binaries into bin/
	$(GO) build -o bin/ ./server/cmd/spectro-proxy-server ./client/cmd/spectro-proxy-client

kube-bins: ## Build (once, cached by version in ~/.cache/spectro-proxy) etcd, kube-apiserver, kwok and the real node's parts
	bash hack/kube-bins.sh

test: kube-bins ## Run every test: unit, fuzz seeds, chart, and e2e against a real API server with kubectl
	$(GO) test -race -count=1 -timeout 30m ./...

# Built and exec'd rather than `go run`: go exits on SIGTERM without passing
# it on, which would leave the control plane running.
run: kube-bins ## Local API server + relay + agents; writes .run/kubeconfig-{passthrough,terminate}, prints "ready"
	$(GO) build -o .run/devrun ./hack/devrun && exec .run/devrun

# staticcheck, pinned: `go run` of a module version builds it once into the
# build cache, so it needs no install step and every machine runs the same.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

lint: ## Fail when gofmt or go mod tidy would change anything, go vet or staticcheck reports, or a chart README is stale
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || { echo "lint: gofmt would reformat the files above (gofmt -w .)" >&2; exit 1; }
	@$(GO) mod tidy -diff || { echo "lint: go.mod/go.sum are not tidy (go mod tidy)" >&2; exit 1; }
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	$(GO) run ./hack/chartdoc -check $(CHARTS) || { echo "lint: a chart README is stale (make chart-docs)" >&2; exit 1; }

# Every fuzz target as package:Target. `make test` already runs each on its
# seeds and its checked-in corpus (testdata/fuzz/); this target explores.
FUZZ_TARGETS := \
	./internal/sni:FuzzServerName \
	./internal/token:FuzzVerify \
	./internal/tunnel:FuzzParseRoutes \
	./internal/tunnel:FuzzConnRead \
	./internal/kubeconfig:FuzzRewrite \
	./client:FuzzServeStream \
	./internal/h2splice:FuzzRead \
	./internal/h2splice:FuzzWrite \
	./internal/h1splice:FuzzRead \
	./templates-test:FuzzMacroValue
FUZZTIME ?= 30s
# Go's fuzzing engine sometimes ends a run with "context deadline exceeded"
# when -fuzztime runs out while it waits on a worker; that is no finding
# (nothing is written to testdata/fuzz), so such a run is tried once more.
# A real finding always says "Failing input written to" and fails at once.
fuzz: ## Run each fuzz target for FUZZTIME (default 30s; e.g. make fuzz FUZZTIME=10m)
	@set -e; log=$$(mktemp); trap 'rm -f $$log' EXIT; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $${t#*:} in $${t%%:*} for $(FUZZTIME)"; \
		if $(GO) test -run '^$$' -fuzz "^$${t#*:}\$$" -fuzztime $(FUZZTIME) "$${t%%:*}" >$$log 2>&1; then cat $$log; else \
			cat $$log; \
			if grep -q 'Failing input written to' $$log || ! grep -q 'context deadline exceeded' $$log; then exit 1; fi; \
			echo "fuzz $${t#*:}: the engine timed out without a finding; once more"; \
			$(GO) test -run '^$$' -fuzz "^$${t#*:}\$$" -fuzztime $(FUZZTIME) "$${t%%:*}"; \
		fi; \
	done

clean: ## Remove build output and .run/
	rm -rf bin .run

include make/*.mk
