// Command mkpack writes the Palette packs of the agent chart: for each
// documented pack version, packs/spectro-proxy/<version>/ with pack.json,
// values.yaml (the version's documented parameters), README.md, logo.png and
// charts/spectro-proxy-<version>.tgz, the chart source packaged with the Helm
// SDK as that version. `make packs` runs it; templates-test checks that each
// tarball still is the chart source of its version.
//
// A tarball is rewritten only when its content differs from the chart source,
// so that running mkpack twice changes nothing in git.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"log"
	"math"
	"os"
	"path/filepath"
	"text/template"

	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"

	"github.com/spectroproxy/spectro-proxy/internal/pack"
)

// version is one documented pack version and the parameters it has.
type version struct {
	Version     string
	K8sDash     bool // k8sDashboardIntegration.{enabled,useInsecurePort}: 1.1.x and later
	VMDash      bool // vmDashboardIntegration.enabled (alias vmwareDashboard.enabled): 1.3.x
	Image       string
	ChartFile   string // charts/spectro-proxy-<version>.tgz
	Description string
}

var versions = []version{
	{Version: "1.0.0", Description: "The agent: the cluster's API server through the relay."},
	{Version: "1.1.0", K8sDash: true, Description: "Adds the Kubernetes dashboard integration."},
	{Version: "1.2.0", K8sDash: true, Description: "Same parameters as 1.1.x."},
	{Version: "1.3.0", K8sDash: true, VMDash: true, Description: "Adds the VMware (VM) dashboard integration."},
}

func main() {
	chartDir := flag.String("chart", "charts/spectro-proxy", "chart source")
	out := flag.String("out", "packs/spectro-proxy", "directory of the pack versions")
	flag.Parse()
	log.SetFlags(0)
	if err := run(*chartDir, *out); err != nil {
		log.Fatalf("mkpack: %v", err)
	}
}

func run(chartDir, out string) error {
	logo, err := logoPNG()
	if err != nil {
		return err
	}
	for _, v := range versions {
		v.Image = "ghcr.io/spectroproxy/spectro-proxy-client:" + v.Version
		v.ChartFile = "charts/spectro-proxy-" + v.Version + ".tgz"
		dir := filepath.Join(out, v.Version)
		if err := os.MkdirAll(filepath.Join(dir, "charts"), 0o755); err != nil {
			return err
		}
		meta := pack.Meta{
			Name:        "spectro-proxy",
			DisplayName: "Spectro Proxy",
			Version:     v.Version,
			Layer:       "addon",
			AddonType:   "authentication",
			CloudTypes:  []string{"all"},
			Charts:      []string{v.ChartFile},
			Annotations: map[string]string{"source": "community", "contributor": "spectroproxy"},
		}
		mj, err := json.MarshalIndent(meta, "", "  ")
		if err != nil {
			return err
		}
		files := map[string][]byte{"pack.json": append(mj, '\n'), "logo.png": logo}
		for name, tmpl := range map[string]*template.Template{"values.yaml": valuesTmpl, "README.md": readmeTmpl} {
			var b bytes.Buffer
			if err := tmpl.Execute(&b, v); err != nil {
				return fmt.Errorf("%s/%s: %w", dir, name, err)
			}
			files[name] = b.Bytes()
		}
		for name, data := range files {
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
				return err
			}
		}
		if err := writeChart(chartDir, v.Version, filepath.Join(dir, v.ChartFile)); err != nil {
			return err
		}
	}
	return nil
}

// writeChart packages the chart source as version into path, unless path
// already holds that chart.
func writeChart(chartDir, version, path string) error {
	want, err := pack.Build(chartDir, version)
	if err != nil {
		return err
	}
	if got, err := loader.Load(path); err == nil && len(pack.Diff(want, got)) == 0 {
		fmt.Printf("%s: up to date\n", path)
		return nil
	}
	tmp, err := os.MkdirTemp("", "mkpack")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	saved, err := chartutil.Save(want, tmp)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(saved)
	if err != nil {
		return err
	}
	fmt.Printf("%s: written\n", path)
	return os.WriteFile(path, data, 0o644)
}

