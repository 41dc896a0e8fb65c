package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http/httpproxy"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/peer"
	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/promtext"
	fleet "github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/relaytest"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

// fakeFleet is a FAKE of the fleet's registry (the internal/registry
// interface), for these tests only: the relays of one test process share
// one view, updated at once, with no etcd, no leases and no watch. Lookup
// lists the holders by replica id, without spreading, so a test can put a
// stale holder first. The real implementations have tests of their own
// (internal/registry) and the fleet an e2e test on a real etcd.
type fakeFleet struct {
	mu       sync.Mutex
	replicas map[string]fleet.Replica
	tunnels  map[fakeKey]fleet.Tunnel
	revoked  map[string]bool
}

type fakeKey struct{ label, replica, cluster, agent string }

func newFakeFleet() *fakeFleet {
	return &fakeFleet{replicas: map[string]fleet.Replica{}, tunnels: map[fakeKey]fleet.Tunnel{}, revoked: map[string]bool{}}
}

// member is one replica's registry in the fake fleet.
func (f *fakeFleet) member(self fleet.Replica) fleet.Registry { return &fakeMember{f: f, self: self} }

// stale adds a replica that is in the view but gone (nothing answers at
// its peer address), holding a tunnel for each label.
func (f *fakeFleet) stale(r fleet.Replica, cluster string, routes map[string]tunnel.Mode) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.replicas[r.ID] = r
	for label, mode := range routes {
		f.tunnels[fakeKey{label, r.ID, cluster, "gone"}] = fleet.Tunnel{Label: label, ClusterUID: cluster, AgentID: "gone", Mode: string(mode)}
	}
}

// holds reports whether replica holds a tunnel for label in the view.
func (f *fakeFleet) holds(replica, label string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for k := range f.tunnels {
		if k.label == label && k.replica == replica {
			return true
		}
	}
	return false
}

type fakeMember struct {
	f    *fakeFleet
	self fleet.Replica
}

func (m *fakeMember) Start(context.Context) error {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	m.f.replicas[m.self.ID] = m.self
	return nil
}

func (m *fakeMember) Self() fleet.Replica { return m.self }

func (m *fakeMember) Announce(t fleet.Tunnel) {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	m.f.tunnels[fakeKey{t.Label, m.self.ID, t.ClusterUID, t.AgentID}] = t
}

func (m *fakeMember) Withdraw(t fleet.Tunnel) {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	delete(m.f.tunnels, fakeKey{t.Label, m.self.ID, t.ClusterUID, t.AgentID})
}

func (m *fakeMember) Lookup(label string) []fleet.Holder {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	seen := map[string]bool{}
	var out []fleet.Holder
	for k, t := range m.f.tunnels {
		r, live := m.f.replicas[k.replica]
		if k.label != label || k.replica == m.self.ID || !live || seen[k.replica] {
			continue
		}
		seen[k.replica] = true
		out = append(out, fleet.Holder{Replica: r, ClusterUID: t.ClusterUID, Mode: t.Mode})
	}
	slices.SortFunc(out, func(a, b fleet.Holder) int { return strings.Compare(a.Replica.ID, b.Replica.ID) })
	return out
}

func (m *fakeMember) LabelOwner(label string) (string, bool) {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	for k := range m.f.tunnels {
		if _, live := m.f.replicas[k.replica]; live && k.label == label {
			return k.cluster, true
		}
	}
	return "", false
}

