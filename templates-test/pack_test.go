package chart_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"image/png"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/spectroproxy/spectro-proxy/internal/pack"
)

// The tests here do with a pack what the platform does for a cluster: read
// the pack directory, resolve the {{ .spectro.system.* }} macros of its
// values.yaml as text from the cluster's system values, take
// charts.spectro-proxy as the chart's values (its spectro.system block
// carries the token, port and relay CA the platform resolved), apply the
// cluster's overrides, and render the chart tarball that pack.json names,
// into the namespace of pack.namespace.

// packInstall is one pack version prepared for one cluster.
type packInstall struct {
	version   string
	namespace string       // pack.namespace, resolved: the release namespace
	chart     *chart.Chart // the tarball named in pack.json
	values    map[string]any
}

// resolveMacros is the platform's macro resolution (internal/pack).
var resolveMacros = pack.ResolveMacros

// sampleSystem is the sample cluster's spectro.system.
func sampleSystem(t *testing.T) map[string]any {
	return sampleCluster(t)["spectro"].(map[string]any)["system"].(map[string]any)
}

// preparePack does what the platform does with pack version for a cluster
// whose system values are system, with the cluster's overrides
// (pack.Prepare).
func preparePack(t *testing.T, version string, system map[string]any, overrides ...map[string]any) packInstall {
	t.Helper()
	p, err := pack.Prepare(packDir(version), system, overrides...)
	require.NoError(t, err)
	return packInstall{version: p.Version, namespace: p.Namespace, chart: p.Chart, values: p.Values}
}

func (p packInstall) render(t *testing.T) (map[string]string, error) {
	t.Helper()
	return renderChart(t, p.chart, p.values, renderOpts{namespace: p.namespace})
}

func (p packInstall) mustRender(t *testing.T) manifest {
	t.Helper()
	out, err := p.render(t)
	require.NoError(t, err)
	return parse(t, out)
}

// Each pack directory is what a pack registry takes.
func TestPackLayout(t *testing.T) {
	documented := map[string][]string{
		"1.0.0": {"clusterUid", "namespace", "server", "subdomain"},
	}
	documented["1.1.0"] = append(documented["1.0.0"][:4:4], "k8sDashboardIntegration.enabled", "k8sDashboardIntegration.useInsecurePort")
	documented["1.2.0"] = documented["1.1.0"]
	documented["1.3.0"] = append(documented["1.1.0"][:6:6], "vmDashboardIntegration.enabled")
	for _, d := range documented {
		sort.Strings(d)
	}
	later := []string{"k8sDashboardIntegration", "vmDashboardIntegration", "vmwareDashboard"}
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			p, err := pack.Load(packDir(v))
			require.NoError(t, err)
			assert.Equal(t, "spectro-proxy", p.Meta.Name)
			assert.Equal(t, v, p.Meta.Version)
			assert.Equal(t, "addon", p.Meta.Layer)
			assert.Equal(t, []string{"all"}, p.Meta.CloudTypes)
			assert.Equal(t, []string{"charts/spectro-proxy-" + v + ".tgz"}, p.Meta.Charts)
			ch, err := p.LoadChart()
			require.NoError(t, err)
			assert.Equal(t, "spectro-proxy", ch.Metadata.Name)
			assert.Equal(t, v, ch.Metadata.Version)
			assert.Equal(t, v, ch.Metadata.AppVersion)

			// values.yaml: the pack section, then exactly the documented
			// parameters with the documented defaults.
			assert.True(t, bytes.HasPrefix(bytes.TrimLeft(stripComments(p.Values), "\n"), []byte("pack:\n")), "values.yaml starts with pack:")
			pv, err := pack.ParseValues(p.Values)
			require.NoError(t, err)
			assert.Equal(t, "cluster-{{ .spectro.system.cluster.uid }}", pv.Pack.Namespace)
			require.Len(t, pv.Pack.Content.Images, 1)
			assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:"+v, pv.Pack.Content.Images[0].Image)
			assert.Equal(t, []string{"spectro-proxy"}, sortedKeys(toAny(pv.Charts)))
			vals := packValues(t, v)
			assert.Equal(t, map[string]any{"system": map[string]any{"reverseproxy": map[string]any{
				"token":  "{{ .spectro.system.reverseproxy.token }}",
				"port":   "{{ .spectro.system.reverseproxy.port }}",
				"caCert": "{{ .spectro.system.reverseproxy.caCert }}",
			}}}, vals["spectro"], "values.yaml passes the platform's per-cluster settings on, and nothing else of spectro")
			params := cloneMap(vals)
			delete(params, "spectro")
			assert.Equal(t, documented[v], leafPaths(params, ""))
			assert.Equal(t, "cluster-{{ .spectro.system.cluster.uid }}", vals["namespace"])
			assert.Equal(t, "{{ .spectro.system.reverseproxy.server }}", vals["server"])
			assert.Equal(t, "{{ .spectro.system.cluster.uid }}", vals["clusterUid"])
			assert.Equal(t, "cluster-{{ .spectro.system.cluster.uid }}", vals["subdomain"])
			for _, path := range documented[v] {
				if strings.Contains(path, ".") {
					assert.Equal(t, false, dig(vals, path), path)
				}
			}

			// README: the version's parameters, none of later versions'.
			readme, err := os.ReadFile(filepath.Join(packDir(v), "README.md"))
			require.NoError(t, err)
			assert.Contains(t, string(readme), "# Spectro Proxy "+v+"\n")
			for _, path := range documented[v] {
				assert.Contains(t, string(readme), "| `"+path+"`", "README documents %s", path)
			}
			for _, k := range later {
				if !strings.Contains(strings.Join(documented[v], " "), k) {
					assert.NotContains(t, string(readme), "| `"+k, "README of %s documents %s", v, k)
				}
			}
			assert.Contains(t, string(readme), "use it as is")

			logo, err := os.ReadFile(filepath.Join(packDir(v), "logo.png"))
			require.NoError(t, err)
			img, err := png.Decode(bytes.NewReader(logo))
			require.NoError(t, err)
			assert.Equal(t, img.Bounds().Dx(), img.Bounds().Dy(), "square logo")
		})
	}
}

