package server_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	fleet "github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/relaytest"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

const uid = "drain"

// twoRelays is two relays that say the fleet has two replicas; the test
// decides which of them the agents reach.
func twoRelays(t *testing.T, drainTimeout time.Duration) (a, b *relaytest.Relay) {
	t.Helper()
	dir := t.TempDir()
	tweak := func(c *server.Config) {
		c.Replicas = func() int { return 2 }
		c.DrainTimeout = drainTimeout
	}
	a = relaytest.StartRelay(t, dir, "relay-a", tweak)
	b = relaytest.StartRelay(t, dir, "relay-b", tweak)
	return a, b
}

// apiStandIn is a TLS server standing in for the API server: /slow
// tells arrived and answers when release is closed, /api/v1/pods?watch=true streams one
// JSON line every 20 ms until the client goes.
func apiStandIn(t *testing.T, arrived chan<- struct{}, release <-chan struct{}, h2 bool) (url, caFile string) {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/slow":
			arrived <- struct{}{}
			select {
			case <-release:
				fmt.Fprint(w, "slow done")
			case <-r.Context().Done():
			}
		case r.URL.Query().Get("watch") == "true":
			w.Header().Set("Content-Type", "application/json")
			rc := http.NewResponseController(w)
			for i := 0; ; i++ {
				fmt.Fprintf(w, `{"type":"ADDED","object":{"n":%d,"pad":"%s"}}`+"\n", i, strings.Repeat("x", 100))
				if rc.Flush() != nil {
					return
				}
				select {
				case <-r.Context().Done():
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		default:
			fmt.Fprint(w, "ok")
		}
	}))
	srv.EnableHTTP2 = h2 // with HTTP/2 an HTTP/2 user's connection is spliced onto it
	srv.StartTLS()
	t.Cleanup(srv.Close)
	caFile = filepath.Join(t.TempDir(), "ca.crt")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600))
	return srv.URL, caFile
}

// drainUser sends requests for the cluster to relay r directly, over
// HTTP/1.1 or, with h2, HTTP/2 (as kubectl does).
func drainUser(t *testing.T, r *relaytest.Relay, h2 bool) *http.Client {
	host := hostname.Host(hostname.DefaultSubdomain(uid), relaytest.Domain)
	if !h2 {
		return &http.Client{Transport: &http.Transport{DialTLSContext: r.TLSDialer(t, host)}}
	}
	return &http.Client{Transport: &http.Transport{DialTLSContext: r.TLSDialer(t, host, "h2"), ForceAttemptHTTP2: true}}
}

func clusterURL(path string) string {
	return "https://" + hostname.Host(hostname.DefaultSubdomain(uid), relaytest.Domain) + path
}

// A relay told to stop (its serve context ends, as on SIGTERM) while a
// second relay is up: the agent's replacement tunnel lands on the other
// relay before the old one closes (the agent never has zero tunnels), a
// request in flight on the old tunnel finishes, and a watch through the
// draining relay gets a clean end of its body at an event boundary, over
// HTTP/1.1 (the last chunk) and HTTP/2 (END_STREAM). A spliced HTTP/2
// connection (an API server that speaks HTTP/2) is closed once only the
// watch is left on it, after the GOAWAY of the drain's start: the client
// reads what client-go takes for the watch's end, long before the drain's
// timeout.
func TestDrainMovesTheAgent(t *testing.T) {
	for _, tc := range []struct {
		name        string
		h2, spliced bool
	}{{"http1", false, false}, {"h2", true, false}, {"h2 spliced", true, true}} {
		t.Run(tc.name, func(t *testing.T) { testDrainMovesTheAgent(t, tc.h2, tc.spliced) })
	}
}

