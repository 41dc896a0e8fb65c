package peer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newCA(t *testing.T) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA("test relay CA")
	require.NoError(t, err)
	return ca
}

func identity(t *testing.T, ca *pki.CA, id string) *Identity {
	t.Helper()
	i, err := New(ca, id)
	require.NoError(t, err)
	return i
}

func TestIssue(t *testing.T) {
	ca := newCA(t)
	id := identity(t, ca, "relay-0")
	leaf := id.Cert.Leaf
	assert.Equal(t, "relay-0", leaf.Subject.CommonName)
	assert.ElementsMatch(t, []string{"relay-0", ServerName}, leaf.DNSNames)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		_, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: ServerName, KeyUsages: []x509.ExtKeyUsage{usage}})
		assert.NoError(t, err, "usage %v", usage)
	}
	assert.False(t, leaf.NotAfter.After(ca.Cert.NotAfter), "never outlives its CA")

	_, err := New(ca, "")
	assert.ErrorContains(t, err, "replica id is empty")
}

func TestLoad(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	require.NoError(t, pki.WriteFiles(dir, map[string][]byte{"ca.crt": ca.CertPEM, "ca.key": ca.KeyPEM}))
	id, err := Load(dir+"/ca.crt", dir+"/ca.key", "relay-1")
	require.NoError(t, err)
	assert.Equal(t, "relay-1", id.ID)
	_, err = Load(dir+"/nope.crt", dir+"/ca.key", "relay-1")
	assert.ErrorContains(t, err, "loading the peer CA")
}

// serve runs an HTTP server with id's peer TLS on 127.0.0.1.
func serve(t *testing.T, id *Identity, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ErrorLog: nil}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(tls.NewListener(ln, id.ServerConfig())) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return ln.Addr().String()
}

// refusal dials addr with conf and returns why the server would not
// talk: the handshake's error or, in TLS 1.3, where the server checks the
// client's certificate after the client's handshake is done, the first
// read's. Nothing is written first: through net/http the request's write
// could fail on the connection its read loop had just closed on the alert,
// and the error then said only "use of closed network connection" (CI,
// once); and a server that closes with unread bytes resets the
// connection, which can overtake its alert.
func refusal(addr string, conf *tls.Config) error {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: conf}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := c.Read(make([]byte, 1)); err != nil {
		return err
	}
	return errors.New("the server answered")
}

// Both ends require the other's certificate to chain to the fleet's CA.
func TestMutualTLS(t *testing.T) {
	ca, other := newCA(t), newCA(t)
	server := identity(t, ca, "relay-0")
	addr := serve(t, server, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Proto+" "+r.TLS.PeerCertificates[0].Subject.CommonName)
	}))
	tests := []struct {
		name    string
		client  func() *tls.Config
		wantErr string
	}{
		{name: "same CA", client: func() *tls.Config { return identity(t, ca, "relay-1").ClientConfig() }},
		{name: "client cert from another CA", wantErr: "certificate",
			client: func() *tls.Config { return identity(t, other, "intruder").ClientConfig().Clone() }},
		{name: "no client cert", wantErr: "certificate", client: func() *tls.Config {
			c := identity(t, ca, "relay-1").ClientConfig().Clone()
			c.Certificates = nil
			return c
		}},
		{name: "TLS 1.2 refused", wantErr: "protocol version", client: func() *tls.Config {
			c := identity(t, ca, "relay-1").ClientConfig().Clone()
			c.MinVersion, c.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
			return c
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.wantErr != "" {
				assert.ErrorContains(t, refusal(addr, tc.client()), tc.wantErr)
				return
			}
			id := identity(t, ca, "relay-1")
			tr := id.Transport()
			tr.TLSClientConfig = tc.client()
			defer tr.CloseIdleConnections()
			resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://" + addr + "/")
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			assert.Equal(t, "HTTP/1.1 relay-1", string(body), "HTTP/1.1 (upgrades must pass) and the client's identity")
		})
	}

	// A forwarder refuses a listener whose certificate is from another CA.
	fake := serve(t, identity(t, other, "relay-9"), http.NotFoundHandler())
	tr := identity(t, ca, "relay-1").Transport()
	defer tr.CloseIdleConnections()
	_, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://" + fake + "/")
	var unknown x509.UnknownAuthorityError
	assert.True(t, errors.As(err, &unknown), "want an unknown authority error, got %v", err)
}

func TestOpenConn(t *testing.T) {
	ca := newCA(t)
	server, client := identity(t, ca, "relay-0"), identity(t, ca, "relay-1")
	addr := serve(t, server, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !IsConnRequest(r) {
			http.Error(w, "not a connection request", http.StatusBadRequest)
			return
		}
		if r.Header.Get(HeaderHost) != "cluster-a.proxy.test" {
			w.Header().Set(headerError, ErrNoTunnel)
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		c, err := AcceptConn(w)
		if err != nil {
			return
		}
		defer c.Close()
		// Echo in upper case, with the source, until EOF; then answer.
		b, _ := io.ReadAll(c)
		io.WriteString(c, strings.ToUpper(string(b))+" from "+r.Header.Get(HeaderSource))
	}))
	ctx := context.Background()

	c, err := client.OpenConn(ctx, addr, "cluster-a.proxy.test", "192.0.2.1:5555", 5*time.Second)
	require.NoError(t, err)
	_, err = io.WriteString(c, "hello")
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite(), "half-close: the answer still comes back")
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "HELLO from 192.0.2.1:5555", string(b))
	c.Close()

	_, err = client.OpenConn(ctx, addr, "cluster-b.proxy.test", "192.0.2.1:5555", 5*time.Second)
	var se *StatusError
	require.ErrorAs(t, err, &se)
	assert.Equal(t, http.StatusServiceUnavailable, se.Code)
	assert.Equal(t, ErrNoTunnel, se.Reason)

	// Nothing listening: an error at once, for the next holder.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	gone := ln.Addr().String()
	ln.Close()
	_, err = client.OpenConn(ctx, gone, "cluster-a.proxy.test", "192.0.2.1:5555", 5*time.Second)
	assert.ErrorContains(t, err, "dialing peer")
}
