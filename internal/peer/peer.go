// Package peer is the relay replicas' internal channel: a user connection
// that lands on a replica without its cluster's tunnel is carried to a
// replica that holds one, over HTTP/1.1 (upgrades must pass; no h2) in
// mutual TLS from the relay's CA.
//
// Each replica issues itself a certificate from the CA at start (kept in
// memory only), serves with it and presents it as a client; both ends
// require the other's certificate to chain to that CA. Trust is "a member
// of the fleet": any replica may serve any forwarded request (the receiver
// answers 503 when it holds no tunnel for the name, and the forwarder tries
// the next holder), so the check is the CA, not one replica's identity.
package peer

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
)

// The wire between replicas.
const (
	// PathConn is the request that carries a whole public connection
	// (passthrough mode): GET with Connection: Upgrade and
	// Upgrade: UpgradeConn, answered 101, then raw bytes both ways; the
	// forwarder first writes the bytes it already peeked (the ClientHello).
	PathConn    = "/v1/peer/conn"
	UpgradeConn = "spectro-proxy-conn"
	// HeaderHost names the public server name (SNI) the user asked for;
	// the receiver routes by it alone.
	HeaderHost = "Spectro-Proxy-Peer-Host"
	// HeaderSource is the user's remote address, which the receiver's
	// per-source limits count (trusted only on the mTLS peer listener).
	HeaderSource = "Spectro-Proxy-Peer-Source"
	// ErrNoTunnel is the Spectro-Proxy-Error value of the 503 a receiver
	// answers when it holds no tunnel for the name: the forwarder tries
	// the next holder.
	ErrNoTunnel = "no-local-tunnel"
	// ServerName is carried by every peer certificate besides the replica
	// id, and is what forwarders verify (they dial addresses, and any
	// fleet member will do; see the package comment).
	ServerName = "peer.spectro-proxy.internal"
)

// Timeouts of the internal channel: replicas sit in one network, so a
// peer that takes longer than this is down for the forwarder's purpose
// (it tries the next holder).
const (
	DialTimeout      = 3 * time.Second
	HandshakeTimeout = 5 * time.Second
	// certLifetime: the certificate lives in memory for one process; a
	// relay restarts (rollouts) far more often than this.
	certLifetime = 365 * 24 * time.Hour
)

// Identity is one replica's peer certificate and the CA it trusts.
type Identity struct {
	// ID is the replica id the certificate names (CN and SAN).
	ID     string
	Cert   tls.Certificate
	pool   *x509.CertPool
	client *tls.Config
}

// Load reads the CA from PEM files and issues the replica's certificate.
func Load(caCertFile, caKeyFile, replicaID string) (*Identity, error) {
	ca, err := pki.LoadCA(caCertFile, caKeyFile)
	if err != nil {
		return nil, fmt.Errorf("loading the peer CA: %w", err)
	}
	return New(ca, replicaID)
}

// New issues the replica's certificate from ca: CN and DNS SAN the replica
// id plus ServerName, for both server and client auth.
func New(ca *pki.CA, replicaID string) (*Identity, error) {
	if replicaID == "" {
		return nil, errors.New("issuing the peer certificate: replica id is empty")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating the peer key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, fmt.Errorf("generating a serial number: %w", err)
	}
	notAfter := time.Now().Add(certLifetime)
	if ca.Cert.NotAfter.Before(notAfter) {
		notAfter = ca.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: replicaID, Organization: []string{"spectro-proxy relay"}},
		DNSNames:     []string{replicaID, ServerName},
		NotBefore:    time.Now().Add(-time.Hour), // clock skew between replicas
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("signing the peer certificate of %s: %w", replicaID, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing the peer certificate: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	id := &Identity{
		ID:   replicaID,
		Cert: tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf},
		pool: pool,
	}
	id.client = &tls.Config{
		Certificates: []tls.Certificate{id.Cert},
		RootCAs:      pool,
		ServerName:   ServerName,
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"http/1.1"},
		// Resumed sessions skip the certificate exchange on the many
		// short connections a forwarder opens (one per passthrough
		// connection).
		ClientSessionCache: tls.NewLRUClientSessionCache(256),
	}
	return id, nil
}

// ServerConfig is the peer listener's TLS: TLS 1.3, HTTP/1.1, and a client
// certificate from the CA required.
func (id *Identity) ServerConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{id.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    id.pool,
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"http/1.1"},
	}
}