func testDrainMovesTheAgent(t *testing.T, h2, spliced bool) {
	const drainTimeout = 20 * time.Second
	a, b := twoRelays(t, drainTimeout)
	arrived, release := make(chan struct{}, 1), make(chan struct{})
	api, caFile := apiStandIn(t, arrived, release, spliced)
	lb := relaytest.StartLB(t, a.Addr) // the agent's first tunnel lands on a
	agent := relaytest.StartAgent(t, client.Config{
		RelayAddress: lb.Addr, RelayCAFile: a.CAFile(), ClusterUID: uid, TokenFile: a.IssueToken(t, uid),
		AgentID: "agent-0", Mode: tunnel.Terminate, APIServer: api, APIServerCAFile: caFile, Tunnels: "1",
		HealthAddr: "", DrainTimeout: 10 * time.Second,
	})
	require.Eventually(t, func() bool { return a.Srv.Tunnels() == 1 }, 10*time.Second, 5*time.Millisecond, "agent never reached relay a")
	lb.SetBackends(a.Addr, b.Addr)

	users := drainUser(t, a, h2)
	// A request that is in flight through a's tunnel when a drains.
	slow := make(chan error, 1)
	go func() {
		resp, err := users.Get(clusterURL("/slow"))
		if err == nil {
			var body []byte
			body, err = io.ReadAll(resp.Body)
			resp.Body.Close()
			if err == nil && (resp.StatusCode != http.StatusOK || string(body) != "slow done") {
				err = fmt.Errorf("slow request: %s %q", resp.Status, body)
			}
		}
		slow <- err
	}()
	// A watch through a.
	resp, err := users.Get(clusterURL("/api/v1/pods?watch=true"))
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, map[bool]int{false: 1, true: 2}[h2], resp.ProtoMajor)
	watch := bufio.NewReader(resp.Body)
	_, err = watch.ReadString('\n')
	require.NoError(t, err)

	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("the slow request never reached the API server")
	}

	if spliced {
		m := scrape(t, a.Srv)
		// One connection, or two when the client dialed a second for the
		// slow request before the first was up: spliced either way, and
		// nothing goes request by request.
		assert.Regexp(t, `spectro_proxy_streams_open\{kind="spliced"\} [12]\n`, m, "the connections of the watch and the slow request are spliced")
		assert.NotRegexp(t, `spectro_proxy_streams_open\{kind="http"\} [1-9]`, m)
	}
	least := relaytest.SampleMin(agent.C.Tunnels)
	stopAt := time.Now()
	a.Terminate()
	// b registers the replacement a moment before the agent reads its 101.
	require.Eventually(t, func() bool { return b.Srv.Tunnels() == 1 && agent.C.Tunnels() == 2 }, 15*time.Second, 5*time.Millisecond,
		"the replacement tunnel never reached relay b")
	// The slow request still holds the old tunnel.
	assert.Equal(t, 1, a.Srv.Tunnels(), "the old tunnel is still up while its request runs")
	metrics := scrape(t, a.Srv)
	assert.Contains(t, metrics, "spectro_proxy_draining 1")
	close(release)
	require.NoError(t, <-slow, "the request in flight on the old tunnel finishes")

	// The watch ends cleanly, on a line boundary: no error, no partial
	// event.
	rest, err := io.ReadAll(watch)
	if spliced && err != nil {
		// utilnet.IsProbableEOF: client-go's watch ends without an error.
		require.ErrorContains(t, err, "server sent GOAWAY and closed the connection")
		rest = rest[:strings.LastIndexByte(string(rest), '\n')+1] // the event cut short is not one
	} else {
		require.NoError(t, err, "the watch's body ends cleanly")
	}
	if len(rest) > 0 {
		assert.True(t, strings.HasSuffix(string(rest), "\n"), "the watch ends at an event boundary: %q", rest)
	}
	for line := range strings.Lines(string(rest)) {
		assert.True(t, strings.HasPrefix(line, `{"type":"ADDED"`), "whole events only: %q", line)
	}

	require.NoError(t, a.Wait())
	assert.Less(t, time.Since(stopAt), drainTimeout/2, "the watch did not hold the drain to its timeout")
	require.Eventually(t, func() bool { return agent.C.Tunnels() == 1 }, 10*time.Second, 5*time.Millisecond)
	assert.GreaterOrEqual(t, least(), 1, "the agent had a tunnel at every moment")
	assert.Equal(t, 1, b.Srv.Tunnels())

	// The cluster answers through b.
	resp2, err := drainUser(t, b, h2).Get(clusterURL("/"))
	require.NoError(t, err)
	body, _ := io.ReadAll(resp2.Body)
	resp2.Body.Close()
	assert.Equal(t, "ok", string(body))

	if spliced {
		// That client keeps its connection, spliced and idle: the agent
		// stopping is not held by it to its drain timeout (retireSplices).
		start := time.Now()
		agent.Stop()
		assert.Less(t, time.Since(start), 5*time.Second, "the agent's stop waited for an idle connection")
	}
}