func (m *fakeMember) Replicas() []fleet.Replica {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	var out []fleet.Replica
	for _, r := range m.f.replicas {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b fleet.Replica) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func (m *fakeMember) Revoke(_ context.Context, id string, _ time.Time) error {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	m.f.revoked[id] = true
	return nil
}

func (m *fakeMember) Revoked(id string) bool {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	return m.f.revoked[id]
}

func (m *fakeMember) Ready() bool { return true }

func (m *fakeMember) Close(context.Context) error {
	m.f.mu.Lock()
	defer m.f.mu.Unlock()
	delete(m.f.replicas, m.self.ID)
	for k := range m.f.tunnels {
		if k.replica == m.self.ID {
			delete(m.f.tunnels, k)
		}
	}
	return nil
}

const fleetDomain = "proxy.test"

// fleetRelay is one relay replica of a test fleet.
type fleetRelay struct {
	id, addr, peerAddr string
	srv                *server.Server
	stop               func()
}

// freeAddr returns a 127.0.0.1 address nothing listens on now (the peer
// listener's address must be in the replica's registry entry before it
// listens).
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func testLog(t *testing.T) *slog.Logger {
	if os.Getenv("E2E_LOG") != "" {
		return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startFleetRelay starts replica id of the fleet f; all replicas share
// stateDir (one CA, one signing key, as a fleet's pods share Secrets).
func startFleetRelay(t *testing.T, f *fakeFleet, id, stateDir string) *fleetRelay {
	t.Helper()
	peer := peerListener(t)
	return startRelayWith(t, id, peer, stateDir, func(c *server.Config) {
		c.Registry = f.member(fleet.Replica{ID: id, PeerAddr: c.PeerAdvertise})
	})
}

// peerListener opens a replica's peer listener on a port of its own:
// choosing a free port and listening on it later lets another socket
// (another test package's) take it in between.
func peerListener(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return ln
}

// startRelayWith starts replica id serving peers on peer; tweak sets
// the registry.
func startRelayWith(t *testing.T, id string, peer net.Listener, stateDir string, tweak func(*server.Config)) *fleetRelay {
	t.Helper()
	peerAddr := peer.Addr().String()
	cfg := server.Config{
		Domain:             fleetDomain,
		StateDir:           stateDir,
		RevocationFile:     filepath.Join(stateDir, "revoked"),
		RevocationInterval: 100 * time.Millisecond,
		Logger:             testLog(t).With("replica", id),
		DrainTimeout:       2 * time.Second,
		ReplicaID:          id,
		PeerListen:         peerAddr,
		PeerListener:       peer,
		PeerAdvertise:      peerAddr,
	}
	tweak(&cfg)
	srv, err := server.New(cfg)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	var once sync.Once
	r := &fleetRelay{id: id, addr: ln.Addr().String(), peerAddr: peerAddr, srv: srv}
	r.stop = func() { once.Do(func() { cancel(); require.NoError(t, <-done) }) }
	t.Cleanup(r.stop)
	require.Eventually(t, func() bool { return ready(srv) }, 10*time.Second, 10*time.Millisecond, "relay %s never ready", id)
	return r
}

func ready(srv *server.Server) bool {
	rec := httptest.NewRecorder()
	srv.HealthHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	return rec.Code == http.StatusOK
}

// metric reads one sample of the relay's metrics by its full name,
// labels sorted (0 when absent).
func metric(t *testing.T, srv *server.Server, sample string) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	srv.HealthHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	all, err := promtext.Parse(rec.Body)
	require.NoError(t, err)
	return all[sample]
}

// apiBackend is an API-server stand-in behind the agents: real TLS with
// a private CA, an echo of what reached it, a streamed watch and a
// WebSocket echo.
type apiBackend struct {
	url, caFile string
	roots       *x509.CertPool
	events      chan string
}

func newAPIBackend(t *testing.T, sans ...string) *apiBackend {
	t.Helper()
	ca, err := pki.NewCA("backend CA")
	require.NoError(t, err)
	leaf, err := ca.Issue("backend", append([]string{"127.0.0.1"}, sans...), nil, false)
	require.NoError(t, err)
	cert, err := leaf.TLSCertificate()
	require.NoError(t, err)
	b := &apiBackend{events: make(chan string)}
	mux := http.NewServeMux()
	mux.HandleFunc("/who", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "host=%s xff=%s peer-host=%q", r.Host, r.Header.Get("X-Forwarded-For"), r.Header.Get(peer.HeaderHost))
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) { io.Copy(w, r.Body) })
	mux.HandleFunc("/mirror", mirror)
	mux.HandleFunc("/watch", relaytest.WatchHandler(b.events))
	mux.HandleFunc("/ws", relaytest.EchoWebSocket("echo "))
	mux.HandleFunc("/ws-once", relaytest.EchoWebSocketN("echo ", 1)) // then ends its side cleanly
	srv := httptest.NewUnstartedServer(mux)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	b.url = srv.URL
	b.caFile = filepath.Join(t.TempDir(), "backend-ca.crt")
	require.NoError(t, os.WriteFile(b.caFile, ca.CertPEM, 0o600))
	b.roots, err = pki.Pool(ca.CertPEM)
	require.NoError(t, err)
	return b
}

