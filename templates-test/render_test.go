// Package chart_test tests the Helm charts in charts/ in-process with the Helm
// SDK: chart loader, values coalescing with schema validation, engine render
// and lint. No helm binary is needed.
//
// To update golden files, run `go test ./templates-test/ -update` (or
// `make golden`) and review the diff like code.
package chart_test

import (
	"flag"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "update golden files")

const (
	agentChart = "../charts/spectro-proxy"
	relayChart = "../charts/spectro-proxy-server"
	// releaseName and releaseNamespace are fixed so that goldens are stable.
	releaseName      = "spectro-proxy"
	releaseNamespace = "default"
	// pinnedVersion replaces the chart version and appVersion while testing,
	// so that a version bump does not churn every golden file.
	pinnedVersion = "0.0.0-test"
	// agentPinnedVersion is pinnedVersion for the agent chart source. The
	// agent chart gates parameters on its version (the pack version), so
	// its pin must be a version that has them all; the packs' own tarballs
	// carry the real versions.
	agentPinnedVersion = "1.3.99-test"
)

// loadChart loads a chart from disk, with its metadata pinned.
func loadChart(t *testing.T, dir string) *chart.Chart {
	t.Helper()
	ch, err := loader.Load(dir)
	require.NoError(t, err)
	v := pinnedVersion
	if dir == agentChart {
		v = agentPinnedVersion
	}
	ch.Metadata.Version = v
	ch.Metadata.AppVersion = v
	return ch
}

// renderOpts tunes a render.
type renderOpts struct {
	namespace string // release namespace; releaseNamespace when empty
	strict    bool   // engine.Strict: a template reading a missing value fails
}

// render runs Helm's install-time pipeline: coalesce the values with the
// chart's defaults, validate them against values.schema.json, render every
// template. It returns the rendered files by name (NOTES.txt included).
func render(t *testing.T, dir string, vals map[string]any, opts ...renderOpts) (map[string]string, error) {
	t.Helper()
	var o renderOpts
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.namespace == "" {
		o.namespace = releaseNamespace
	}
	return renderChart(t, loadChart(t, dir), vals, o)
}

// renderChart is render for a loaded chart.
func renderChart(t *testing.T, ch *chart.Chart, vals map[string]any, o renderOpts) (map[string]string, error) {
	t.Helper()
	if o.namespace == "" {
		o.namespace = releaseNamespace
	}
	rv, err := chartutil.ToRenderValuesWithSchemaValidation(ch, vals, chartutil.ReleaseOptions{
		Name:      releaseName,
		Namespace: o.namespace,
		Revision:  1,
		IsInstall: true,
	}, chartutil.DefaultCapabilities, false)
	if err != nil {
		return nil, err
	}
	return engine.Engine{Strict: o.strict}.Render(ch, rv)
}

// mustRender is render that fails the test on error.
func mustRender(t *testing.T, dir string, vals map[string]any, opts ...renderOpts) map[string]string {
	t.Helper()
	out, err := render(t, dir, vals, opts...)
	require.NoError(t, err)
	return out
}

// manifest is the rendered output: objects indexed by "Kind/name" plus NOTES.
type manifest struct {
	objects map[string]string // "Kind/name" -> YAML document
	notes   string
}

// parse splits rendered files into documents, drops empty ones and NOTES.txt
// (kept apart), and indexes the objects by "Kind/name".
func parse(t *testing.T, files map[string]string) manifest {
	t.Helper()
	m := manifest{objects: map[string]string{}}
	for name, content := range files {
		if strings.HasSuffix(name, "NOTES.txt") {
			m.notes = content
			continue
		}
		for _, doc := range releaseutil.SplitManifests(content) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			var head struct {
				Kind     string `json:"kind"`
				Metadata struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			require.NoError(t, yaml.Unmarshal([]byte(doc), &head), "%s:\n%s", name, doc)
			if head.Kind == "" {
				continue // a document made of comments only
			}
			key := head.Kind + "/" + head.Metadata.Name
			require.NotContains(t, m.objects, key, "object rendered twice")
			m.objects[key] = doc
		}
	}
	return m
}

// kinds lists the "Kind/name" keys, sorted.
func (m manifest) kinds() []string {
	keys := make([]string, 0, len(m.objects))
	for k := range m.objects {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// decode decodes the object key of m into its k8s.io/api type, rejecting
// unknown and duplicate fields.
func decode[T any](t *testing.T, m manifest, key string) *T {
	t.Helper()
	doc, ok := m.objects[key]
	require.True(t, ok, "object %s not rendered; have %v", key, m.kinds())
	obj := new(T)
	require.NoError(t, yaml.UnmarshalStrict([]byte(doc), obj), "decoding %s:\n%s", key, doc)
	return obj
}

// goldenText joins the rendered files, sorted by name, for a golden file.
func goldenText(files map[string]string) string {
	names := make([]string, 0, len(files))
	for n := range files {
		if strings.TrimSpace(files[n]) != "" {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		b.WriteString("# Source: " + n + "\n")
		b.WriteString(strings.TrimSpace(files[n]) + "\n")
		b.WriteString("---\n")
	}
	return b.String()
}

// assertGolden compares got with testdata/<name>.golden, or rewrites the file
// when -update is given.
func assertGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
		return
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err, "missing golden file; run `go test ./templates-test/ -update`")
	require.Equal(t, string(want), got, "golden file %s differs; run `go test ./templates-test/ -update` and review the diff", path)
}

// readValues reads a values file.
func readValues(t *testing.T, path string) map[string]any {
	t.Helper()
	v, err := chartutil.ReadValuesFile(path)
	require.NoError(t, err)
	return v.AsMap()
}

// merge deep-merges the maps left to right (later wins), like repeated -f.
func merge(maps ...map[string]any) map[string]any {
	out := map[string]any{}
	for _, m := range maps {
		out = chartutil.MergeTables(cloneMap(m), out)
	}
	return out
}

func cloneMap(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			v = cloneMap(sub)
		}
		out[k] = v
	}
	return out
}

// vals parses inline YAML values.
func vals(t *testing.T, y string) map[string]any {
	t.Helper()
	v, err := chartutil.ReadValues([]byte(y))
	require.NoError(t, err)
	return v.AsMap()
}

// lintClean runs Helm's linter (as `helm lint --strict` would, values schema
// included) and fails on any warning or error.
func lintClean(t *testing.T, dir string, vals map[string]any) {
	t.Helper()
	linter := lint.AllWithKubeVersionAndSchemaValidation(dir, vals, releaseNamespace, nil, false)
	for _, msg := range linter.Messages {
		assert.Less(t, msg.Severity, support.WarningSev, "%s", msg)
	}
}