// logoPNG draws the pack logo: a tunnel (an arch) with an arrow through it,
// white on blue, 128x128.
func logoPNG() ([]byte, error) {
	const n = 128
	img := image.NewNRGBA(image.Rect(0, 0, n, n))
	bg := color.NRGBA{0x1f, 0x6f, 0xeb, 0xff}
	fg := color.NRGBA{0xff, 0xff, 0xff, 0xff}
	for y := 0; y < n; y++ {
		for x := 0; x < n; x++ {
			fx, fy := float64(x)+0.5, float64(y)+0.5
			// Rounded square background.
			if !inRoundedRect(fx, fy, n, 24) {
				continue
			}
			c := bg
			// Arch: a half ring centred at (64, 84), radii 30..40, above y=84,
			// with legs down to y=104.
			dx, dy := fx-64, fy-84
			r := math.Hypot(dx, dy)
			if (fy <= 84 && r >= 30 && r <= 40) || (fy > 84 && fy <= 104 && math.Abs(math.Abs(dx)-35) <= 5) {
				c = fg
			}
			// Arrow through the arch: shaft and head pointing right.
			if fy >= 72 && fy <= 80 && fx >= 20 && fx <= 92 {
				c = fg
			}
			if fx >= 88 && fx <= 110 && math.Abs(fy-76) <= (110-fx)*0.75 {
				c = fg
			}
			img.Set(x, y, c)
		}
	}
	var b bytes.Buffer
	err := png.Encode(&b, img)
	return b.Bytes(), err
}

func inRoundedRect(x, y float64, n, r float64) bool {
	cx := math.Max(r, math.Min(n-r, x))
	cy := math.Max(r, math.Min(n-r, y))
	return math.Hypot(x-cx, y-cy) <= r
}

var valuesTmpl = template.Must(template.New("values").Delims("[[", "]]").Parse(`# Spectro Proxy pack [[.Version]]: the agent that keeps this cluster's API
# server reachable at https://<subdomain>.<server> through the Spectro Proxy
# relay. Use it as is: the platform resolves the .spectro.system macros
# for each cluster, and the tunnel token comes from
# spectro.system.reverseproxy.token (or an existing Secret spectro-proxy-token
# in the namespace). See README.md.
pack:
  # The namespace (on the target cluster) to install the chart into. When not
  # found, it is created.
  namespace: "cluster-{{ .spectro.system.cluster.uid }}"
  content:
    images:
      - image: [[.Image]]

charts:
  spectro-proxy:
    # The Kubernetes namespace to install the Spectro Proxy into.
    namespace: "cluster-{{ .spectro.system.cluster.uid }}"
    # The relay (reverse proxy server) domain, without scheme or port.
    server: "{{ .spectro.system.reverseproxy.server }}"
    # The identifier of this cluster (the tunnel token is issued for it).
    clusterUid: "{{ .spectro.system.cluster.uid }}"
    # The DNS label of this cluster's API server under the relay domain.
    subdomain: "cluster-{{ .spectro.system.cluster.uid }}"

    # Not parameters: what the platform provides for each cluster, passed on
    # to the chart. The tunnel token, the relay's port and, for a relay whose
    # certificate is not publicly trusted, its CA (PEM). Left empty, the token
    # comes from the Secret spectro-proxy-token in the namespace.
    spectro:
      system:
        reverseproxy:
          token: "{{ .spectro.system.reverseproxy.token }}"
          port: "{{ .spectro.system.reverseproxy.port }}"
          caCert: "{{ .spectro.system.reverseproxy.caCert }}"
[[- if .K8sDash]]

    k8sDashboardIntegration:
      # Expose the Kubernetes dashboard at <subdomain>-dashboard.<server>.
      enabled: false
      # Reach the dashboard over its insecure port (HTTP, 9090) instead of HTTPS.
      useInsecurePort: false
[[- end]]
[[- if .VMDash]]

    vmDashboardIntegration:
      # Expose the VMware (VM) dashboard at <subdomain>-vmdashboard.<server>
      # (alias: vmwareDashboard.enabled).
      enabled: false
[[- end]]
`))