// issueToken writes a token for uid (with subdomain, "" for the default)
// signed with the state dir's key, and returns its file and claims.
func issueToken(t *testing.T, stateDir, uid, subdomain string) (string, token.Claims) {
	t.Helper()
	key, err := token.ReadKey(filepath.Join(stateDir, server.StateSigningKey))
	require.NoError(t, err)
	tok, claims, err := token.Issue(key, uid, subdomain, time.Hour, time.Now())
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(path, []byte(tok), 0o600))
	return path, claims
}

// startFleetAgent connects an agent of cluster uid to relay r and
// returns its token's id.
func startFleetAgent(t *testing.T, r *fleetRelay, stateDir, uid string, mode tunnel.Mode, be *apiBackend) string {
	t.Helper()
	tokFile, claims := issueToken(t, stateDir, uid, "")
	c, err := client.New(client.Config{
		Server: fleetDomain, RelayAddress: r.addr, RelayCAFile: filepath.Join(stateDir, "ca.crt"),
		ClusterUID: uid, TokenFile: tokFile, Mode: mode, APIServer: be.url, APIServerCAFile: be.caFile,
		AgentID: "agent-" + uid, Proxy: &httpproxy.Config{}, Logger: testLog(t),
		BackoffMax: time.Second, DrainTimeout: time.Second,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	require.Eventually(t, c.Ready, 10*time.Second, 10*time.Millisecond, "agent of %s never connected", uid)
	return claims.ID
}

// userClient reaches host through relay r over HTTP/1.1 (so upgrades and
// streamed bodies are plain), trusting roots.
func userClient(r *fleetRelay, host string, roots *x509.CertPool) *http.Client {
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		},
		TLSClientConfig: &tls.Config{ServerName: host, RootCAs: roots},
		TLSNextProto:    map[string]func(string, *tls.Conn) http.RoundTripper{},
	}}
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// Two relays in one process share a (fake) registry; agents hold tunnels
// to relay A only, and users land on relay B: every kind of traffic
// reaches the agent over B's peer hop to A.
func TestFleetForwarding(t *testing.T) {
	const ptUID, tmUID = "pt", "tm"
	ptHost, tmHost := hostname.Host(hostname.DefaultSubdomain(ptUID), fleetDomain), hostname.Host(hostname.DefaultSubdomain(tmUID), fleetDomain)
	stateDir := t.TempDir()
	f := newFakeFleet()
	a := startFleetRelay(t, f, "relay-a", stateDir)
	b := startFleetRelay(t, f, "relay-b", stateDir)
	be := newAPIBackend(t, ptHost)
	startFleetAgent(t, a, stateDir, ptUID, tunnel.Passthrough, be)
	startFleetAgent(t, a, stateDir, tmUID, tunnel.Terminate, be)
	// The agent is ready at the relay's 101 answer; the relay announces
	// the tunnel just after it.
	require.Eventually(t, func() bool { return f.holds("relay-a", "cluster-pt") && f.holds("relay-a", "cluster-tm") },
		5*time.Second, 5*time.Millisecond, "relay A announced its tunnels")
	relayRoots, err := os.ReadFile(filepath.Join(stateDir, "ca.crt"))
	require.NoError(t, err)
	relayPool, err := pki.Pool(relayRoots)
	require.NoError(t, err)

	pt := userClient(b, ptHost, be.roots)  // TLS ends at the API server
	tm := userClient(b, tmHost, relayPool) // TLS ends at the relay
	defer pt.CloseIdleConnections()
	defer tm.CloseIdleConnections()

	t.Run("passthrough connection", func(t *testing.T) {
		code, body := get(t, pt, "https://"+ptHost+"/who")
		assert.Equal(t, http.StatusOK, code)
		assert.Contains(t, body, "host="+ptHost)
		assert.Equal(t, 1.0, metric(t, b.srv, `spectro_proxy_forwarded_total{kind="conn",result="ok"}`))
		assert.Equal(t, 1.0, metric(t, a.srv, `spectro_proxy_peer_served_total{kind="conn"}`))
		// The kept-alive connection is in flight on both replicas (what
		// the relay's processors adapt to, internal/procs), until closed.
		assert.Equal(t, 1, b.srv.InFlight(), "relay B: the forwarded connection")
		assert.Equal(t, 1, a.srv.InFlight(), "relay A: the connection it serves for B")
		pt.CloseIdleConnections()
		require.Eventually(t, func() bool { return a.srv.InFlight() == 0 && b.srv.InFlight() == 0 }, 5*time.Second, 5*time.Millisecond,
			"in flight after the connection closed: A %d, B %d", a.srv.InFlight(), b.srv.InFlight())
	})

	t.Run("terminate request", func(t *testing.T) {
		code, body := get(t, tm, "https://"+tmHost+"/who")
		assert.Equal(t, http.StatusOK, code)
		assert.Contains(t, body, "host="+tmHost)
		assert.Contains(t, body, "xff=127.0.0.1 ", "the user's address once, as if the user had reached relay A")
		assert.Contains(t, body, `peer-host=""`, "the peer channel's headers stop at relay A")
		resp, err := tm.Post("https://"+tmHost+"/echo", "text/plain", strings.NewReader("a body"))
		require.NoError(t, err)
		b2, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, "a body", string(b2))
		assert.GreaterOrEqual(t, metric(t, b.srv, `spectro_proxy_forwarded_total{kind="http",result="ok"}`), 2.0)

		// A user cannot pose as a peer: the channel's headers a user
		// sends are dropped before the hop.
		req, err := http.NewRequest(http.MethodGet, "https://"+tmHost+"/who", nil)
		require.NoError(t, err)
		req.Header.Set(peer.HeaderSource, "203.0.113.66:1")
		req.Header.Set(peer.HeaderHost, ptHost)
		resp, err = tm.Do(req)
		require.NoError(t, err)
		b3, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Contains(t, string(b3), "host="+tmHost+" xff=127.0.0.1 ")

		// HTTP/2 from the user, HTTP/1.1 between the replicas.
		h2 := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, b.addr)
			},
			TLSClientConfig:   &tls.Config{ServerName: tmHost, RootCAs: relayPool},
			ForceAttemptHTTP2: true,
		}}
		defer h2.CloseIdleConnections()
		resp, err = h2.Post("https://"+tmHost+"/echo", "text/plain", strings.NewReader("over h2"))
		require.NoError(t, err)
		b4, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, "HTTP/2.0", resp.Proto)
		assert.Equal(t, "over h2", string(b4))
	})

	t.Run("upgrade", func(t *testing.T) {
		d := websocket.Dialer{
			NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, b.addr)
			},
			TLSClientConfig: &tls.Config{ServerName: tmHost, RootCAs: relayPool},
		}
		ws, resp, err := d.Dial("wss://"+tmHost+"/ws", nil)
		require.NoError(t, err)
		defer ws.Close()
		assert.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
		for _, msg := range []string{"one", "two"} {
			require.NoError(t, ws.WriteMessage(websocket.TextMessage, []byte(msg)))
			_, got, err := ws.ReadMessage()
			require.NoError(t, err)
			assert.Equal(t, "echo "+msg, string(got))
		}
		assert.Equal(t, 1.0, metric(t, b.srv, `spectro_proxy_forwarded_streams{kind="http"}`), "in flight while open")
	})

	t.Run("streamed response", func(t *testing.T) {
		resp, err := tm.Get("https://" + tmHost + "/watch")
		require.NoError(t, err)
		defer resp.Body.Close()
		br := bufio.NewReader(resp.Body)
		for _, ev := range []string{"ADDED a", "MODIFIED a"} {
			be.events <- ev
			// Each event arrives before the next is sent: flushed
			// through both relays.
			line, err := br.ReadString('\n')
			require.NoError(t, err)
			assert.Equal(t, ev+"\n", line)
		}
		// A terminated request counts while its answer streams: at B, and
		// at A, which serves it for B.
		tm.CloseIdleConnections() // the earlier subtests' kept-alive connections
		require.Eventually(t, func() bool { return a.srv.InFlight() == 1 && b.srv.InFlight() == 1 }, 5*time.Second, 5*time.Millisecond,
			"in flight with one watch open: A %d, B %d", a.srv.InFlight(), b.srv.InFlight())
		resp.Body.Close()
		require.Eventually(t, func() bool { return a.srv.InFlight() == 0 && b.srv.InFlight() == 0 }, 5*time.Second, 5*time.Millisecond,
			"in flight after the watch ended: A %d, B %d", a.srv.InFlight(), b.srv.InFlight())
	})

	t.Run("a label held by another cluster on another replica", func(t *testing.T) {
		tok, _ := issueToken(t, stateDir, "intruder", "cluster-tm")
		resp := refusedRegistration(t, b.addr, relayPool, tok, "cluster-tm=terminate")
		assert.Equal(t, http.StatusConflict, resp.StatusCode, "relay B has no tunnel for the label, relay A does")
	})

	t.Run("a token revoked in the registry", func(t *testing.T) {
		tok, claims := issueToken(t, stateDir, "revoked", "")
		require.NoError(t, f.member(fleet.Replica{ID: "cli"}).Revoke(context.Background(), claims.ID, time.Time{}))
		resp := refusedRegistration(t, b.addr, relayPool, tok, "cluster-revoked=terminate")
		assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	})

	t.Run("never forwarded twice", func(t *testing.T) {
		// A peer's request to relay B, which holds no tunnel: 503 there,
		// though the registry says relay A holds one.
		ca, err := pki.LoadCA(filepath.Join(stateDir, "ca.crt"), filepath.Join(stateDir, "ca.key"))
		require.NoError(t, err)
		id, err := peer.New(ca, "relay-c")
		require.NoError(t, err)
		tr := id.Transport()
		defer tr.CloseIdleConnections()
		req, err := http.NewRequest(http.MethodGet, "https://"+b.peerAddr+"/who", nil)
		require.NoError(t, err)
		req.Host = tmHost
		req.Header.Set(peer.HeaderHost, tmHost)
		req.Header.Set(peer.HeaderSource, "192.0.2.7:1234")
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		assert.Equal(t, peer.ErrNoTunnel, resp.Header.Get(tunnel.HeaderError))

		_, err = id.OpenConn(context.Background(), b.peerAddr, ptHost, "192.0.2.7:1234", 5*time.Second)
		var se *peer.StatusError
		require.ErrorAs(t, err, &se)
		assert.Equal(t, http.StatusServiceUnavailable, se.Code)

		// Relay A, which holds it, serves the same request.
		req.URL.Host = a.peerAddr
		resp, err = tr.RoundTrip(req)
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, http.StatusOK, resp.StatusCode)
		assert.Contains(t, string(body), "xff=192.0.2.7 ", "the source the peer named")
	})

	t.Run("a stale holder falls through to the next", func(t *testing.T) {
		// A replica still in the view (its lease not yet expired) whose
		// peer listener is gone, sorted before relay A.
		f.stale(fleet.Replica{ID: "relay-0", PeerAddr: freeAddr(t)}, ptUID, map[string]tunnel.Mode{"cluster-pt": tunnel.Passthrough})
		f.stale(fleet.Replica{ID: "relay-0", PeerAddr: freeAddr(t)}, tmUID, map[string]tunnel.Mode{"cluster-tm": tunnel.Terminate})
		pt.CloseIdleConnections()
		tm.CloseIdleConnections()
		code, _ := get(t, pt, "https://"+ptHost+"/who")
		assert.Equal(t, http.StatusOK, code)
		code, _ = get(t, tm, "https://"+tmHost+"/who")
		assert.Equal(t, http.StatusOK, code)
		// A body too: nothing of it was sent to the holder that is down.
		resp, err := tm.Post("https://"+tmHost+"/echo", "text/plain", strings.NewReader("kept for the next"))
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, "kept for the next", string(body))
	})

	t.Run("no holder left", func(t *testing.T) {
		a.stop()
		tm.CloseIdleConnections()
		code, body := get(t, tm, "https://"+tmHost+"/who")
		assert.Equal(t, http.StatusServiceUnavailable, code, body)
		assert.Contains(t, body, "no agent connected")
		assert.GreaterOrEqual(t, metric(t, b.srv, `spectro_proxy_forwarded_total{kind="http",result="failed"}`), 1.0)

		pt.CloseIdleConnections()
		_, err := pt.Get("https://" + ptHost + "/who")
		assert.ErrorContains(t, err, "internal error", "a TLS alert: there is no HTTP to explain in")
		assert.Equal(t, 1.0, metric(t, b.srv, `spectro_proxy_forwarded_total{kind="conn",result="failed"}`))
		assert.Equal(t, metric(t, b.srv, `spectro_proxy_refusals_total{reason="forward_failed"}`),
			metric(t, b.srv, `spectro_proxy_forwarded_total{kind="http",result="failed"}`)+1, "each failed forward is a refusal")
	})
}

