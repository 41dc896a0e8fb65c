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
	$(GO) test -race -count=1 -timeout 20m ./...

# Built and exec'd rather than `go run`: go exits on SIGTERM without passing
# it on, which would leave the control plane running.
run: kube-bins ## Local API server + relay + agents; writes .run/kubeconfig-{passthrough,terminate}, prints "ready"
	$(GO) build -o .run/devrun ./hack/devrun && exec .run/devrun

lint: ## gofmt and go vet
	@test -z "$$(gofmt -l . | tee /dev/stderr)"
	$(GO) vet ./...

# Every fuzz target as package:Target. `make test` already runs each on its
# seeds and its checked-in corpus (testdata/fuzz/); this target explores.
FUZZ_TARGETS := \
	./internal/sni:FuzzServerName \
	./internal/token:FuzzVerify \
	./internal/tunnel:FuzzParseRoutes \
	./internal/tunnel:FuzzConnRead \
	./internal/kubeconfig:FuzzRewrite \
	./client:FuzzServeStream \
	./templates-test:FuzzMacroValue
FUZZTIME ?= 30s
fuzz: ## Run each fuzz target for FUZZTIME (default 30s; e.g. make fuzz FUZZTIME=10m)
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $${t#*:} in $${t%%:*} for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$${t#*:}\$$" -fuzztime $(FUZZTIME) "$${t%%:*}"; \
	done

clean: ## Remove build output and .run/
	rm -rf bin .run

include make/*.mk