// Each tarball is the chart source packaged as its version (`make packs`),
// compared file by file: they cannot drift.
func TestPackTarballsAreTheChartSource(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			p, err := pack.Load(packDir(v))
			require.NoError(t, err)
			got, err := p.LoadChart()
			require.NoError(t, err)
			want, err := pack.Build(agentChart, v)
			require.NoError(t, err)
			assert.Empty(t, pack.Diff(want, got), "%s differs from %s as %s: run `make packs`", p.ChartPath(), agentChart, v)
			assert.Contains(t, got.Metadata.Annotations["artifacthub.io/images"], "spectro-proxy-client:"+v+"\n")
		})
	}
	// The comparison can fail.
	want, err := pack.Build(agentChart, "1.3.0")
	require.NoError(t, err)
	other, err := pack.Build(agentChart, "1.2.0")
	require.NoError(t, err)
	other.Templates[0].Data = append(other.Templates[0].Data, '\n')
	diff := pack.Diff(want, other)
	require.Len(t, diff, 2)
	assert.Contains(t, diff[0], "Chart.yaml differs")
	assert.Equal(t, other.Templates[0].Name+": content differs", diff[1])
}

// The unedited pack of each version, as the platform renders it for the
// sample cluster: golden files (`go test ./templates-test/ -update`).
func TestPackGolden(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			out, err := preparePack(t, v, sampleSystem(t)).render(t)
			require.NoError(t, err)
			assertGolden(t, "pack-"+v, goldenText(out))
		})
	}
}

func TestPackUnedited(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			p := preparePack(t, v, sampleSystem(t))
			assert.Equal(t, sampleNS, p.namespace)
			m := p.mustRender(t)
			d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
			assert.Equal(t, sampleNS, d.Namespace)
			c := d.Spec.Template.Spec.Containers[0]
			assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:"+v, c.Image, "the image pack.content.images lists")
			assert.Contains(t, c.Args, "--mode=auto")
			assert.Contains(t, c.Args, "--server="+sampleServer)
			assert.Contains(t, c.Args, "--subdomain=cluster-"+sampleUID)
			assert.Contains(t, c.Args, "--kubeconfig-configmap=spectro-proxy-kubeconfig")
			for _, k := range m.kinds() {
				assert.NotRegexp(t, "^Namespace/", k, "the platform creates the pack namespace")
			}
			assert.Contains(t, m.notes, "Spectro Proxy agent "+v+" installed")
		})
	}
}

