// Package e2e runs the real relay and agent in-process on 127.0.0.1 against
// real TLS backends: first an httptest API-server stand-in (tunnel_test.go),
// then a real kube-apiserver driven by the real kubectl (kube_test.go).
package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http/httpproxy"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/proctest"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

const domain = "proxy.test"

// clusterHost is the relay's host name for cluster uid's API server.
func clusterHost(uid string) string { return hostname.Host(hostname.DefaultSubdomain(uid), domain) }

// relay is a running relay.
type relay struct {
	srv      *server.Server
	addr     string
	stateDir string
	revoked  string
	cancel   context.CancelFunc
	done     chan error
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("E2E_LOG") != "" {
		return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startRelay starts a relay on addr ("127.0.0.1:0" for any port) keeping its
// state in stateDir (a new temp dir when empty).
func startRelay(t testing.TB, addr, stateDir string, tweak func(*server.Config)) *relay {
	t.Helper()
	if stateDir == "" {
		stateDir = t.TempDir()
	}
	cfg := server.Config{
		Domain:         domain,
		StateDir:       stateDir,
		RevocationFile: filepath.Join(stateDir, "revoked"),
		Logger:         testLogger(t),
		DrainTimeout:   2 * time.Second,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	srv, err := server.New(cfg)
	require.NoError(t, err)
	var ln net.Listener
	// A restarted relay must get its old port back; the old socket may
	// linger for a moment after close.
	require.Eventually(t, func() bool {
		ln, err = net.Listen("tcp", addr)
		return err == nil
	}, 5*time.Second, 20*time.Millisecond, "listening on %s", addr)
	ctx, cancel := context.WithCancel(context.Background())
	r := &relay{srv: srv, addr: ln.Addr().String(), stateDir: stateDir, revoked: cfg.RevocationFile, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(r.stop)
	return r
}

func (r *relay) stop() {
	r.cancel()
	<-r.done
	r.done <- nil // later stops return at once
}

func (r *relay) caFile() string { return filepath.Join(r.stateDir, "ca.crt") }

func (r *relay) caPool(t testing.TB) *x509.CertPool {
	b, err := os.ReadFile(r.caFile())
	require.NoError(t, err)
	p := x509.NewCertPool()
	require.True(t, p.AppendCertsFromPEM(b))
	return p
}

// issue writes a token for uid into a file and returns its path and claims.
func (r *relay) issue(t testing.TB, uid, subdomain string, ttl time.Duration) (string, token.Claims) {
	t.Helper()
	key, err := token.ReadKey(filepath.Join(r.stateDir, "signing.key"))
	require.NoError(t, err)
	tok, claims, err := token.Issue(key, uid, subdomain, ttl, time.Now())
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(path, []byte(tok), 0o600))
	return path, claims
}

// agent is a running agent.
type agent struct {
	c      *client.Client
	cancel context.CancelFunc
	done   chan struct{}
}

func startAgent(t testing.TB, r *relay, cfg client.Config) *agent {
	t.Helper()
	if cfg.Server == "" {
		cfg.Server = domain
	}
	if cfg.RelayAddress == "" {
		cfg.RelayAddress = r.addr
	}
	if cfg.RelayCAFile == "" {
		cfg.RelayCAFile = r.caFile()
	}
	if cfg.AgentID == "" {
		cfg.AgentID = "agent-" + t.Name()
	}
	if cfg.Proxy == nil {
		cfg.Proxy = &httpproxy.Config{} // the relay is on 127.0.0.1, whatever the environment's proxy
	}
	if cfg.Mode == "" {
		// These tests predate mode auto and point some agents at API
		// servers that never answer; auto mode is tested in agent_test.go.
		cfg.Mode = tunnel.Passthrough
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	if cfg.BackoffMax == 0 {
		cfg.BackoffMax = time.Second
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 2 * time.Second
	}
	c, err := client.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{c: c, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(a.done); c.Run(ctx) }()
	t.Cleanup(a.stop)
	return a
}

func (a *agent) stop() { a.cancel(); <-a.done }

func (a *agent) waitReady(t testing.TB) {
	t.Helper()
	require.Eventually(t, a.c.Ready, 10*time.Second, 10*time.Millisecond, "agent never connected")
}

// dialTLS opens a TLS connection to the relay for host.
func dialTLS(r *relay, host string, roots *x509.CertPool) (*tls.Conn, error) {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: &tls.Config{ServerName: host, RootCAs: roots}}
	c, err := d.Dial("tcp", r.addr)
	if err != nil {
		return nil, err
	}
	return c.(*tls.Conn), nil
}

// syncBuffer collects output written while the test reads it.
type syncBuffer = proctest.Buffer