// A relay that drains while its agent cannot move (no other replica to
// take it): once the moves are given up and no other request is open, the
// spliced connection that carries only a watch is closed, as the other
// path's watches are ended, before the drain's timeout cuts the rest.
func TestDrainEndsSplicedWatches(t *testing.T) {
	const drainTimeout = 6 * time.Second
	a := relaytest.StartRelay(t, t.TempDir(), "relay-a", func(c *server.Config) { c.DrainTimeout = drainTimeout })
	api, caFile := apiStandIn(t, make(chan struct{}, 1), make(chan struct{}), true)
	relaytest.StartAgent(t, client.Config{
		RelayAddress: a.Addr, RelayCAFile: a.CAFile(), ClusterUID: uid, TokenFile: a.IssueToken(t, uid),
		AgentID: "agent-0", Mode: tunnel.Terminate, APIServer: api, APIServerCAFile: caFile, Tunnels: "1",
		HealthAddr: "", DrainTimeout: 10 * time.Second,
	})
	require.Eventually(t, func() bool { return a.Srv.Tunnels() == 1 }, 10*time.Second, 5*time.Millisecond)
	resp, err := drainUser(t, a, true).Get(clusterURL("/api/v1/pods?watch=true"))
	require.NoError(t, err)
	defer resp.Body.Close()
	watch := bufio.NewReader(resp.Body)
	_, err = watch.ReadString('\n')
	require.NoError(t, err)
	assert.Contains(t, scrape(t, a.Srv), `spectro_proxy_streams_open{kind="spliced"} 1`)

	start := time.Now()
	a.Terminate()
	_, err = io.ReadAll(watch)
	took := time.Since(start)
	require.ErrorContains(t, err, "server sent GOAWAY and closed the connection", "what client-go takes for a watch's end")
	assert.Less(t, took, drainTimeout-time.Second, "closed when the drain ends watches, not at its timeout")
	require.NoError(t, a.Wait())
}

// An agent that predates move answers it with 400: the relay does not
// wait for it (the drain takes far less than half its timeout) and closes
// its tunnel at the end of the drain, as before. The tunnel's 101 names
// the replica and the fleet's size.
func TestDrainClosesAnOldAgent(t *testing.T) {
	a := relaytest.StartRelay(t, t.TempDir(), "relay-a", func(c *server.Config) {
		c.Replicas = func() int { return 2 }
		c.DrainTimeout = 20 * time.Second
		c.ShutdownDelay = 500 * time.Millisecond
	})
	tok, err := os.ReadFile(a.IssueToken(t, uid))
	require.NoError(t, err)
	d := websocket.Dialer{
		NetDialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", a.Addr)
		},
		TLSClientConfig: &tls.Config{ServerName: relaytest.Domain, RootCAs: a.CAPool(t)},
	}
	h := http.Header{}
	h.Set("Authorization", "Bearer "+string(tok))
	h.Set(tunnel.HeaderAgent, "old-agent")
	h.Set(tunnel.HeaderRoutes, hostname.DefaultSubdomain(uid)+"=terminate")
	ws, resp, err := d.DialContext(t.Context(), "wss://"+relaytest.Domain+tunnel.Path, h)
	require.NoError(t, err)
	assert.Equal(t, "relay-a", resp.Header.Get(tunnel.HeaderReplica))
	assert.Equal(t, "2", resp.Header.Get(tunnel.HeaderReplicas))
	conn := tunnel.NewConn(ws)
	// The old agent's stream handler: "move" is an unknown stream kind.
	var moves atomic.Int32
	srv := tunnel.NewAgentServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(tunnel.HeaderStream) == tunnel.StreamMove {
			moves.Add(1)
		}
		tunnel.RefuseStream(w, http.StatusBadRequest, "unknown stream kind")
	}), 100, tunnel.Liveness{}.WithDefaults())
	served := make(chan struct{})
	go func() { defer close(served); srv.ServeConn(context.Background(), conn) }()
	require.Eventually(t, func() bool { return a.Srv.Tunnels() == 1 }, 5*time.Second, 5*time.Millisecond)

	start := time.Now()
	a.Terminate()
	// During the shutdown delay: draining, and the old agent's tunnel is
	// one not moved.
	require.Eventually(t, func() bool {
		m := scrape(t, a.Srv)
		return strings.Contains(m, "spectro_proxy_draining 1") && strings.Contains(m, "spectro_proxy_drain_tunnels_remaining 1")
	}, 5*time.Second, 10*time.Millisecond, "drain metrics")
	require.NoError(t, a.Wait())
	assert.Less(t, time.Since(start), 5*time.Second, "the relay did not wait for an agent that cannot move")
	assert.Equal(t, int32(1), moves.Load(), "the relay asked once")
	select {
	case <-served:
	case <-time.After(5 * time.Second):
		t.Fatal("the old agent's tunnel was not closed at the end of the drain")
	}
}