// A parameter of a later version is refused, naming the version that
// introduced it; in that version and later it works.
func TestPackLaterParametersRefused(t *testing.T) {
	params := []struct{ values, since, arg string }{
		{"k8sDashboardIntegration: {enabled: true}", "1.1.0", "--k8s-dashboard-url=https://"},
		{"k8sDashboardIntegration: {enabled: true, useInsecurePort: true}", "1.1.0", "--k8s-dashboard-url=http://"},
		{"k8sDashboardIntegration: {useInsecurePort: true}", "1.1.0", ""},
		{"vmDashboardIntegration: {enabled: true}", "1.3.0", "--vm-dashboard-url="},
		{"vmwareDashboard: {enabled: true}", "1.3.0", "--vm-dashboard-url="},
	}
	for _, p := range params {
		name := regexp.MustCompile(`^(\w+): \{(\w+)`).FindStringSubmatch(p.values)
		param := name[1] + "." + name[2]
		for _, v := range packVersions {
			t.Run(v+" "+p.values, func(t *testing.T) {
				out, err := preparePack(t, v, sampleSystem(t), vals(t, p.values)).render(t)
				if v < p.since {
					require.Error(t, err)
					assert.Contains(t, err.Error(), fmt.Sprintf(
						"spectro-proxy %s: %s is a parameter of pack %s and later, not of %s: use pack %s or later, or remove it",
						v, param, p.since, v, p.since))
					return
				}
				require.NoError(t, err)
				if p.arg != "" {
					args := strings.Join(agentArgs(t, parse(t, out)), " ")
					assert.Contains(t, args, p.arg)
				}
			})
		}
	}
}

// Per-cluster overrides win over the pack's values and the chart's defaults.
func TestPackOverridesWin(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			m := preparePack(t, v, sampleSystem(t), vals(t, `
server: relay.internal.example
subdomain: edge-1
mode: terminate
replicas: 1
proxy: {httpsProxy: "http://proxy.corp:3128"}
token: {value: spx1.override}
`)).mustRender(t)
			d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
			c := d.Spec.Template.Spec.Containers[0]
			assert.Contains(t, c.Args, "--server=relay.internal.example")
			assert.Contains(t, c.Args, "--subdomain=edge-1")
			assert.Contains(t, c.Args, "--mode=terminate")
			assert.Equal(t, int32(1), *d.Spec.Replicas)
			assert.Contains(t, m.objects["Secret/spectro-proxy-proxy"], "HTTPS_PROXY: \"aHR0cDovL3Byb3h5LmNvcnA6MzEyOA==\"")
			assert.Contains(t, c.Env, corev1.EnvVar{Name: "HTTPS_PROXY", ValueFrom: &corev1.EnvVarSource{
				SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "spectro-proxy-proxy"}, Key: "HTTPS_PROXY"}}})
			assert.Contains(t, m.objects["Secret/spectro-proxy-agent-token"], "c3B4MS5vdmVycmlkZQ==", "token.value wins over the system token")
		})
	}
}

// The platform's own macro resolution: the pack's values resolve fully; a
// key the cluster lacks becomes "<no value>"; any other macro is an error.
func TestPackMacros(t *testing.T) {
	out, err := resolveMacros(`a: "{{ .spectro.system.cluster.uid }}-{{.spectro.system.reverseproxy.port}}"`, sampleSystem(t))
	require.NoError(t, err)
	assert.Equal(t, `a: "`+sampleUID+`-443"`, out)
	out, err = resolveMacros(`a: "{{ .spectro.system.cluster.nickname }}"`, sampleSystem(t))
	require.NoError(t, err)
	assert.Equal(t, `a: "<no value>"`, out, "a key the cluster lacks prints as Go templates print it")
	_, err = resolveMacros(`a: "{{ .Values.token }}"`, sampleSystem(t))
	assert.EqualError(t, err, "unknown macro {{ .Values.token }}")
	for _, v := range packVersions {
		p := preparePack(t, v, sampleSystem(t))
		y, err := chartutil.Values(p.values).YAML()
		require.NoError(t, err)
		assert.NotContains(t, y, "{{", v)
	}
}

