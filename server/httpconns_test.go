package server_test

import (
	"bufio"
	"bytes"
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
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/relaytest"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

// recordingAgent is an agent's tunnel end that answers every request "ok"
// and records how each came: "http" on an HTTP connection stream (and
// which of them), "h2" as an HTTP/2 request on the tunnel.
type recordingAgent struct {
	mu       sync.Mutex
	seen     []string // "<how> <method> <path>"
	conns    int      // HTTP connection streams opened
	internal []string // Spectro-Proxy-* fields that reached the target
	refuse   string   // when set, HTTP connection streams are refused with it
	// hugeHeader, when set, is the size of a header field every answer on
	// an HTTP connection stream starts with (a target's, written by the
	// agent unread).
	hugeHeader int
}

func (a *recordingAgent) record(how string, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.seen = append(a.seen, how+" "+r.Method+" "+r.URL.RequestURI())
	for k := range r.Header {
		if strings.HasPrefix(k, "Spectro-Proxy-") && !(how == "h2" && k == tunnel.HeaderRoute) {
			a.internal = append(a.internal, k)
		}
	}
}

func (a *recordingAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		io.Copy(io.Discard, r.Body)
		a.record("h2", r)
		io.WriteString(w, "ok")
		return
	}
	if r.Header.Get(tunnel.HeaderStream) != tunnel.StreamHTTP {
		tunnel.RefuseStream(w, http.StatusBadRequest, "unknown stream kind")
		return
	}
	a.mu.Lock()
	a.conns++
	a.mu.Unlock()
	if a.refuse != "" {
		tunnel.RefuseStream(w, http.StatusBadGateway, a.refuse)
		return
	}
	st, err := tunnel.AcceptStream(w, r)
	if err != nil {
		return
	}
	br := bufio.NewReader(st)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		a.record("http", req)
		if a.hugeHeader > 0 {
			io.WriteString(st, "HTTP/1.1 200 OK\r\nX-Huge: ")
			st.Write(bytes.Repeat([]byte("a"), a.hugeHeader)) // fails once the relay has closed the stream
			return
		}
		resp := &http.Response{StatusCode: http.StatusOK, ProtoMajor: 1, ProtoMinor: 1, ContentLength: 2,
			Body: io.NopCloser(strings.NewReader("ok")), Header: http.Header{}}
		if err := resp.Write(st); err != nil {
			return
		}
	}
}

// startRecordingAgent connects a to relay r for cluster uid's terminate
// route, listing StreamHTTP in its tunnel request when httpStreams is set
// (an agent that predates it does not).
// It returns the agent's server and a channel closed when it has stopped
// serving the tunnel.
func startRecordingAgent(t *testing.T, r *relaytest.Relay, a *recordingAgent, httpStreams bool) (*tunnel.AgentServer, <-chan struct{}) {
	t.Helper()
	tok, err := os.ReadFile(r.IssueToken(t, uid))
	require.NoError(t, err)
	d := websocket.Dialer{
		NetDialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", r.Addr)
		},
		TLSClientConfig: &tls.Config{ServerName: relaytest.Domain, RootCAs: r.CAPool(t)},
	}
	h := http.Header{}
	h.Set("Authorization", "Bearer "+string(tok))
	h.Set(tunnel.HeaderAgent, "recording-agent")
	h.Set(tunnel.HeaderRoutes, hostname.DefaultSubdomain(uid)+"=terminate")
	if httpStreams {
		h.Set(tunnel.HeaderStreams, tunnel.StreamHTTP)
	}
	ws, _, err := d.DialContext(t.Context(), "wss://"+relaytest.Domain+tunnel.Path, h)
	require.NoError(t, err)
	srv := tunnel.NewAgentServer(a, 100, tunnel.Liveness{}.WithDefaults())
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { defer close(served); srv.ServeConn(ctx, tunnel.NewConn(ws)) }()
	t.Cleanup(func() { cancel(); <-served })
	require.Eventually(t, func() bool { return r.Srv.Tunnels() == 1 }, 5*time.Second, 5*time.Millisecond)
	return srv, served
}