// The same over a real etcd (the registry's Etcd): relay B learns from
// its watch that relay A holds the tunnels and forwards to it; a token
// revoked in etcd (as `token revoke --etcd-endpoints` does) ends its
// tunnel on relay A; relay A leaving withdraws its tunnels at once.
func TestFleetOnEtcd(t *testing.T) {
	etcd, err := testcluster.StartEtcd(context.Background(), t.TempDir(), testLog(t))
	if errors.Is(err, testcluster.ErrBinariesMissing) {
		t.Skip(err)
	}
	require.NoError(t, err)
	t.Cleanup(etcd.Close)
	const ptUID, tmUID = "pt", "tm"
	ptHost, tmHost := hostname.Host(hostname.DefaultSubdomain(ptUID), fleetDomain), hostname.Host(hostname.DefaultSubdomain(tmUID), fleetDomain)
	stateDir := t.TempDir()
	onEtcd := func(c *server.Config) { c.EtcdEndpoints = []string{etcd.Endpoint()}; c.LeaseTTL = 2 * time.Second }
	a := startRelayWith(t, "relay-a", peerListener(t), stateDir, onEtcd)
	b := startRelayWith(t, "relay-b", peerListener(t), stateDir, onEtcd)
	be := newAPIBackend(t, ptHost)
	startFleetAgent(t, a, stateDir, ptUID, tunnel.Passthrough, be)
	tmToken := startFleetAgent(t, a, stateDir, tmUID, tunnel.Terminate, be)
	relayPool := relayRoots(t, stateDir)
	pt := userClient(b, ptHost, be.roots)
	tm := userClient(b, tmHost, relayPool)
	defer pt.CloseIdleConnections()
	defer tm.CloseIdleConnections()

	status := func(c *http.Client, url string) int {
		resp, err := c.Get(url)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Eventually(t, func() bool { return status(tm, "https://"+tmHost+"/who") == http.StatusOK }, 10*time.Second, 20*time.Millisecond,
		"relay B forwards to relay A once its view has A's tunnels")
	assert.Equal(t, http.StatusOK, status(pt, "https://"+ptHost+"/who"))
	assert.Positive(t, metric(t, b.srv, `spectro_proxy_registry_replicas`), "the registry's metrics are the relay's")

	cfg := server.Config{EtcdEndpoints: []string{etcd.Endpoint()}}
	rev, err := server.NewEtcdRegistry(cfg, fleet.Replica{ID: "token-revoke"}, nil)
	require.NoError(t, err)
	require.NoError(t, rev.Revoke(context.Background(), tmToken, time.Time{}))
	require.NoError(t, rev.Close(context.Background()))
	require.Eventually(t, func() bool {
		return metric(t, a.srv, `spectro_proxy_refusals_total{reason="session_revoked"}`) >= 1
	}, 10*time.Second, 20*time.Millisecond, "relay A ends the revoked token's tunnel")
	tm.CloseIdleConnections()
	require.Eventually(t, func() bool { return status(tm, "https://"+tmHost+"/who") == http.StatusServiceUnavailable }, 10*time.Second, 20*time.Millisecond,
		"no tunnel for the revoked cluster anywhere: relay B says so as one that held it would")

	a.stop()
	pt.CloseIdleConnections()
	require.Eventually(t, func() bool { return status(pt, "https://"+ptHost+"/who") == 0 }, 5*time.Second, 20*time.Millisecond,
		"relay A's keys are gone with its lease: relay B knows no holder (well before the lease TTL)")
}

func relayRoots(t *testing.T, stateDir string) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(stateDir, "ca.crt"))
	require.NoError(t, err)
	p, err := pki.Pool(b)
	require.NoError(t, err)
	return p
}