// What the platform provides per cluster reaches the agent through the
// pack's values.yaml alone: the token, the port and a private relay CA, the
// PEM even when its line breaks were folded by the one-line substitution.
// Without a token the install fails naming both ways to give one.
func TestPackSystemValues(t *testing.T) {
	caPEM := testCAPEM(t)
	withSystem := func(edit func(rp map[string]any)) map[string]any {
		sys := cloneMap(sampleSystem(t))
		rp := cloneMap(sys["reverseproxy"].(map[string]any))
		edit(rp)
		sys["reverseproxy"] = rp
		return sys
	}
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			m := preparePack(t, v, withSystem(func(rp map[string]any) {
				rp["port"] = 8443
				rp["caCert"] = caPEM
			})).mustRender(t)
			args := agentArgs(t, m)
			assert.Contains(t, args, "--port=8443")
			assert.Contains(t, args, "--relay-ca-file=/etc/spectro-proxy/relay-ca/ca.crt")
			sec := decode[corev1.Secret](t, m, "Secret/spectro-proxy-agent-token")
			assert.Equal(t, sampleToken, string(sec.Data["token"]), "the system token")
			cm := decode[corev1.ConfigMap](t, m, "ConfigMap/spectro-proxy-relay-ca")
			assertOneCert(t, cm.Data["ca.crt"])

			// Without a caCert the platform prints <no value>: no CA, system roots.
			m = preparePack(t, v, withSystem(func(rp map[string]any) {})).mustRender(t)
			assert.NotContains(t, agentArgs(t, m), "--relay-ca-file=/etc/spectro-proxy/relay-ca/ca.crt")
			assert.Contains(t, agentArgs(t, m), "--port=443")

			_, err := preparePack(t, v, withSystem(func(rp map[string]any) { delete(rp, "token") })).render(t)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "no tunnel token: set spectro.system.reverseproxy.token")
			assert.Contains(t, err.Error(), "create the Secret spectro-proxy-token")
		})
	}
	t.Run("folded PEM", func(t *testing.T) {
		folded := strings.Join(strings.Fields(caPEM), " ")
		m := renderPack(t, "1.3.0", map[string]any{"spectro": map[string]any{"system": map[string]any{"reverseproxy": map[string]any{"caCert": folded}}}})
		assertOneCert(t, decode[corev1.ConfigMap](t, m, "ConfigMap/spectro-proxy-relay-ca").Data["ca.crt"])
	})
	// Plain Helm with the pack's values.yaml as it is: the macros in its
	// spectro.system block stay text, count as unset, and --set wins.
	t.Run("plain helm with the unresolved pack values", func(t *testing.T) {
		m := renderPack(t, "1.3.0", sampleCluster(t))
		assert.Contains(t, agentArgs(t, m), "--port=443")
		sec := decode[corev1.Secret](t, m, "Secret/spectro-proxy-agent-token")
		assert.Equal(t, sampleToken, string(sec.Data["token"]))
		_, err := render(t, agentChart, merge(packValues(t, "1.3.0"), vals(t, `spectro: {system: {cluster: {uid: abc}, reverseproxy: {server: proxy.example.com}}}`)), renderOpts{namespace: "cluster-abc"})
		require.Error(t, err)
		assert.Contains(t, err.Error(), "no tunnel token", "an unresolved token macro is not a token")
	})
}

func testCAPEM(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "relay CA"}, IsCA: true,
		BasicConstraintsValid: true, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func assertOneCert(t *testing.T, s string) {
	t.Helper()
	block, rest := pem.Decode([]byte(s))
	require.NotNil(t, block, "a PEM block in %q", s)
	_, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	assert.Empty(t, strings.TrimSpace(string(rest)))
}

func stripComments(b []byte) []byte {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			out = append(out, l)
		}
	}
	return []byte(strings.Join(out, "\n"))
}

// leafPaths lists the dotted paths of the leaves of m, sorted.
func leafPaths(m map[string]any, prefix string) []string {
	var out []string
	for _, k := range sortedKeys(m) {
		if sub, ok := m[k].(map[string]any); ok {
			out = append(out, leafPaths(sub, prefix+k+".")...)
			continue
		}
		out = append(out, prefix+k)
	}
	return out
}

func dig(m map[string]any, path string) any {
	var cur any = m
	for _, seg := range strings.Split(path, ".") {
		cur = cur.(map[string]any)[seg]
	}
	return cur
}

func toAny[V any](m map[string]V) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// The pack files are what `make packs` writes now: pack.json, values.yaml,
// README.md and logo.png byte for byte, the tarball by content.
func TestPacksUpToDate(t *testing.T) {
	if testing.Short() {
		t.Skip("builds hack/mkpack")
	}
	out := t.TempDir()
	cmd := exec.Command("go", "run", "../hack/mkpack", "-chart", agentChart, "-out", out)
	b, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", b)
	for _, v := range packVersions {
		for _, f := range []string{"pack.json", "values.yaml", "README.md", "logo.png"} {
			want, err := os.ReadFile(filepath.Join(out, v, f))
			require.NoError(t, err)
			got, err := os.ReadFile(filepath.Join(packDir(v), f))
			require.NoError(t, err)
			assert.Equal(t, string(want), string(got), "%s/%s is not what make packs writes: run `make packs`", v, f)
		}
	}
}

// helm lint --strict of each pack's chart tarball with the values the
// platform gives it.
func TestPackLint(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			p := preparePack(t, v, sampleSystem(t))
			dir := t.TempDir()
			require.NoError(t, chartutil.SaveDir(p.chart, dir))
			lintClean(t, filepath.Join(dir, "spectro-proxy"), p.values)
		})
	}
}