func scrape(t *testing.T, s *server.Server) string {
	t.Helper()
	rec := httptest.NewRecorder()
	s.HealthHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	return rec.Body.String()
}

// With a fleet registry, an agent counts as moved as soon as another
// replica holds its labels: here its second tunnel, on b. The relay then
// does not wait for the first tunnel's replacement (which cannot land:
// the load balancer only knows the draining relay), and the agent keeps
// serving through b all along.
func TestDrainTrustsTheRegistry(t *testing.T) {
	f := newFakeFleet()
	dir := t.TempDir()
	tweak := func(id string) func(*server.Config) {
		return func(c *server.Config) {
			c.Registry = f.member(fleet.Replica{ID: id})
			c.DrainTimeout = 20 * time.Second
		}
	}
	a := relaytest.StartRelay(t, dir, "relay-a", tweak("relay-a"))
	b := relaytest.StartRelay(t, dir, "relay-b", tweak("relay-b"))
	lb := relaytest.StartLB(t, a.Addr)
	agent := relaytest.StartAgent(t, client.Config{
		RelayAddress: lb.Addr, RelayCAFile: a.CAFile(), ClusterUID: uid, TokenFile: a.IssueToken(t, uid),
		AgentID: "agent-0", Mode: tunnel.Passthrough, APIServer: "https://127.0.0.1:1", HealthAddr: "",
	})
	require.Eventually(t, func() bool { return a.Srv.Tunnels() == 1 && agent.C.Tunnels() == 1 }, 10*time.Second, 5*time.Millisecond)
	lb.SetBackends(b.Addr)
	require.Eventually(t, func() bool { return b.Srv.Tunnels() == 1 && agent.C.Tunnels() == 2 }, 10*time.Second, 5*time.Millisecond,
		"the second tunnel (the registry says two replicas) on b")
	lb.SetBackends(a.Addr)

	least := relaytest.SampleMin(agent.C.Tunnels)
	start := time.Now()
	require.NoError(t, a.Stop())
	assert.Less(t, time.Since(start), 5*time.Second, "the drain did not wait half its timeout for a move the registry shows done")
	assert.GreaterOrEqual(t, least(), 1, "the agent had a tunnel at every moment")
	assert.True(t, f.holds("relay-b", hostname.DefaultSubdomain(uid)))
}

// A watch that crosses the peer hop ends cleanly at a line whichever
// replica drains: the one the user reached (it forwarded the watch) or
// the one holding the tunnel (its clean end passes through the hop).
func TestDrainEndsForwardedWatches(t *testing.T) {
	for _, drained := range []string{"forwarder", "holder"} {
		t.Run(drained, func(t *testing.T) {
			fc := newForwardedCluster(t, "fw")
			host, holder, forwarder, be := fc.host, fc.holder, fc.forwarder, fc.be

			users := userClient(forwarder, host, relayRoots(t, fc.stateDir))
			users.Timeout = 0
			resp, err := users.Get("https://" + host + "/watch?watch=true")
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode)
			be.events <- `{"type":"ADDED"}`
			lines := bufio.NewReader(resp.Body)
			line, err := lines.ReadString('\n')
			require.NoError(t, err)
			assert.Equal(t, `{"type":"ADDED"}`+"\n", line)

			r := forwarder
			if drained == "holder" {
				r = holder
			}
			go r.stop()
			rest, err := io.ReadAll(lines)
			require.NoError(t, err, "the forwarded watch ends cleanly")
			assert.Empty(t, string(rest))
			r.stop()
		})
	}
}

