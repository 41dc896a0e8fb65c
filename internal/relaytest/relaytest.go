// Package relaytest runs relays and agents in one test process on
// 127.0.0.1, with a round-robin TCP forwarder in front of the relays
// standing in for a load balancer. Only tests import it.
package relaytest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/http/httpproxy"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/server"
)

// Domain is the relays' domain.
const Domain = "proxy.test"

// Logger logs to the test's output when RELAYTEST_LOG is set.
func Logger(t testing.TB) *slog.Logger {
	if os.Getenv("RELAYTEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// Relay is a running relay.
type Relay struct {
	Srv      *server.Server
	Addr     string
	StateDir string
	cancel   context.CancelFunc
	done     chan error
	once     sync.Once
	err      error
}

// StartRelay starts a relay with replica id on a free port. Relays given
// one stateDir share their CA, certificate and signing key (as a fleet
// does), so one token and one CA work on all of them.
func StartRelay(t testing.TB, stateDir, id string, tweak func(*server.Config)) *Relay {
	t.Helper()
	cfg := server.Config{
		Domain:         Domain,
		StateDir:       stateDir,
		RevocationFile: filepath.Join(stateDir, "revoked"),
		ReplicaID:      id,
		Logger:         Logger(t).With("relay", id),
		DrainTimeout:   4 * time.Second,
	}
	if tweak != nil {
		tweak(&cfg)
	}
	srv, err := server.New(cfg)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	r := &Relay{Srv: srv, Addr: ln.Addr().String(), StateDir: stateDir, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() { r.Stop() })
	return r
}

// Terminate ends the relay's serve context, as SIGTERM does; Done is
// closed once Serve has returned.
func (r *Relay) Terminate() { r.cancel() }

// Wait waits for Serve to return and returns its error.
func (r *Relay) Wait() error {
	r.once.Do(func() { r.err = <-r.done })
	return r.err
}

// Stop terminates the relay and waits for it.
func (r *Relay) Stop() error { r.cancel(); return r.Wait() }

// CAFile is the relays' CA.
func (r *Relay) CAFile() string { return filepath.Join(r.StateDir, "ca.crt") }

// CAPool is the relays' CA as a pool.
func (r *Relay) CAPool(t testing.TB) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(r.CAFile())
	require.NoError(t, err)
	p := x509.NewCertPool()
	require.True(t, p.AppendCertsFromPEM(b))
	return p
}

// IssueToken writes a token for cluster uid into a file and returns its
// path.
func (r *Relay) IssueToken(t testing.TB, uid string) string {
	t.Helper()
	key, err := token.ReadKey(filepath.Join(r.StateDir, server.StateSigningKey))
	require.NoError(t, err)
	tok, _, err := token.Issue(key, uid, "", 0, time.Now())
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(path, []byte(tok), 0o600))
	return path
}

// TLSDialer dials the relay at addr for host (SNI), trusting the relays'
// CA, offering protos in ALPN (HTTP/1.1 when none).
func (r *Relay) TLSDialer(t testing.TB, host string, protos ...string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if len(protos) == 0 {
		protos = []string{"http/1.1"}
	}
	conf := &tls.Config{ServerName: host, RootCAs: r.CAPool(t), NextProtos: protos}
	relayAddr := r.Addr
	return func(ctx context.Context, _, _ string) (net.Conn, error) {
		d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: conf}
		return d.DialContext(ctx, "tcp", relayAddr)
	}
}

// LB is a fake load balancer: a round-robin TCP forwarder on 127.0.0.1
// that skips backends it cannot dial (as HAProxy's health checks would).
type LB struct {
	Addr string

	mu       sync.Mutex
	backends []string
	next     int
}

// StartLB forwards to backends until the test ends.
func StartLB(t testing.TB, backends ...string) *LB {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	lb := &LB{Addr: ln.Addr().String(), backends: backends}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]struct{}{}
	track := func(c net.Conn, add bool) {
		mu.Lock()
		defer mu.Unlock()
		if add {
			open[c] = struct{}{}
		} else {
			delete(open, c)
		}
	}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			track(conn, true)
			wg.Go(func() {
				defer track(conn, false)
				defer conn.Close()
				up := lb.dial()
				if up == nil {
					return
				}
				track(up, true)
				defer track(up, false)
				defer up.Close()
				go func() {
					_, _ = io.Copy(up, conn)
					if tc, ok := up.(*net.TCPConn); ok {
						_ = tc.CloseWrite()
					}
				}()
				_, _ = io.Copy(conn, up)
			})
		}
	})
	return lb
}

// SetBackends replaces the backends.
func (lb *LB) SetBackends(backends ...string) {
	lb.mu.Lock()
	defer lb.mu.Unlock()
	lb.backends = backends
}

func (lb *LB) dial() net.Conn {
	lb.mu.Lock()
	backends := append([]string(nil), lb.backends...)
	start := lb.next
	lb.next++
	lb.mu.Unlock()
	for i := range backends {
		c, err := net.DialTimeout("tcp", backends[(start+i)%len(backends)], 2*time.Second)
		if err == nil {
			return c
		}
	}
	return nil
}

// Agent is a running agent.
type Agent struct {
	C      *client.Client
	cancel context.CancelFunc
	done   chan struct{}
}

// StartAgent runs an agent for relays (RelayAddress, RelayCAFile and a
// token must be set in cfg) until the test ends.
func StartAgent(t testing.TB, cfg client.Config) *Agent {
	t.Helper()
	if cfg.Server == "" {
		cfg.Server = Domain
	}
	if cfg.Proxy == nil {
		cfg.Proxy = &httpproxy.Config{} // the relays are on 127.0.0.1, whatever the environment says
	}
	if cfg.Logger == nil {
		cfg.Logger = Logger(t).With("agent", cfg.AgentID)
	}
	if cfg.BackoffMax == 0 {
		cfg.BackoffMax = time.Second
	}
	c, err := client.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{C: c, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(a.done); _ = c.Run(ctx) }()
	t.Cleanup(a.Stop)
	return a
}

// Stop ends the agent and waits for it.
func (a *Agent) Stop() { a.cancel(); <-a.done }

// SampleMin records the least value f takes until the returned stop is
// called, sampled every millisecond (such as an agent's tunnel count
// through a move, which must never reach 0).
func SampleMin(f func() int) (stop func() int) {
	var least atomic.Int64
	least.Store(int64(f()))
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			if n := int64(f()); n < least.Load() {
				least.Store(n)
			}
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	return func() int { close(done); <-finished; return int(least.Load()) }
}