// Terminate mode: an HTTP/1.1 user's connection is spliced onto one HTTP
// connection stream of an agent that serves them. Request by request
// (--no-splice), requests without a body that end soon go as HTTP/1.1 on
// kept-alive HTTP connection streams, the rest as HTTP/2 requests; an
// agent that predates HTTP connection streams gets every request as
// HTTP/2. No way do a user's Spectro-Proxy-* fields reach the target.
func TestTerminateRequestsByAgent(t *testing.T) {
	tests := []struct {
		name        string
		httpStreams bool
		noSplice    bool
		want        []string
		wantConns   int
	}{
		{name: "spliced onto an HTTP connection", httpStreams: true, wantConns: 1, want: []string{
			"http GET /api/v1/pods", "http GET /api/v1/pods?watch=true", "http POST /api/v1/pods",
			"http DELETE /api/v1/pods/web", "http GET /api/v1/pods/web/log?follow=1", "http GET /api/v1/pods?watch=false",
		}},
		{name: "agent serves HTTP connections, request by request", httpStreams: true, noSplice: true, wantConns: 1, want: []string{
			"http GET /api/v1/pods", "h2 GET /api/v1/pods?watch=true", "h2 POST /api/v1/pods",
			"h2 DELETE /api/v1/pods/web", "h2 GET /api/v1/pods/web/log?follow=1", "http GET /api/v1/pods?watch=false",
		}},
		{name: "agent that predates them", httpStreams: false, wantConns: 0, want: []string{
			"h2 GET /api/v1/pods", "h2 GET /api/v1/pods?watch=true", "h2 POST /api/v1/pods",
			"h2 DELETE /api/v1/pods/web", "h2 GET /api/v1/pods/web/log?follow=1", "h2 GET /api/v1/pods?watch=false",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := relaytest.StartRelay(t, t.TempDir(), "relay-a", func(c *server.Config) { c.NoSplice = tc.noSplice })
			a := &recordingAgent{}
			startRecordingAgent(t, r, a, tc.httpStreams)
			user := drainUser(t, r, false)
			for _, req := range []struct{ method, path, body string }{
				{http.MethodGet, "/api/v1/pods", ""},
				{http.MethodGet, "/api/v1/pods?watch=true", ""},
				{http.MethodPost, "/api/v1/pods", "{}"},
				{http.MethodDelete, "/api/v1/pods/web", ""},
				{http.MethodGet, "/api/v1/pods/web/log?follow=1", ""},
				{http.MethodGet, "/api/v1/pods?watch=false", ""},
			} {
				var body io.Reader
				if req.body != "" {
					body = strings.NewReader(req.body)
				}
				hr, err := http.NewRequest(req.method, clusterURL(req.path), body)
				require.NoError(t, err)
				hr.Header.Set(tunnel.HeaderRoute, "cluster-someone-else")
				hr.Header.Set(tunnel.HeaderStream, tunnel.StreamTCP)
				resp, err := user.Do(hr)
				require.NoError(t, err)
				got, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				require.Equal(t, http.StatusOK, resp.StatusCode, string(got))
				assert.Equal(t, "ok", string(got))
			}
			a.mu.Lock()
			defer a.mu.Unlock()
			assert.Equal(t, tc.want, a.seen)
			assert.Equal(t, tc.wantConns, a.conns, "the requests share one connection")
			assert.Empty(t, a.internal, "the tunnel's own fields reach the target only as the relay sets them")
		})
	}
}

// An agent that cannot reach its target refuses the HTTP connection
// stream; the user gets a 502 Status that carries the agent's reason.
func TestTerminateTargetDown(t *testing.T) {
	r := relaytest.StartRelay(t, t.TempDir(), "relay-a", nil)
	a := &recordingAgent{refuse: "spectro-proxy agent could not reach 10.96.0.1:443: connection refused"}
	startRecordingAgent(t, r, a, true)
	code, body := getThrough(t, r, "/api")
	assert.Equal(t, http.StatusBadGateway, code)
	assert.Contains(t, body, `"kind":"Status"`)
	assert.Contains(t, body, "could not reach 10.96.0.1:443: connection refused")
}