// failingStart is the fake fleet's member whose Start fails (etcd
// unreachable until the serve context ended).
type failingStart struct {
	*fakeMember
	closed bool
}

func (f *failingStart) Start(context.Context) error { return errors.New("etcd unreachable") }
func (f *failingStart) Close(ctx context.Context) error {
	f.closed = true
	return f.fakeMember.Close(ctx)
}

// A relay that cannot join the fleet does not serve: Serve says why, and
// what Start began is stopped, the peer listener's port released.
func TestFleetJoinFails(t *testing.T) {
	stateDir := t.TempDir()
	peer := peerListener(t)
	peerAddr := peer.Addr().String()
	reg := &failingStart{fakeMember: newFakeFleet().member(fleet.Replica{ID: "r", PeerAddr: peerAddr}).(*fakeMember)}
	srv, err := server.New(server.Config{Domain: fleetDomain, StateDir: stateDir, ReplicaID: "r",
		PeerListen: peerAddr, PeerListener: peer, PeerAdvertise: peerAddr, Registry: reg, Logger: testLog(t)})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	err = srv.Serve(context.Background(), ln)
	require.ErrorContains(t, err, "joining the fleet's registry: etcd unreachable")
	assert.True(t, reg.closed)
	assert.False(t, ready(srv))
	again, err := net.Listen("tcp", peerAddr)
	require.NoError(t, err, "the peer listener's port is free again")
	again.Close()
}