// ClientConfig is the forwarder's TLS (shared: it holds the session cache).
func (id *Identity) ClientConfig() *tls.Config { return id.client }

// Transport returns the forwarder's HTTP/1.1 client for terminate-mode
// requests: a keep-alive pool per peer, TLS sessions resumed, no proxy
// from the environment, no compression (the response passes as the
// target sent it).
func (id *Identity) Transport() *http.Transport {
	return &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     id.client,
		TLSHandshakeTimeout: HandshakeTimeout,
		ForceAttemptHTTP2:   false,
		// A non-nil empty map keeps HTTP/2 off: upgrades must pass.
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		DisableCompression:  true,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
	}
}

// Dial opens a TLS connection to the peer listener at addr.
func (id *Identity) Dial(ctx context.Context, addr string) (*tls.Conn, error) {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: DialTimeout, KeepAlive: 30 * time.Second}, Config: id.client}
	hctx, cancel := context.WithTimeout(ctx, DialTimeout+HandshakeTimeout)
	defer cancel()
	c, err := d.DialContext(hctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dialing peer %s: %w", addr, err)
	}
	return c.(*tls.Conn), nil
}

// StatusError is a peer's answer other than 101 to a connection request.
type StatusError struct {
	Code int
	// Reason is the answer's Spectro-Proxy-Error (ErrNoTunnel: try the
	// next holder).
	Reason string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("peer answered %d %s", e.Code, e.Reason)
}

// OpenConn asks the peer at addr to carry a whole public connection for
// host (the server name), from source (the user's address). On 101 it
// returns the raw connection; the caller writes the peeked bytes first.
// headerTimeout bounds the wait for the answer (the peer opens its
// tunnel stream before answering).
func (id *Identity) OpenConn(ctx context.Context, addr, host, source string, headerTimeout time.Duration) (*Conn, error) {
	c, err := id.Dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(headerTimeout))
	req := &http.Request{
		Method:     http.MethodGet,
		URL:        &url.URL{Path: PathConn},
		Proto:      "HTTP/1.1",
		ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{
			"Connection": {"Upgrade"},
			"Upgrade":    {UpgradeConn},
			HeaderHost:   {host},
			HeaderSource: {source},
		},
		Host: ServerName,
	}
	if err := req.Write(c); err != nil {
		c.Close()
		return nil, fmt.Errorf("writing connection request to peer %s: %w", addr, err)
	}
	br := bufio.NewReaderSize(c, 4<<10)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("reading peer %s's answer: %w", addr, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		c.Close()
		return nil, &StatusError{Code: resp.StatusCode, Reason: resp.Header.Get(headerError)}
	}
	_ = c.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		c.Close()
		return nil, ctx.Err()
	}
	return &Conn{Conn: c, r: br}, nil
}

// headerError is tunnel.HeaderError (not imported: internal/tunnel pulls in
// HTTP/2 and WebSocket code this package does not need).
const headerError = "Spectro-Proxy-Error"

// Conn is an upgraded peer connection: reads drain what was buffered
// while the answer was read, and it half-closes (TLS close_notify), so
// tunnel.Join can carry EOF through.
type Conn struct {
	*tls.Conn
	r io.Reader
}

func (c *Conn) Read(p []byte) (int, error) { return c.r.Read(p) }

// AcceptConn answers a connection request 101 and returns the raw
// connection (with what the server had buffered of it).
func AcceptConn(w http.ResponseWriter) (net.Conn, error) {
	c, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, fmt.Errorf("taking over the peer connection: %w", err)
	}
	if _, err := io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+UpgradeConn+"\r\n\r\n"); err != nil {
		c.Close()
		return nil, fmt.Errorf("answering the peer: %w", err)
	}
	return &hijacked{Conn: c, r: rw.Reader}, nil
}

// IsConnRequest reports whether r asks for a whole connection.
func IsConnRequest(r *http.Request) bool {
	return r.URL.Path == PathConn && r.Method == http.MethodGet && hasToken(r.Header, "Connection", "upgrade") &&
		strings.EqualFold(r.Header.Get("Upgrade"), UpgradeConn)
}

type hijacked struct {
	net.Conn
	r io.Reader
}

func (h *hijacked) Read(p []byte) (int, error) { return h.r.Read(p) }

// CloseWrite half-closes when the hijacked connection can (a *tls.Conn).
func (h *hijacked) CloseWrite() error {
	if cw, ok := h.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return h.Conn.Close()
}

func hasToken(h http.Header, name, tok string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), tok) {
				return true
			}
		}
	}
	return false
}