// A target whose answer's header section has no end (a tenant's dashboard,
// say) gets its connection closed at tunnel.MaxResponseHeaderBytes, and
// the user a 502 that says why.
func TestTerminateOversizedResponseHeaders(t *testing.T) {
	r := relaytest.StartRelay(t, t.TempDir(), "relay-a", nil)
	a := &recordingAgent{hugeHeader: 4 * tunnel.MaxResponseHeaderBytes}
	startRecordingAgent(t, r, a, true)
	code, body := getThrough(t, r, "/api")
	assert.Equal(t, http.StatusBadGateway, code)
	assert.Contains(t, body, "header section too large (limit 1048576 bytes)")
	assert.Contains(t, scrape(t, r.Srv), `spectro_proxy_refusals_total{reason="upstream_headers_too_large"} 1`)
}

// getThrough GETs path from the cluster through relay r and returns the
// status and body.
func getThrough(t *testing.T, r *relaytest.Relay, path string) (int, string) {
	t.Helper()
	return get(t, drainUser(t, r, false), clusterURL(path))
}

// An agent that moves or stops shuts its tunnel down gracefully: the
// relay closes its idle kept-alive connections on that tunnel (spliced
// ones, and those of its own pool), so the shutdown ends once the
// requests in flight have, not at the agent's drain timeout.
func TestAgentShutdownClosesIdleConnections(t *testing.T) {
	for _, noSplice := range []bool{false, true} {
		t.Run(fmt.Sprintf("noSplice=%v", noSplice), func(t *testing.T) {
			r := relaytest.StartRelay(t, t.TempDir(), "relay-a", func(c *server.Config) { c.NoSplice = noSplice })
			a := &recordingAgent{}
			srv, served := startRecordingAgent(t, r, a, true)
			user := drainUser(t, r, false)
			for range 3 {
				code, body := get(t, user, clusterURL("/api"))
				require.Equal(t, http.StatusOK, code, body)
			}
			a.mu.Lock()
			require.Equal(t, 1, a.conns, "one kept-alive connection")
			a.mu.Unlock()

			const drainTimeout = 10 * time.Second
			ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
			defer cancel()
			start := time.Now()
			require.NoError(t, srv.Shutdown(ctx)) // sends GOAWAY
			select {
			case <-served:
				t.Logf("tunnel shut down gracefully in %v", time.Since(start).Round(time.Millisecond))
			case <-ctx.Done():
				t.Fatalf("the tunnel's graceful shutdown still waits after %v: an idle connection holds it", drainTimeout)
			}
		})
	}
}

// A target that closes its idle kept-alive connections (the API server
// does after its idle timeout; dashboards often sooner) costs the user
// nothing: the relay's next request on such a connection finds it ended
// and goes again on a new one, through the real agent.
func TestTerminateTargetClosesIdleConnections(t *testing.T) {
	r := relaytest.StartRelay(t, t.TempDir(), "relay-a", nil)
	var mu sync.Mutex
	remotes := map[string]bool{}
	target := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		mu.Lock()
		remotes[req.RemoteAddr] = true
		mu.Unlock()
		io.WriteString(w, "ok "+req.URL.Path)
	}))
	target.StartTLS()
	t.Cleanup(target.Close)
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: target.Certificate().Raw}), 0o600))
	relaytest.StartAgent(t, client.Config{
		RelayAddress: r.Addr, RelayCAFile: r.CAFile(), ClusterUID: uid, TokenFile: r.IssueToken(t, uid),
		AgentID: "agent-0", Mode: tunnel.Terminate, APIServer: target.URL, APIServerCAFile: caFile, Tunnels: "1",
	})
	require.Eventually(t, func() bool { return r.Srv.Tunnels() == 1 }, 10*time.Second, 5*time.Millisecond)

	user := drainUser(t, r, false)
	for i := range 5 {
		for _, m := range []string{http.MethodGet, http.MethodHead} {
			req, err := http.NewRequest(m, clusterURL(fmt.Sprintf("/api/%d", i)), nil)
			require.NoError(t, err)
			resp, err := user.Do(req)
			require.NoError(t, err)
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			require.Equal(t, http.StatusOK, resp.StatusCode, "%s %d: %s", m, i, body)
			if m == http.MethodGet {
				assert.Equal(t, fmt.Sprintf("ok /api/%d", i), string(body))
			}
		}
		target.CloseClientConnections() // all idle now: as an idle timeout would
	}
	mu.Lock()
	defer mu.Unlock()
	assert.Len(t, remotes, 5, "each round after the first comes on a new connection to the target")
}