// refusedRegistration registers a tunnel for routes with the token in
// tokFile at the relay on addr, expects a refusal and returns its answer.
func refusedRegistration(t *testing.T, addr string, roots *x509.CertPool, tokFile, routes string) *http.Response {
	t.Helper()
	tok, err := os.ReadFile(tokFile)
	require.NoError(t, err)
	d := websocket.Dialer{
		NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
		TLSClientConfig: &tls.Config{ServerName: fleetDomain, RootCAs: roots},
	}
	h := http.Header{"Authorization": {"Bearer " + string(tok)}, tunnel.HeaderAgent: {"x"}, tunnel.HeaderRoutes: {routes}}
	_, resp, err := d.Dial("wss://"+fleetDomain+tunnel.Path, h)
	require.Error(t, err, "the registration must be refused")
	require.NotNil(t, resp)
	return resp
}

// A connection to the relay's HTTPS server counts in flight from its
// opening (its TLS handshake) until its first request, or until it closes.
func TestInFlightHandshake(t *testing.T) {
	stateDir := t.TempDir()
	r := startFleetRelay(t, newFakeFleet(), "relay-a", stateDir)
	c, err := tls.Dial("tcp", r.addr, &tls.Config{ServerName: fleetDomain, RootCAs: relayRoots(t, stateDir)})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return r.srv.InFlight() == 1 }, 5*time.Second, 5*time.Millisecond,
		"in flight with one connection past its handshake and no request: %d", r.srv.InFlight())
	c.Close()
	require.Eventually(t, func() bool { return r.srv.InFlight() == 0 }, 5*time.Second, 5*time.Millisecond,
		"in flight after it closed: %d", r.srv.InFlight())

	// Its first request ends its freshness.
	cl := userClient(r, fleetDomain, relayRoots(t, stateDir))
	defer cl.CloseIdleConnections()
	code, _ := get(t, cl, "https://"+fleetDomain+"/healthz")
	assert.NotZero(t, code)
	assert.Equal(t, 0, r.srv.InFlight(), "a kept-alive connection after its request")
}
