package kubeconfig

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/clientcmd"
	api "k8s.io/client-go/tools/clientcmd/api"

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

// kubeconfigWithUser is a kubeconfig whose current context's user is user
// (YAML of a user entry's body).
func kubeconfigWithUser(user string) []byte {
	return []byte(`apiVersion: v1
kind: Config
clusters:
- name: eks
  cluster:
    server: https://ABC.gr7.us-west-2.eks.amazonaws.com
    certificate-authority-data: ` + "Y2E=" + `
users:
- name: me
  user:
` + user + `
contexts:
- name: me@eks
  context: {cluster: eks, user: me}
current-context: me@eks
`)
}

func TestRewriteTerminateKeepsTokenBasedUsers(t *testing.T) {
	tests := []struct {
		name  string
		user  string
		check func(t *testing.T, u *api.AuthInfo)
	}{
		{"bearer token", "    token: abc", func(t *testing.T, u *api.AuthInfo) { assert.Equal(t, "abc", u.Token) }},
		{"token file", "    tokenFile: /var/run/token", func(t *testing.T, u *api.AuthInfo) { assert.Equal(t, "/var/run/token", u.TokenFile) }},
		{"exec plugin (aws eks get-token)", `    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: aws
      args: [eks, get-token, --cluster-name, prod]
      interactiveMode: Never`, func(t *testing.T, u *api.AuthInfo) {
			require.NotNil(t, u.Exec)
			assert.Equal(t, "aws", u.Exec.Command)
			assert.Equal(t, []string{"eks", "get-token", "--cluster-name", "prod"}, u.Exec.Args)
		}},
		{"auth provider (OIDC)", `    auth-provider:
      name: oidc
      config: {idp-issuer-url: "https://issuer.example.com", client-id: kubectl, id-token: x}`, func(t *testing.T, u *api.AuthInfo) {
			require.NotNil(t, u.AuthProvider)
			assert.Equal(t, "oidc", u.AuthProvider.Name)
		}},
		{"token next to a client certificate", "    token: abc\n    client-certificate-data: Y2VydA==\n    client-key-data: a2V5",
			func(t *testing.T, u *api.AuthInfo) { assert.Equal(t, "abc", u.Token) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := Rewrite(kubeconfigWithUser(tc.user), Options{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 443,
				Subdomain: "cluster-abc", CAPEM: []byte("relay-ca")})
			require.NoError(t, err)
			cfg, err := clientcmd.Load(out)
			require.NoError(t, err)
			ctx := cfg.Contexts[cfg.CurrentContext]
			assert.Equal(t, "me", ctx.AuthInfo, "the user's own credentials are kept")
			assert.Equal(t, "relay-ca", string(cfg.Clusters[ctx.Cluster].CertificateAuthorityData))
			tc.check(t, cfg.AuthInfos["me"])
		})
	}
}

func TestRewriteTerminateRefusesClientCertificates(t *testing.T) {
	o := Options{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc"}
	_, err := Rewrite(adminKubeconfig(t), o)
	require.EqualError(t, err, `terminate mode: user "admin" authenticates with a client certificate, which cannot pass a relay that terminates TLS `+
		`(the relay, not the API server, ends the TLS connection the certificate belongs to); use passthrough mode `+
		`(--mode passthrough, with the proxy host name in the API server certificate) or a token-based user (--user-token-file, an exec plugin, OIDC)`)

	_, err = Rewrite(kubeconfigWithUser("    {}"), o)
	require.ErrorContains(t, err, `user "me" has no token-based credentials to send through the relay; give a bearer token (--user-token-file)`)

	// A bearer token given for the new user replaces the certificate.
	o.BearerToken = "sa-token"
	_, err = Rewrite(adminKubeconfig(t), o)
	require.NoError(t, err)
}

func TestSkeletonHasNoCredentials(t *testing.T) {
	for _, o := range []Options{
		{Mode: tunnel.Passthrough, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc", CAPEM: []byte("cluster-ca")},
		{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc", CAPEM: []byte("relay-ca")},
		{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 8443, Subdomain: "cluster-abc"},
	} {
		t.Run(string(o.Mode)+"/"+string(o.CAPEM), func(t *testing.T) {
			out, err := Skeleton(o)
			require.NoError(t, err)
			cfg, err := clientcmd.Load(out)
			require.NoError(t, err)
			require.Len(t, cfg.Contexts, 1)
			require.Len(t, cfg.AuthInfos, 1)
			assert.Equal(t, api.AuthInfo{LocationOfOrigin: cfg.AuthInfos["cluster-abc"].LocationOfOrigin,
				Extensions: map[string]runtime.Object{}}, *cfg.AuthInfos["cluster-abc"], "no credentials")
			cl := cfg.Clusters["cluster-abc"]
			assert.Equal(t, o.ServerURL(), cl.Server)
			assert.Equal(t, string(o.CAPEM), string(cl.CertificateAuthorityData))
		})
	}
	_, err := Skeleton(Options{Mode: tunnel.Terminate, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc", BearerToken: "t"})
	require.ErrorContains(t, err, "carries no credentials")
	_, err = Skeleton(Options{Mode: tunnel.Passthrough, Server: "proxy.example.com", Port: 443, Subdomain: "cluster-abc"})
	require.ErrorContains(t, err, "needs the cluster CA")
}
