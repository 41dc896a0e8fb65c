package testcluster

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// certAuthority signs the cluster's certificates. Everything uses ECDSA
// P-256: key generation is instant (RSA-2048 would add a second or two to
// every start), and kube-apiserver, etcd and kwok all accept it, including as
// the service-account signing key (ES256).
type certAuthority struct {
	cert    *x509.Certificate
	key     crypto.Signer
	certPEM []byte
}

// leafSpec describes one certificate signed by the CA.
type leafSpec struct {
	commonName string
	orgs       []string
	dnsNames   []string
	ips        []net.IP
	server     bool // ExtKeyUsageServerAuth, else ClientAuth
}

func newKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serialNumber() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func newCA() (*certAuthority, []byte, error) {
	key, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "spectro-proxy-testcluster-ca"},
		NotBefore:             now.Add(-time.Hour), // tolerate clock skew between processes
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return &certAuthority{cert: cert, key: key, certPEM: certPEM}, keyPEM, nil
}

// issue returns the PEM certificate and key for spec.
func (ca *certAuthority) issue(spec leafSpec) (certPEM, keyPEM []byte, err error) {
	key, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	serial, err := serialNumber()
	if err != nil {
		return nil, nil, err
	}
	usage := x509.ExtKeyUsageClientAuth
	if spec.server {
		usage = x509.ExtKeyUsageServerAuth
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: spec.commonName, Organization: spec.orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		DNSNames:     spec.dnsNames,
		IPAddresses:  spec.ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating certificate %q: %w", spec.commonName, err)
	}
	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

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
}

// writePKI generates the CA and every certificate the cluster needs and
// writes them to dir. It returns the file paths and the CA certificate.
func writePKI(dir string, sans []string, nodeName, adminToken string) (*pkiFiles, []byte, error) {
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
	ca, caKeyPEM, err := newCA()
	if err != nil {
		return nil, nil, err
	}
	files := map[string][]byte{f.caCert: ca.certPEM, f.caKey: caKeyPEM}

	apiDNS := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
		"kubernetes.default.svc.cluster.local"}
	apiIPs := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.ParseIP(serviceIP)}
	for _, san := range sans {
		if ip := net.ParseIP(san); ip != nil {
			apiIPs = append(apiIPs, ip)
		} else {
			apiDNS = append(apiDNS, san)
		}
	}
	leaves := []struct {
		spec      leafSpec
		cert, key string
	}{
		{leafSpec{commonName: "kube-apiserver", dnsNames: apiDNS, ips: apiIPs, server: true}, f.apiserverCert, f.apiserverKey},
		{leafSpec{commonName: AdminUser, orgs: []string{"system:masters"}}, f.adminCert, f.adminKey},
		{leafSpec{commonName: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}}, f.kubeletClientCert, f.kubeletClientKey},
		{leafSpec{commonName: "kwok-controller", orgs: []string{"system:masters"}}, f.kwokClientCert, f.kwokClientKey},
		{leafSpec{commonName: nodeName, dnsNames: []string{"localhost", nodeName},
			ips: []net.IP{net.IPv4(127, 0, 0, 1)}, server: true}, f.kwokServingCert, f.kwokServingKey},
	}
	for _, l := range leaves {
		c, k, err := ca.issue(l.spec)
		if err != nil {
			return nil, nil, err
		}
		files[l.cert], files[l.key] = c, k
	}

	saKey, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	if files[f.serviceAccountKey], err = encodeKey(saKey); err != nil {
		return nil, nil, err
	}
	// --service-account-key-file reads public keys (or RSA/SEC1 private
	// keys, but not PKCS#8 ones).
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
	return f, ca.certPEM, nil
}
