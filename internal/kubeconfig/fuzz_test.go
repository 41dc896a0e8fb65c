package kubeconfig

import (
	"bytes"
	"strings"
	"testing"

	"k8s.io/client-go/tools/clientcmd"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// FuzzRewrite rewrites arbitrary kubeconfigs (users hand in their own with
// --from) with arbitrary subdomains and connect addresses. Whatever the
// input, the result either is an error or a valid kubeconfig whose current
// context reaches exactly the relay: TLS verified, no proxy, the relay's
// CA in terminate mode.
func FuzzRewrite(f *testing.F) {
	f.Add([]byte(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://10.0.0.1:6443", certificate-authority-data: Y2E=, insecure-skip-tls-verify: true, proxy-url: "http://p:3128"}
users:
- name: u
  user: {token: t}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
`), "cluster-abc", "", false)
	f.Add([]byte("current-context: x\ncontexts:\n- name: x\n  context: {cluster: missing}\n"), "cluster-abc", "127.0.0.1:8443", true)
	f.Add([]byte("{}"), "a", "", false)
	f.Add([]byte("clusters: [{name: c, cluster: {certificate-authority: ca.crt}}]\ncontexts: [{name: x, context: {cluster: c}}]\ncurrent-context: x"), "b", "", true)
	f.Add([]byte("\x00\xff"), "Bad.Label", "no-port", false)
	f.Fuzz(func(t *testing.T, from []byte, subdomain, connect string, terminate bool) {
		mode := tunnel.Passthrough
		if terminate {
			mode = tunnel.Terminate
		}
		o := Options{Mode: mode, Server: "proxy.test", Port: 443, Subdomain: subdomain, Connect: connect,
			CAPEM: []byte(caPEM), BearerToken: "tok"}
		out, err := Rewrite(from, o)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		cfg, err := clientcmd.Load(out)
		if err != nil {
			t.Fatalf("output does not load: %v\n%s", err, out)
		}
		ctx := cfg.Contexts[cfg.CurrentContext]
		if ctx == nil || cfg.Clusters[ctx.Cluster] == nil {
			t.Fatalf("output has no usable current context:\n%s", out)
		}
		cl := cfg.Clusters[ctx.Cluster]
		want := "https://" + o.Host() + ":443"
		if connect != "" {
			want = "https://" + connect
		}
		if cl.Server != want || cl.InsecureSkipTLSVerify || cl.ProxyURL != "" {
			t.Fatalf("cluster %+v does not reach exactly %s with TLS verified", cl, want)
		}
		if connect != "" && cl.TLSServerName != o.Host() {
			t.Fatalf("tls-server-name %q, want %q", cl.TLSServerName, o.Host())
		}
		if terminate && !bytes.Equal(cl.CertificateAuthorityData, []byte(caPEM)) {
			t.Fatal("terminate mode must trust the relay's CA")
		}
		if strings.Contains(cl.Server, "10.0.0.1") {
			t.Fatal("the direct address survived")
		}
	})
}
