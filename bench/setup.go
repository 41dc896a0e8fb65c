//lint:file-ignore SA1019 x/net/http2 is deprecated in favour of net/http's own HTTP/2 (Go 1.26: http.Transport.NewClientConn, http.Server.Protocols); moving the tunnel's both ends to it changes the wire code and wants its own make bench run, so it is a change of its own.

package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/net/http2"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/promtext"
	"github.com/spectroproxy/spectro-proxy/internal/token"
)

// Domain is the relay's domain in the benchmark.
const Domain = "proxy.bench"

// Relay is a running relay process.
type Relay struct {
	*Proc
	Addr     string
	StateDir string
	Roots    *x509.CertPool
	key      []byte
}

// StartRelay starts the relay binary on 127.0.0.1 with its state in dir and
// waits until it listens. extra flags come last (a repeated flag's last
// value wins).
func StartRelay(ctx context.Context, bin, dir string, extra ...string) (*Relay, error) {
	return startRelayNamed(ctx, "relay", bin, dir, extra...)
}

func startRelayNamed(ctx context.Context, name, bin, dir string, extra ...string) (*Relay, error) {
	args := []string{
		"--listen", "127.0.0.1:0", "--domain", Domain, "--state-dir", dir,
		"--revocation-file", filepath.Join(dir, "revoked"),
		// Thousands of bench agents register within seconds.
		"--registrations-per-second", "1000000",
		// Every load comes from 127.0.0.1, up to 64 concurrent connections
		// and 10,000 tunnels: the per-source caps that guard a shared relay
		// would measure the caps, not the data path.
		"--max-streams-per-source", "100000", "--max-idle-conns-per-source", "100000",
		"--drain-timeout", "2s", "--log-level", "info"}
	p, addr, err := startListening(ctx, name, bin, "relay listening", append(args, extra...)...)
	if err != nil {
		return nil, err
	}
	r := &Relay{Proc: p, Addr: addr, StateDir: dir}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("reading relay CA: %w", err)
	}
	if r.Roots, err = pki.Pool(caPEM); err != nil {
		return nil, err
	}
	if r.key, err = token.ReadKey(filepath.Join(dir, "signing.key")); err != nil {
		return nil, err
	}
	return r, nil
}

// Token returns a tunnel token for cluster uid.
func (r *Relay) Token(uid string) (string, error) {
	tok, _, err := token.Issue(r.key, uid, "", 0, time.Now())
	if err != nil {
		return "", fmt.Errorf("issuing token for %s: %w", uid, err)
	}
	return tok, nil
}

// Tunnels reads the relay's connected-tunnels gauge from its metrics.
func (r *Relay) Tunnels(ctx context.Context) (int, error) {
	m, err := r.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	v, ok := m["spectro_proxy_tunnels_connected"]
	if !ok {
		return 0, fmt.Errorf("relay metrics lack spectro_proxy_tunnels_connected")
	}
	return int(v), nil
}

// Metrics reads the relay's metrics, each sample by its full name (labels
// included).
func (r *Relay) Metrics(ctx context.Context) (map[string]float64, error) {
	t := Target{Name: "relay", Addr: r.Addr, Host: Domain, Roots: r.Roots}
	hc := t.Client(false, 1)
	defer hc.CloseIdleConnections()
	m, err := promtext.Scrape(ctx, hc, t.URL("/metrics"))
	if err != nil {
		return nil, fmt.Errorf("reading relay metrics: %w", err)
	}
	return m, nil
}

// Agent is a running agent process serving one cluster.
type Agent struct {
	*Proc
	// Target reaches the backend through the relay and this agent.
	Target Target
}

// StartAgent starts the agent binary for cluster uid in mode, dialing the
// relay at relayAddr (the relay itself, or a delay line in front of it),
// and waits until a request through it reaches the backend. extra flags
// come last (a flag given twice takes the later value).
func StartAgent(ctx context.Context, bin, dir string, r *Relay, relayAddr, uid, mode string, be *Backend, extra ...string) (*Agent, error) {
	tok, err := r.Token(uid)
	if err != nil {
		return nil, err
	}
	tokFile := filepath.Join(dir, "token-"+uid)
	if err := os.WriteFile(tokFile, []byte(tok), 0o600); err != nil {
		return nil, fmt.Errorf("writing token: %w", err)
	}
	p, err := startProc("agent-"+uid, bin, nil, append([]string{
		"--server", Domain, "--relay-address", relayAddr, "--relay-ca-file", filepath.Join(r.StateDir, "ca.crt"),
		"--cluster-uid", uid, "--token-file", tokFile, "--mode", mode, "--agent-id", "bench-" + uid,
		"--api-server", "https://" + be.Addr, "--api-server-ca-file", be.CAFile,
		"--health-addr=", "--drain-timeout", "2s", "--log-level", "warn"}, extra...)...)
	if err != nil {
		return nil, err
	}
	a := &Agent{Proc: p, Target: Target{Name: mode, Addr: r.Addr, Host: hostname.Host(hostname.DefaultSubdomain(uid), Domain), Roots: be.Roots}}
	if mode == "terminate" {
		a.Target.Roots = r.Roots
	}
	if err := a.Target.WaitReady(ctx, 30*time.Second); err != nil {
		a.Stop(time.Second)
		return nil, fmt.Errorf("agent %s: %w\n%s", uid, err, p.Tail(20))
	}
	return a, nil
}

// Target is one way to reach the backend: directly or through the relay.
type Target struct {
	Name string
	// Addr is dialed; Host is the TLS server name and URL host.
	Addr, Host string
	Roots      *x509.CertPool
}

// URL is path on the target.
func (t Target) URL(path string) string { return "https://" + t.Host + path }

func (t Target) tlsConfig(protos ...string) *tls.Config {
	// No session cache: every new connection pays a full handshake, as a
	// fresh kubectl process does.
	return &tls.Config{ServerName: t.Host, RootCAs: t.Roots, NextProtos: protos, MinVersion: tls.VersionTLS12}
}

func (t Target) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", t.Addr)
}

// Client returns an HTTP client for t: HTTP/1.1 with up to conns
// connections, or HTTP/2 on one connection.
func (t Target) Client(h2 bool, conns int) *http.Client {
	if h2 {
		return &http.Client{Transport: &http2.Transport{
			TLSClientConfig:    t.tlsConfig("h2"),
			DisableCompression: true,
			DialTLSContext: func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
				c, err := t.dial(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				tc := tls.Client(c, cfg)
				if err := tc.HandshakeContext(ctx); err != nil {
					c.Close()
					return nil, err
				}
				return tc, nil
			},
		}}
	}
	return &http.Client{Transport: &http.Transport{
		DialContext:         t.dial,
		TLSClientConfig:     t.tlsConfig("http/1.1"),
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1 only
		MaxIdleConnsPerHost: conns,
		MaxConnsPerHost:     conns,
		DisableCompression:  true,
	}}
}

// WaitReady polls a small GET until it succeeds or timeout passes.
func (t Target) WaitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		hc := t.Client(false, 1)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, t.URL(pathSmall), nil)
		resp, err := hc.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				hc.CloseIdleConnections()
				return nil
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		hc.CloseIdleConnections()
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w", t.Name, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
