package testcluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
)

// Everything uses ECDSA P-256 (internal/pki): key generation is instant
// (RSA-2048 would add a second or two to every start), and kube-apiserver,
// etcd and kwok all accept it, including as the service-account signing key
// (ES256).

// pkiFiles are the paths written by writePKI, all under Dir/pki.
type pkiFiles struct {
	caCert, caKey                        string
	apiserverCert, apiserverKey          string
	adminCert, adminKey                  string
	kubeletClientCert, kubeletClientKey  string // kube-apiserver -> kwok (kubelet API)
	kwokClientCert, kwokClientKey        string // kwok -> kube-apiserver
	kwokServingCert, kwokServingKey      string // kwok's kubelet endpoint
	serviceAccountKey, serviceAccountPub string
	tokenAuth                            string
	// node holds the real node's certificates (RealNode only), by
	// component: "kubelet" (serving), "kubelet-client", "kube-proxy",
	// "kube-controller-manager", "kube-scheduler".
	node map[string]certKey
}

type certKey struct{ cert, key string }

// writePKI generates the CA and every certificate the cluster needs and
// writes them to dir. It returns the file paths and the CA certificate.
// nodeIP is set for a real node: the API server's certificate gets it, and
// the node's components get their own certificates.
func writePKI(dir string, sans []string, nodeName, nodeIP, adminToken string) (*pkiFiles, []byte, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	p := func(name string) string { return filepath.Join(dir, name) }
	f := &pkiFiles{
		caCert: p("ca.crt"), caKey: p("ca.key"),
		apiserverCert: p("apiserver.crt"), apiserverKey: p("apiserver.key"),
		adminCert: p("admin.crt"), adminKey: p("admin.key"),
		kubeletClientCert: p("apiserver-kubelet-client.crt"), kubeletClientKey: p("apiserver-kubelet-client.key"),
		kwokClientCert: p("kwok-client.crt"), kwokClientKey: p("kwok-client.key"),
		kwokServingCert: p("kwok-serving.crt"), kwokServingKey: p("kwok-serving.key"),
		serviceAccountKey: p("service-account.key"),
		serviceAccountPub: p("service-account.pub"),
		tokenAuth:         p("tokens.csv"),
	}
	ca, err := pki.NewCA("spectro-proxy-testcluster-ca")
	if err != nil {
		return nil, nil, err
	}
	files := map[string][]byte{f.caCert: ca.CertPEM, f.caKey: ca.KeyPEM}

	apiNames := append([]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
		"kubernetes.default.svc.cluster.local", "127.0.0.1", "::1", serviceIP}, sans...)
	if nodeIP != "" {
		apiNames = append(apiNames, nodeIP)
	}
	masters := []string{"system:masters"}
	leaves := []struct {
		cn        string
		names     []string
		orgs      []string
		client    bool
		cert, key string
	}{
		{"kube-apiserver", apiNames, nil, false, f.apiserverCert, f.apiserverKey},
		{AdminUser, nil, masters, true, f.adminCert, f.adminKey},
		{"kube-apiserver-kubelet-client", nil, masters, true, f.kubeletClientCert, f.kubeletClientKey},
		{"kwok-controller", nil, masters, true, f.kwokClientCert, f.kwokClientKey},
		{nodeName, []string{"localhost", nodeName, "127.0.0.1"}, nil, false, f.kwokServingCert, f.kwokServingKey},
	}
	if nodeIP != "" {
		f.node = map[string]certKey{}
		for _, n := range []struct {
			component, cn string
			names, orgs   []string
			client        bool
		}{
			{"kubelet", nodeName, []string{nodeName, nodeIP, "localhost", "127.0.0.1"}, nil, false},
			{"kubelet-client", "system:node:" + nodeName, nil, []string{"system:nodes"}, true},
			{"kube-proxy", "system:kube-proxy", nil, nil, true},
			{"kube-controller-manager", "system:kube-controller-manager", nil, nil, true},
			{"kube-scheduler", "system:kube-scheduler", nil, nil, true},
		} {
			ck := certKey{p(n.component + ".crt"), p(n.component + ".key")}
			f.node[n.component] = ck
			leaves = append(leaves, struct {
				cn        string
				names     []string
				orgs      []string
				client    bool
				cert, key string
			}{n.cn, n.names, n.orgs, n.client, ck.cert, ck.key})
		}
	}
	for _, l := range leaves {
		leaf, err := ca.Issue(l.cn, l.names, l.orgs, l.client)
		if err != nil {
			return nil, nil, err
		}
		files[l.cert], files[l.key] = leaf.CertPEM, leaf.KeyPEM
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return nil, nil, err
	}
	files[f.serviceAccountKey] = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER})
	// --service-account-key-file reads public keys (or RSA/SEC1 private
	// keys); a separate public key keeps the two flags' files obvious.
	pubDER, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, nil, err
	}
	files[f.serviceAccountPub] = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	// Static token file: token,user,uid,"group1,group2".
	files[f.tokenAuth] = fmt.Appendf(nil, "%s,%s,%s,\"system:masters\"\n", adminToken, AdminUser, AdminUser)

	for name, data := range files {
		if err := os.WriteFile(name, data, 0o600); err != nil {
			return nil, nil, err
		}
	}
	return f, ca.CertPEM, nil
}
