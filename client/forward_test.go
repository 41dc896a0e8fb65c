package client

import (
	"bufio"
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// countingReader yields 'a' forever, counting what was read.
type countingReader struct{ n int64 }

func (c *countingReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'a'
	}
	c.n += int64(len(p))
	return len(p), nil
}

func newStreamClient(t *testing.T, mode tunnel.Mode) *Client {
	t.Helper()
	c, err := New(Config{Server: "proxy.test", ClusterUID: "abc", APIServer: "http://127.0.0.1:1", APIServerCAFile: "/nonexistent",
		K8sDashboardURL: "http://127.0.0.1:1", AgentID: "test", DialTimeout: time.Second, Mode: mode})
	require.NoError(t, err)
	return c
}

// An upgrade stream whose request line never ends is cut at the bound,
// however much the peer has to send.
func TestServeUpgradeBoundsRequestHeaders(t *testing.T) {
	c := newStreamClient(t, tunnel.Passthrough)
	src := &countingReader{}
	body := io.MultiReader(strings.NewReader("GET /"), io.LimitReader(src, 400<<20))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := (&http.Request{Method: http.MethodConnect, URL: &url.URL{}, Host: "cluster-abc-dashboard", ProtoMajor: 2,
		Header: http.Header{tunnel.HeaderStream: {tunnel.StreamUpgrade}}, Body: io.NopCloser(body)}).WithContext(ctx)
	c.serveStream(httptest.NewRecorder(), r)
	assert.LessOrEqual(t, src.n, int64(tunnel.MaxUpgradeRequestHeaderBytes), "read no more than the bound")
}

// The agent takes a raw or upgrade stream only where the route's mode
// calls for one, and plain requests only for terminate routes.
func TestServeStreamKindByMode(t *testing.T) {
	c := newStreamClient(t, tunnel.Passthrough)
	tests := []struct {
		name, method, host, kind, route string
		want                            int
	}{
		{"upgrade on a passthrough route", http.MethodConnect, "cluster-abc", tunnel.StreamUpgrade, "", http.StatusForbidden},
		{"raw stream on a terminate route", http.MethodConnect, "cluster-abc-dashboard", tunnel.StreamTCP, "", http.StatusForbidden},
		{"request for a passthrough route", http.MethodGet, "cluster-abc.proxy.test", "", "cluster-abc", http.StatusForbidden},
		{"HTTP connection on a passthrough route", http.MethodConnect, "cluster-abc", tunnel.StreamHTTP, "", http.StatusForbidden},
		{"HTTP connection to a target that is down", http.MethodConnect, "cluster-abc-dashboard", tunnel.StreamHTTP, "", http.StatusBadGateway},
		{"HTTP/2 connection on a passthrough route", http.MethodConnect, "cluster-abc", tunnel.StreamH2, "", http.StatusForbidden},
		{"HTTP/2 connection to a dashboard", http.MethodConnect, "cluster-abc-dashboard", tunnel.StreamH2, "", http.StatusForbidden},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &http.Request{Method: tc.method, URL: &url.URL{Path: "/"}, Host: tc.host, ProtoMajor: 2,
				Header: http.Header{tunnel.HeaderStream: {tc.kind}, tunnel.HeaderRoute: {tc.route}}, Body: http.NoBody}
			w := httptest.NewRecorder()
			c.serveStream(w, r)
			assert.Equal(t, tc.want, w.Code)
			if tc.want == http.StatusBadGateway {
				assert.Contains(t, w.Header().Get(tunnel.HeaderError), "could not reach 127.0.0.1:1", "the refusal names the target")
			}
		})
	}
}

// Terminate mode: requests without a body that end soon reach the API
// server over HTTP/1.1 keep-alive connections; watches, followed logs and
// requests with a body over one HTTP/2 connection (however many there
// are).
func TestTerminateProtocolToTarget(t *testing.T) {
	var mu sync.Mutex
	conns := map[string]map[string]bool{} // protocol -> client addresses
	backend := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if conns[r.Proto] == nil {
			conns[r.Proto] = map[string]bool{}
		}
		conns[r.Proto][r.RemoteAddr] = true
		mu.Unlock()
		io.WriteString(w, r.Proto)
	}))
	backend.EnableHTTP2 = true
	backend.StartTLS()
	defer backend.Close()
	c := newTerminateClient(t, backend)

	do := func(method, uri string, body io.Reader) string {
		r := httptest.NewRequest(method, uri, body)
		r.Host = "cluster-abc.proxy.test"
		r.Header.Set(tunnel.HeaderRoute, "cluster-abc")
		w := httptest.NewRecorder()
		c.serveStream(w, r)
		require.Equal(t, http.StatusOK, w.Code, w.Body.String())
		return w.Body.String()
	}
	for range 3 {
		assert.Equal(t, "HTTP/1.1", do(http.MethodGet, "/api/v1/namespaces/default/pods", nil))
		assert.Equal(t, "HTTP/1.1", do(http.MethodDelete, "/api/v1/namespaces/default/pods/web", nil))
		assert.Equal(t, "HTTP/2.0", do(http.MethodGet, "/api/v1/namespaces/default/pods?watch=true", nil))
		assert.Equal(t, "HTTP/2.0", do(http.MethodGet, "/api/v1/namespaces/default/pods/web/log?follow=true", nil))
		assert.Equal(t, "HTTP/2.0", do(http.MethodPost, "/api/v1/namespaces/default/pods", strings.NewReader("{}")))
	}
	mu.Lock()
	defer mu.Unlock()
	assert.Len(t, conns["HTTP/1.1"], 1, "short requests reuse a keep-alive connection")
	assert.Len(t, conns["HTTP/2.0"], 1, "the others share one HTTP/2 connection")
}

