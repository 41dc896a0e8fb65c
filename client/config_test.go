package client

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConfigValidate(t *testing.T) {
	good := func() Config {
		return Config{Server: "proxy.example.com", ClusterUID: "abc", APIServer: "https://10.96.0.1:443", AgentID: "pod-1"}
	}
	c := good().WithDefaults()
	require.NoError(t, c.Validate())
	assert.Equal(t, "cluster-abc", c.Subdomain, "subdomain defaults from the uid")
	assert.Equal(t, 443, c.Port)
	assert.Equal(t, "auto", string(c.Mode))

	tests := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"no server", func(c *Config) { c.Server = "" }, "server is required"},
		{"no uid", func(c *Config) { c.ClusterUID = "" }, "cluster-uid is required"},
		{"port", func(c *Config) { c.Port = 99999 }, "out of range"},
		{"subdomain not a label", func(c *Config) { c.Subdomain = "cluster.abc" }, "subdomain"},
		{"mode", func(c *Config) { c.Mode = "proxy" }, `mode: unknown mode "proxy" (want "auto", "passthrough" or "terminate")`},
		{"api server url", func(c *Config) { c.APIServer = "tcp://10.96.0.1:443" }, "want http:// or https://"},
		{"dashboard label too long", func(c *Config) {
			c.Subdomain = strings.Repeat("a", 60)
			c.K8sDashboardURL = "https://kubernetes-dashboard.kubernetes-dashboard.svc"
		}, "shorten the subdomain"},
		{"dashboard url", func(c *Config) { c.VMDashboardURL = "ftp://x" }, "vm-dashboard-url"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := good().WithDefaults()
			tc.mutate(&c)
			require.ErrorContains(t, c.Validate(), tc.want)
		})
	}
}

func TestValidateChangesNothing(t *testing.T) {
	c := Config{Server: "proxy.example.com", ClusterUID: "abc", APIServer: "https://10.96.0.1:443", AgentID: "pod-1"}
	before := c
	require.Error(t, c.Validate(), "a config without defaults lacks a port and backoff bounds")
	assert.Equal(t, before, c, "Validate must not fill in defaults")
}

func TestConfigInCluster(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
	t.Setenv("KUBERNETES_SERVICE_PORT", "443")
	t.Setenv("POD_NAME", "spectro-proxy-7d9-abc")
	c := Config{Server: "proxy.example.com", ClusterUID: "abc"}.WithDefaults()
	require.NoError(t, c.Validate())
	assert.Equal(t, "https://[fd00::1]:443", c.APIServer)
	assert.Equal(t, "spectro-proxy-7d9-abc", c.AgentID)
}