var readmeTmpl = template.Must(template.New("readme").Delims("[[", "]]").Parse(`# Spectro Proxy [[.Version]]

Spectro Proxy lets you reach the API server of a cluster in a private network
through a public relay: the agent this pack installs dials out to the relay
(outbound HTTPS only) and the relay serves the cluster's API server at
` + "`https://cluster-<uid>.<relay domain>`" + `. [[.Description]]

## Prerequisites

- Outbound connections to the relay's port (443 by default) are allowed, directly
  or through an HTTP proxy (set ` + "`proxy.httpsProxy`" + ` under
  ` + "`charts.spectro-proxy`" + `).
- The platform provides the cluster's system values: ` + "`spectro.system.cluster.uid`" + `,
  ` + "`spectro.system.reverseproxy.server`" + `, ` + "`spectro.system.reverseproxy.port`" + `,
  ` + "`spectro.system.reverseproxy.token`" + ` (the agent's tunnel token) and, for a relay
  whose certificate is not publicly trusted, ` + "`spectro.system.reverseproxy.caCert`" + `.
  Without a token in the system values, create the Secret ` + "`spectro-proxy-token`" + `
  (key ` + "`token`" + `) in the pack's namespace before the pack is installed; the
  install fails and names both ways when there is neither.

## Parameters

| Parameter | Description | Default |
|-----------|-------------|---------|
| ` + "`namespace`" + ` | The Kubernetes namespace to install the Spectro Proxy into. | ` + "`cluster-{{ .spectro.system.cluster.uid }}`" + ` |
| ` + "`server`" + ` | The relay (reverse proxy server) domain. | ` + "`{{ .spectro.system.reverseproxy.server }}`" + ` |
| ` + "`clusterUid`" + ` | The cluster identifier. | ` + "`{{ .spectro.system.cluster.uid }}`" + ` |
| ` + "`subdomain`" + ` | The DNS label of the cluster's API server under ` + "`server`" + `. | ` + "`cluster-{{ .spectro.system.cluster.uid }}`" + ` |
[[- if .K8sDash]]
| ` + "`k8sDashboardIntegration.enabled`" + ` | Expose the Kubernetes dashboard at ` + "`<subdomain>-dashboard.<server>`" + `. | ` + "`false`" + ` |
| ` + "`k8sDashboardIntegration.useInsecurePort`" + ` | Reach the dashboard over HTTP (port 9090) instead of HTTPS. | ` + "`false`" + ` |
[[- end]]
[[- if .VMDash]]
| ` + "`vmDashboardIntegration.enabled`" + ` (alias ` + "`vmwareDashboard.enabled`" + `) | Expose the VMware dashboard at ` + "`<subdomain>-vmdashboard.<server>`" + `. | ` + "`false`" + ` |
[[- end]]

Parameters of later pack versions are refused by this version with a message
that names the version that introduced them[[if not .VMDash]] ([[if not .K8sDash]]` + "`k8sDashboardIntegration.*`" + ` came in 1.1.0, [[end]]` + "`vmDashboardIntegration.enabled`" + ` in 1.3.0)[[end]].
Every other value of the chart (` + "`mode`" + `, ` + "`proxy.*`" + `, ` + "`networkPolicy.*`" + `,
` + "`terminate.clusterRole`" + `, ...) may be set under ` + "`charts.spectro-proxy`" + `;
see the chart's README.

## Usage

Add the pack to a cluster profile without changing anything: use it as is.
The agent runs in ` + "`mode: auto`" + `: at every start it reads the API server's
certificate and registers

- **passthrough** when the certificate lists ` + "`cluster-<uid>.<server>`" + ` as a
  subject alternative name. This is for clusters Palette deploys, where you
  control the control plane: add the SAN to the Kubernetes layer of the profile,

  ` + "```yaml" + `
  # Kubernetes (kubeadm) pack
  kubeadmconfig:
    apiServer:
      certSANs:
        - "cluster-{{ .spectro.system.cluster.uid }}.{{ .spectro.system.reverseproxy.server }}"
  # RKE2 or K3s pack
  cluster:
    config: |
      tls-san:
        - "cluster-{{ .spectro.system.cluster.uid }}.{{ .spectro.system.reverseproxy.server }}"
  ` + "```" + `

  TLS reaches the API server untouched; the kubeconfig keeps your own
  credentials, client certificates included.
- **terminate** otherwise, for imported clusters (EKS, AKS, ...) whose API server
  certificate cannot change. The relay terminates TLS with its own certificate;
  authenticate with a bearer token: your own (exec plugins such as
  ` + "`aws eks get-token`" + `, OIDC), or a short-lived token of the service account
  ` + "`spectro-proxy-kubeconfig`" + ` (bound to the ` + "`view`" + ` ClusterRole by default):

  ` + "```sh" + `
  kubectl -n cluster-<uid> create token spectro-proxy-kubeconfig --duration 8h
  ` + "```" + `

  Client certificates cannot pass a relay that terminates TLS.

After a repave that adds the SAN, the agent moves to passthrough when it
restarts. It publishes the mode it chose and the kubeconfig skeleton of the
cluster (server and CA, no credentials) in the ConfigMap
` + "`spectro-proxy-kubeconfig`" + ` of its namespace:

` + "```sh" + `
kubectl -n cluster-<uid> get configmap spectro-proxy-kubeconfig -o jsonpath='{.data.mode}'
kubectl -n cluster-<uid> get configmap spectro-proxy-kubeconfig -o jsonpath='{.data.kubeconfig}'
` + "```" + `

If the pack is added to a running cluster (Day-2), download the kubeconfig
again: one downloaded before points at the API server directly.

## Without the platform

The chart tarball installs with plain Helm; give it the pack's chart values
and the cluster's system values (the chart resolves the macros itself):

` + "```sh" + `
yq '.charts."spectro-proxy"' values.yaml > spectro-proxy-values.yaml
helm install spectro-proxy [[.ChartFile]] -n cluster-<uid> --create-namespace \
  -f spectro-proxy-values.yaml \
  --set spectro.system.cluster.uid=<uid> \
  --set spectro.system.reverseproxy.server=<relay domain> \
  --set spectro.system.reverseproxy.token=<tunnel token>
` + "```" + `
`))
