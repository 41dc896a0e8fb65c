# Charts, packs and container images. Included by the top-level Makefile.

CHART_DIR      := charts/spectro-proxy
CHARTS         := charts/spectro-proxy charts/spectro-proxy-server
# The images the chart's default values name: ghcr.io/spectroproxy/spectro-proxy-client
# (charts/spectro-proxy) and ghcr.io/spectroproxy/spectro-proxy-server
# (charts/spectro-proxy-server), tagged with the chart's appVersion.
IMAGE_REGISTRY ?= ghcr.io/spectroproxy
IMAGE_TAG      ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' $(CHART_DIR)/Chart.yaml)
IMAGE_ARCH     ?= amd64
IMAGE_DIR      ?= bin/images

.PHONY: chart-test golden chart-lint chart-schema chart-docs packs image

chart-test: ## Chart tests: goldens, typed objects, schema, lint, helm install when a control plane is cached
	go test ./templates-test/...

golden: ## Regenerate the chart golden files (review the diff like code)
	go test ./templates-test/... -run 'Golden' -update

chart-lint: ## helm lint (Helm SDK) of both charts, with every pack version's values
	go test ./templates-test/... -run 'Lint'

chart-docs: ## Regenerate both charts' README.md from Chart.yaml, the `# --` comments of values.yaml and README.md.gotmpl
	go run ./hack/chartdoc $(CHARTS)

chart-schema: ## Copy values.schema.json into the chart (the test fails when they differ)
	cp values.schema.json $(CHART_DIR)/values.schema.json

packs: ## Packs of every documented version: packs/spectro-proxy/<v>/ with the chart tarball built from the chart source (Helm SDK)
	go run ./hack/mkpack -chart $(CHART_DIR) -out packs/spectro-proxy

image: ## OCI images of both binaries, no Docker daemon: $(IMAGE_DIR)/spectro-proxy-{client,server}.tar
	@mkdir -p $(IMAGE_DIR)/bin
	CGO_ENABLED=0 GOOS=linux GOARCH=$(IMAGE_ARCH) go build -trimpath -ldflags "-s -w" -o $(IMAGE_DIR)/bin/spectro-proxy-client ./client/cmd/spectro-proxy-client
	CGO_ENABLED=0 GOOS=linux GOARCH=$(IMAGE_ARCH) go build -trimpath -ldflags "-s -w" -o $(IMAGE_DIR)/bin/spectro-proxy-server ./server/cmd/spectro-proxy-server
	go run ./hack/mkimage -arch $(IMAGE_ARCH) -binary $(IMAGE_DIR)/bin/spectro-proxy-client \
		-ref $(IMAGE_REGISTRY)/spectro-proxy-client:$(IMAGE_TAG) -out $(IMAGE_DIR)/spectro-proxy-client.tar
	go run ./hack/mkimage -arch $(IMAGE_ARCH) -binary $(IMAGE_DIR)/bin/spectro-proxy-server \
		-ref $(IMAGE_REGISTRY)/spectro-proxy-server:$(IMAGE_TAG) -out $(IMAGE_DIR)/spectro-proxy-server.tar
