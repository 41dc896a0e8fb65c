package pack_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/chart"

	"github.com/spectroproxy/spectro-proxy/internal/pack"
)

func writePack(t *testing.T, packJSON string) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "pack.json"), []byte(packJSON), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "values.yaml"), []byte("pack:\n  namespace: ns\ncharts:\n  c: {a: 1}\n"), 0o644))
	return dir
}

func TestLoad(t *testing.T) {
	p, err := pack.Load(writePack(t, `{"name": "p", "version": "1.0.0", "charts": ["charts/c-1.0.0.tgz"]}`))
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(p.Dir, "charts", "c-1.0.0.tgz"), p.ChartPath())
	v, err := pack.ParseValues(p.Values)
	require.NoError(t, err)
	assert.Equal(t, "ns", v.Pack.Namespace)
	assert.Equal(t, map[string]map[string]any{"c": {"a": float64(1)}}, v.Charts)

	_, err = pack.Load(writePack(t, `{"name": "p", "charts": ["a.tgz", "b.tgz"]}`))
	assert.ErrorContains(t, err, "want exactly one chart")
	_, err = pack.Load(writePack(t, `{"name": "p", "charts": [{"name": "c", "path": "charts/c"}]}`))
	assert.ErrorContains(t, err, "cannot unmarshal object", "charts are paths, not objects")
	_, err = pack.Load(writePack(t, `{"name": "p", "charts": ["a.tgz"], "chart": "x"}`))
	assert.ErrorContains(t, err, `unknown field "chart"`)
	_, err = pack.ParseValues([]byte("pack: {}\ncharts: {}\nextra: 1\n"))
	assert.ErrorContains(t, err, `unknown field "extra"`)
}

func TestBuildAndDiff(t *testing.T) {
	want, err := pack.Build("../../charts/spectro-proxy", "1.1.0")
	require.NoError(t, err)
	assert.Equal(t, "1.1.0", want.Metadata.Version)
	assert.Equal(t, "1.1.0", want.Metadata.AppVersion)
	assert.Contains(t, want.Metadata.Annotations["artifacthub.io/images"], "spectro-proxy-client:1.1.0\n")

	same, err := pack.Build("../../charts/spectro-proxy", "1.1.0")
	require.NoError(t, err)
	assert.Empty(t, pack.Diff(want, same))

	got, err := pack.Build("../../charts/spectro-proxy", "1.1.0")
	require.NoError(t, err)
	got.Templates = got.Templates[1:]
	got.Files = append(got.Files, &chart.File{Name: "extra.txt", Data: []byte("x")})
	got.Schema = append([]byte(nil), got.Schema...)
	got.Schema[0] = ' '
	assert.Equal(t, []string{
		"extra.txt: not in the chart source",
		want.Templates[0].Name + ": missing",
		"values.schema.json: content differs",
	}, pack.Diff(want, got))
}
