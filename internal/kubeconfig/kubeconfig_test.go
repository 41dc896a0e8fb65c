package kubeconfig

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const caPEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

func adminKubeconfig(t *testing.T) []byte {
	t.Helper()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.crt")
	require.NoError(t, os.WriteFile(ca, []byte(caPEM), 0o600))
	return []byte(`apiVersion: v1
kind: Config
clusters:
- name: direct
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority: ` + ca + `
users:
- name: admin
  user:
    client-certificate-data: Y2VydA==
    client-key-data: a2V5
contexts:
- name: admin@direct
  context: {cluster: direct, user: admin, namespace: team}
current-context: admin@direct
`)
}

func TestRewritePassthroughKeepsCredentials(t *testing.T) {
	out, err := Rewrite(adminKubeconfig(t), Options{Mode: tunnel.Passthrough, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc"})
	require.NoError(t, err)
	cfg, err := clientcmd.Load(out)
	require.NoError(t, err)
	ctx := cfg.Contexts[cfg.CurrentContext]
	require.NotNil(t, ctx)
	assert.Equal(t, "cluster-abc", cfg.CurrentContext)
	assert.Equal(t, "admin", ctx.AuthInfo, "the user's client certificate is kept")
	assert.Equal(t, "team", ctx.Namespace)
	cl := cfg.Clusters[ctx.Cluster]
	assert.Equal(t, "https://cluster-abc.proxy.example.com:443", cl.Server)
	assert.Equal(t, caPEM, string(cl.CertificateAuthorityData), "cluster CA inlined, not left as a path")
	assert.Empty(t, cl.TLSServerName)
	assert.Equal(t, "https://10.0.0.1:6443", cfg.Clusters["direct"].Server, "the original context is kept")
}

func TestRewriteTerminateUsesRelayCAAndToken(t *testing.T) {
	out, err := Rewrite(adminKubeconfig(t), Options{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 8443,
		Subdomain: "cluster-abc", Connect: "127.0.0.1:8443", CAPEM: []byte("relay-ca"), BearerToken: "sa-token"})
	require.NoError(t, err)
	cfg, err := clientcmd.Load(out)
	require.NoError(t, err)
	ctx := cfg.Contexts[cfg.CurrentContext]
	cl := cfg.Clusters[ctx.Cluster]
	assert.Equal(t, "https://127.0.0.1:8443", cl.Server)
	assert.Equal(t, "cluster-abc.proxy.example.com", cl.TLSServerName, "SNI without DNS")
	assert.Equal(t, "relay-ca", string(cl.CertificateAuthorityData))
	assert.Equal(t, "sa-token", cfg.AuthInfos[ctx.AuthInfo].Token)
}

func TestNew(t *testing.T) {
	out, err := New(Options{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc", CAPEM: []byte("ca"), BearerToken: "tok"})
	require.NoError(t, err)
	cfg, err := clientcmd.Load(out)
	require.NoError(t, err)
	assert.Equal(t, "https://cluster-abc.proxy.example.com:443", cfg.Clusters["cluster-abc"].Server)
	assert.Equal(t, "tok", cfg.AuthInfos["cluster-abc"].Token)
}

func TestNewTerminateWithPublicRelayCertificate(t *testing.T) {
	out, err := New(Options{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc", BearerToken: "tok"})
	require.NoError(t, err)
	cfg, err := clientcmd.Load(out)
	require.NoError(t, err)
	assert.Empty(t, cfg.Clusters["cluster-abc"].CertificateAuthorityData, "system roots verify a public certificate")
}

func TestBadInput(t *testing.T) {
	good := Options{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc", CAPEM: []byte("ca"), BearerToken: "t"}
	tests := []struct {
		name   string
		mutate func(*Options)
		from   string
		want   string
	}{
		{"bad mode", func(o *Options) { o.Mode = "tcp" }, "", "unknown mode"},
		{"no server", func(o *Options) { o.Server = "" }, "", "server (the relay's domain) is required"},
		{"bad subdomain", func(o *Options) { o.Subdomain = "a.b" }, "", "subdomain"},
		{"port", func(o *Options) { o.Port = 70000 }, "", "out of range"},
		{"server not a DNS name", func(o *Options) { o.Server = "proxy example.com" }, "", `server: domain "proxy example.com"`},
		{"connect", func(o *Options) { o.Connect = "nohost" }, "", "want host:port"},
		{"connect without host", func(o *Options) { o.Connect = ":8443" }, "", "neither an IP address nor a DNS name"},
		{"connect host not UTF-8", func(o *Options) { o.Connect = "\xff:8443" }, "", "neither an IP address nor a DNS name"},
		{"connect port not a number", func(o *Options) { o.Connect = "127.0.0.1:https" }, "", `port "https" must be a number 1-65535`},
		{"connect port out of range", func(o *Options) { o.Connect = "127.0.0.1:0" }, "", `port "0" must be a number`},
		{"passthrough without cluster CA", func(o *Options) { o.CAPEM, o.Mode = nil, tunnel.Passthrough }, "", "needs the cluster CA"},
		{"terminate without token", func(o *Options) { o.BearerToken = "" }, "", "needs a bearer token"},
		{"not a kubeconfig", nil, "{{{", "parsing kubeconfig"},
		{"no current context", nil, "apiVersion: v1\nkind: Config\n", "no current context"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := good
			if tc.mutate != nil {
				tc.mutate(&o)
			}
			var err error
			if tc.from != "" {
				_, err = Rewrite([]byte(tc.from), o)
			} else {
				_, err = New(o)
			}
			require.ErrorContains(t, err, tc.want)
		})
	}
}