// TestDrainCutsForwardedUpgrade: an upgrade (kubectl exec, a dashboard's
// WebSocket) forwarded to the replica holding the tunnel and left open by
// its client is cut when the drain times out, and the relay stops (it once
// waited on it forever: TestScaleOut's rolling restart).
func TestDrainCutsForwardedUpgrade(t *testing.T) {
	fc := newForwardedCluster(t, "fu")
	forwarder := fc.forwarder
	ws := fc.echoSession(t, forwarder, "/ws") // through the forwarder

	stopped := make(chan struct{})
	start := time.Now()
	go func() { forwarder.stop(); close(stopped) }()
	select {
	case <-stopped: // DrainTimeout is 2 s
		t.Logf("forwarder stopped after %v", time.Since(start).Round(time.Millisecond))
	case <-time.After(15 * time.Second):
		t.Fatal("the forwarder's drain waited on the open forwarded upgrade")
	}
	_, _, err := ws.ReadMessage()
	assert.Error(t, err, "the client's session was cut")
}

// forwardedCluster is a terminate-mode cluster whose agent holds its
// tunnel to one relay (holder) while users reach another (forwarder),
// which carries their traffic over its peer hop.
type forwardedCluster struct {
	host, stateDir    string
	holder, forwarder *fleetRelay
	be                *apiBackend
}

// newForwardedCluster starts both relays on one fake fleet and the agent
// of cluster uid, and waits until the fleet shows the holder's tunnel.
func newForwardedCluster(t *testing.T, uid string) forwardedCluster {
	t.Helper()
	fc := forwardedCluster{host: hostname.Host(hostname.DefaultSubdomain(uid), fleetDomain), stateDir: t.TempDir(), be: newAPIBackend(t)}
	f := newFakeFleet()
	fc.holder = startFleetRelay(t, f, "relay-a", fc.stateDir)
	fc.forwarder = startFleetRelay(t, f, "relay-b", fc.stateDir)
	startFleetAgent(t, fc.holder, fc.stateDir, uid, tunnel.Terminate, fc.be)
	require.Eventually(t, func() bool { return f.holds("relay-a", hostname.DefaultSubdomain(uid)) }, 5*time.Second, 10*time.Millisecond)
	return fc
}

// TestDrainCutsHalfClosedUpgrade: an upgrade whose backend has ended its
// side while the user keeps the connection and sends nothing (an exec
// session left open after the command's output) is cut by the drain's
// hard stop, on the replica holding the tunnel and on one forwarding to
// it. ReverseProxy waits for the user's side once the backend ended
// cleanly; the relay once waited with it, forever.
func TestDrainCutsHalfClosedUpgrade(t *testing.T) {
	for _, via := range []string{"holder", "forwarder"} {
		t.Run(via, func(t *testing.T) {
			fc := newForwardedCluster(t, "hc"+via[:1])
			r := fc.holder
			if via == "forwarder" {
				r = fc.forwarder
			}
			ws := fc.echoSession(t, r, "/ws-once")
			_, _, err := ws.ReadMessage()
			require.Error(t, err, "the backend's end reaches the user (a half-close)")

			stopped := make(chan struct{})
			start := time.Now()
			go func() { r.stop(); close(stopped) }()
			select {
			case <-stopped: // DrainTimeout is 2 s
				t.Logf("%s stopped after %v", via, time.Since(start).Round(time.Millisecond))
			case <-time.After(15 * time.Second):
				t.Fatalf("the %s's drain waited on the half-closed upgrade", via)
			}
		})
	}
}

// echoSession opens a WebSocket to the backend's path through relay r and
// checks that one message is echoed. The test's end closes it.
func (fc forwardedCluster) echoSession(t *testing.T, r *fleetRelay, path string) *websocket.Conn {
	t.Helper()
	d := websocket.Dialer{
		NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		},
		TLSClientConfig: &tls.Config{ServerName: fc.host, RootCAs: relayRoots(t, fc.stateDir)},
	}
	ws, resp, err := d.Dial("wss://"+fc.host+path, nil)
	require.NoError(t, err)
	t.Cleanup(func() { ws.Close() })
	require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	require.NoError(t, ws.WriteMessage(websocket.TextMessage, []byte("hi")))
	_, got, err := ws.ReadMessage()
	require.NoError(t, err)
	require.Equal(t, "echo hi", string(got))
	return ws
}