// An HTTP connection stream (tunnel.StreamHTTP) is joined to one
// connection of the agent's own to the target, over TLS offering only
// HTTP/1.1: the relay's requests arrive as written, keep-alive, and the
// answers come back in the same bytes.
func TestServeHTTPConnection(t *testing.T) {
	type seen struct{ proto, remote, host, xff string }
	var mu sync.Mutex
	var got []seen
	backend := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, seen{r.Proto, r.RemoteAddr, r.Host, r.Header.Get("X-Forwarded-For")})
		mu.Unlock()
		io.WriteString(w, r.URL.Path)
	}))
	backend.EnableHTTP2 = true // offered; the agent must not take it
	backend.StartTLS()
	defer backend.Close()
	c := newTerminateClient(t, backend)

	ctx := context.Background()
	cc := tunnelTo(t, c)
	st := tunnel.OpenStreamEarly(ctx, cc, "cluster-abc", tunnel.StreamHTTP, 5*time.Second)
	defer st.Close()
	br := bufio.NewReader(st)
	for _, path := range []string{"/api", "/apis"} {
		req := httptest.NewRequest(http.MethodGet, path, nil)
		req.Host = "cluster-abc.proxy.test"
		req.Header.Set("X-Forwarded-For", "192.0.2.7")
		require.NoError(t, req.Write(st))
		resp, err := http.ReadResponse(br, req)
		require.NoError(t, err)
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		assert.Equal(t, path, string(body))
	}
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, got, 2)
	for _, s := range got {
		assert.Equal(t, seen{"HTTP/1.1", got[0].remote, "cluster-abc.proxy.test", "192.0.2.7"}, s, "one keep-alive HTTP/1.1 connection, headers as the relay wrote them")
	}
}

// tunnelTo serves c's streams on a tunnel over a pipe and returns the
// relay's end of it; both end with the test.
//
//lint:ignore SA1019 x/net/http2 is what the tunnel itself uses (see internal/tunnel/relay.go)
func tunnelTo(t *testing.T, c *Client) *http2.ClientConn {
	t.Helper()
	relayEnd, agentEnd := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	srv := tunnel.NewAgentServer(http.HandlerFunc(c.serveStream), 10, tunnel.DefaultLiveness)
	served := make(chan struct{})
	go func() { srv.ServeConn(ctx, agentEnd); close(served) }()
	rt, err := tunnel.NewRelayTransport(tunnel.DefaultLiveness)
	require.NoError(t, err)
	cc, err := rt.NewClientConn(relayEnd)
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close(); cancel(); <-served })
	return cc
}

// newTerminateClient is an agent in terminate mode whose API server is
// backend (trusted by its certificate).
func newTerminateClient(t *testing.T, backend *httptest.Server) *Client {
	t.Helper()
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: backend.Certificate().Raw}), 0o600))
	c, err := New(Config{Server: "proxy.test", ClusterUID: "abc", APIServer: backend.URL, APIServerCAFile: caFile,
		AgentID: "test", DialTimeout: 5 * time.Second, Mode: tunnel.Terminate})
	require.NoError(t, err)
	return c
}

// An HTTP/2 connection stream (tunnel.StreamH2) is joined to a connection
// of the agent's own to the API server that negotiated h2, and carries
// what the relay splices onto it as it is; a target without HTTP/2 is
// refused with 505, which tells the relay to stop asking.
func TestServeH2Connection(t *testing.T) {
	for _, h2 := range []bool{true, false} {
		t.Run(fmt.Sprintf("target speaks HTTP/2: %v", h2), func(t *testing.T) {
			backend := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				fmt.Fprintf(w, "%s %s", r.Proto, r.Header.Get("X-Forwarded-For"))
			}))
			backend.EnableHTTP2 = h2
			backend.StartTLS()
			defer backend.Close()
			c := newTerminateClient(t, backend)

			ctx := context.Background()
			st, err := tunnel.OpenStream(ctx, tunnelTo(t, c), "cluster-abc", tunnel.StreamH2, 5*time.Second)
			if !h2 {
				var re *tunnel.RefusedError
				require.ErrorAs(t, err, &re)
				assert.Equal(t, http.StatusHTTPVersionNotSupported, re.Code)
				assert.Contains(t, re.Reason, "does not speak HTTP/2", "the refusal says why")
				return
			}
			require.NoError(t, err)
			defer st.Close()
			// The stream is the API server's HTTP/2 connection: a client
			// speaks HTTP/2 on it directly.
			//lint:ignore SA1019 x/net/http2 is what the tunnel itself uses (see internal/tunnel/relay.go)
			h2c, err := (&http2.Transport{}).NewClientConn(streamConn{st})
			require.NoError(t, err)
			defer h2c.Close()
			for range 3 {
				req := httptest.NewRequest(http.MethodGet, "https://cluster-abc.proxy.test/x", nil)
				req.Header.Set("X-Forwarded-For", "192.0.2.7")
				resp, err := h2c.RoundTrip(req)
				require.NoError(t, err)
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				require.NoError(t, err)
				assert.Equal(t, "HTTP/2.0 192.0.2.7", string(body))
			}
		})
	}
}

// streamConn is a stream as the net.Conn an HTTP/2 client wants.
type streamConn struct{ *tunnel.Stream }

func (streamConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (streamConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (streamConn) SetDeadline(time.Time) error      { return nil }
func (streamConn) SetReadDeadline(time.Time) error  { return nil }
func (streamConn) SetWriteDeadline(time.Time) error { return nil }
