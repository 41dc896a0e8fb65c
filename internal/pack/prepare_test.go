package pack_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/pack"
)

func system() map[string]any {
	return map[string]any{
		"cluster":      map[string]any{"uid": "abc"},
		"reverseproxy": map[string]any{"server": "relay.example.com", "port": 443, "token": "t0k", "caCert": ""},
	}
}

func TestResolveMacros(t *testing.T) {
	out, err := pack.ResolveMacros(`a: "{{ .spectro.system.cluster.uid }}-{{.spectro.system.reverseproxy.port}}"`, system())
	require.NoError(t, err)
	assert.Equal(t, `a: "abc-443"`, out)
	out, err = pack.ResolveMacros(`a: "{{ .spectro.system.cluster.nickname }}"`, system())
	require.NoError(t, err)
	assert.Equal(t, `a: "<no value>"`, out)
	_, err = pack.ResolveMacros(`a: "{{ .Values.token }}" b: "{{ .spectro.system.x }}" c: {{ include "x" . }}`, system())
	assert.EqualError(t, err, `unknown macro {{ .Values.token }}; unknown macro {{ include "x" . }}`)
}

// The shipped packs, prepared as the platform does.
func TestPrepare(t *testing.T) {
	for _, v := range []string{"1.0.0", "1.3.0"} {
		p, err := pack.Prepare("../../packs/spectro-proxy/"+v, system(), map[string]any{"replicas": 3},
			map[string]any{"replicas": 4, "k8sDashboardIntegration": map[string]any{"enabled": true}})
		require.NoError(t, err, v)
		assert.Equal(t, v, p.Version)
		assert.Equal(t, "cluster-abc", p.Namespace)
		assert.Equal(t, []string{"ghcr.io/spectroproxy/spectro-proxy-client:" + v}, p.Images)
		assert.Equal(t, v, p.Chart.Metadata.Version, "the tarball pack.json names")
		assert.Equal(t, "relay.example.com", p.Values["server"])
		assert.Equal(t, "abc", p.Values["clusterUid"])
		assert.Equal(t, "cluster-abc", p.Values["subdomain"])
		assert.Equal(t, 4, p.Values["replicas"], "the later override wins")
		assert.Equal(t, true, p.Values["k8sDashboardIntegration"].(map[string]any)["enabled"])
		rp := p.Values["spectro"].(map[string]any)["system"].(map[string]any)["reverseproxy"].(map[string]any)
		assert.Equal(t, "t0k", rp["token"])
		assert.NotContains(t, p.Values, "pack", "only charts.spectro-proxy reaches the chart")
	}
	over := map[string]any{"a": map[string]any{"b": 1}}
	_, err := pack.Prepare("../../packs/spectro-proxy/1.3.0", system(), over)
	require.NoError(t, err)
	assert.Equal(t, map[string]any{"a": map[string]any{"b": 1}}, over, "overrides are not changed")
	_, err = pack.Prepare(t.TempDir(), system())
	assert.Error(t, err)
}
