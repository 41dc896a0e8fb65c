package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

// otherSource dials from 127.0.0.2, so per-source limits see a second
// client on the same machine (all of 127/8 is loopback on Linux).
var otherSource = &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: 5 * time.Second}

// heapMiB is the live heap after a collection.
func heapMiB() float64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return float64(ms.HeapAlloc) / (1 << 20)
}

// parallel runs f(i) for i < n on workers goroutines and waits.
func parallel(n, workers int, f func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				f(i)
			}
		})
	}
	wg.Wait()
}

func TestAbuseSlowlorisOnPublicPort(t *testing.T) {
	const (
		perSource = 100
		conns     = 300
		// Long enough that all 300 sockets are open before the first
		// times out, even on a loaded machine (CI once took over 1s to
		// open them, so early ones timed out and freed slots for later
		// ones: 140/160 instead of 200/100).
		hello = 5 * time.Second
	)
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) {
		c.HelloTimeout = hello
		c.MaxPendingHellosPerSource = perSource
	})
	before := heapMiB()
	start := time.Now()
	held := make([]net.Conn, 0, conns)
	for range conns {
		require.Less(t, time.Since(start), hello, "opening the sockets took longer than the hello timeout: the split below would not hold")
		c, err := net.Dial("tcp", r.addr)
		require.NoError(t, err)
		// Half a record header, then silence.
		_, err = c.Write([]byte{0x16, 0x03})
		require.NoError(t, err)
		held = append(held, c)
	}
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	// While the flood holds its sockets, another client still gets in.
	legit := &tls.Dialer{NetDialer: otherSource, Config: &tls.Config{ServerName: domain, RootCAs: r.caPool(t)}}
	lc, err := legit.Dial("tcp", r.addr)
	require.NoError(t, err, "a client from another address is served during the flood")
	lc.Close()
	during := heapMiB()

	// Every held socket is closed by the relay: the ones over the cap at
	// once, the rest when the hello timeout is up.
	closedBy := make([]time.Duration, conns)
	parallel(conns, 50, func(i int) {
		held[i].SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.Copy(io.Discard, held[i])
		closedBy[i] = time.Since(start)
		// EOF or a reset (the relay did not read what we sent), but not
		// our own deadline.
		var ne net.Error
		assert.False(t, errors.As(err, &ne) && ne.Timeout(), "closed by the relay, not left to our deadline")
	})
	var slowest time.Duration
	for _, d := range closedBy {
		slowest = max(slowest, d)
	}
	m := r.metrics(t)
	assert.Equal(t, float64(conns-perSource), m[refusals("too_many_pending_hellos")])
	assert.Equal(t, float64(perSource), m[refusals("hello_timeout")])
	assert.Less(t, slowest, hello+3*time.Second)
	figure(t, "slowloris before the ClientHello: 300 silent sockets from one address",
		fmt.Sprintf("%d closed at once (per-source cap %d), %d at the %v hello timeout, all by %v; heap +%.1f MiB; other address served",
			conns-perSource, perSource, perSource, hello, slowest.Round(10*time.Millisecond), during-before),
		"all closed by hello timeout; bounded memory")
}

func TestAbuseSlowHeadersAndOversizedHeaders(t *testing.T) {
	const headerTimeout = time.Second
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) { c.RequestHeaderTimeout = headerTimeout })
	conf := &tls.Config{ServerName: domain, RootCAs: r.caPool(t), NextProtos: []string{"http/1.1"}}

	t.Run("slow headers", func(t *testing.T) {
		c, err := tls.Dial("tcp", r.addr, conf)
		require.NoError(t, err)
		defer c.Close()
		start := time.Now()
		_, err = io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: "+domain+"\r\n")
		require.NoError(t, err)
		// One header byte at a time, slower than the timeout allows.
		var werr error
		for i := 0; werr == nil && time.Since(start) < 10*time.Second; i++ {
			_, werr = io.WriteString(c, "X")
			time.Sleep(100 * time.Millisecond) // the slowloris' pace
		}
		closed := time.Since(start)
		require.Error(t, werr, "the relay closes the connection")
		assert.Less(t, closed, headerTimeout+2*time.Second)
		require.Eventually(t, func() bool { return r.metrics(t)[refusals("request_timeout")] == 1 }, 5*time.Second, 20*time.Millisecond)
		figure(t, "slowloris in the request headers (terminated TLS)", "closed after "+closed.Round(10*time.Millisecond).String(),
			"request header timeout "+headerTimeout.String())
	})

	t.Run("oversized headers", func(t *testing.T) {
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, r.addr)
			},
			TLSClientConfig: conf,
		}}
		defer hc.CloseIdleConnections()
		req, _ := http.NewRequest("GET", "https://"+domain+"/healthz", nil)
		req.Header.Set("X-Big", strings.Repeat("a", 200<<10))
		resp, err := hc.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode)
		require.Eventually(t, func() bool { return r.metrics(t)[refusals("headers_too_large")] == 1 }, 5*time.Second, 20*time.Millisecond)
		figure(t, "200 KiB of request headers", fmt.Sprintf("%d, closed", resp.StatusCode), "431 at 64 KiB")
	})
}

func TestAbuseUnknownServerNames(t *testing.T) {
	const n = 3000
	r := startRelay(t, "127.0.0.1:0", "", nil)
	roots := r.caPool(t)
	before := heapMiB()
	g0 := runtime.NumGoroutine()
	start := time.Now()
	var wrong atomic.Int64
	parallel(n, 32, func(i int) {
		name := fmt.Sprintf("cluster-nope%d.%s", i, domain)
		switch i % 3 {
		case 1:
			name = "" // no server name at all
		case 2:
			name = fmt.Sprintf("host%d.elsewhere.example", i)
		}
		c, err := net.DialTimeout("tcp", r.addr, 5*time.Second)
		if err != nil {
			wrong.Add(1)
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		tc := tls.Client(c, &tls.Config{ServerName: name, RootCAs: roots, InsecureSkipVerify: name == ""})
		if err := tc.Handshake(); err == nil || !strings.Contains(err.Error(), "unrecognized name") {
			wrong.Add(1)
		}
	})
	took := time.Since(start)
	assert.Zero(t, wrong.Load(), "every connection got the unrecognized-name alert")
	m := r.metrics(t)
	assert.Equal(t, float64(n), m[refusals("unknown_host")]+m[refusals("no_server_name")])
	require.Eventually(t, func() bool { return runtime.NumGoroutine() <= g0+5 }, 5*time.Second, 20*time.Millisecond, "no goroutine left behind")
	figure(t, "connections with unknown or missing server names",
		fmt.Sprintf("%d refused with a TLS alert in %v (%.0f/s), heap %+.1f MiB after", n, took.Round(time.Millisecond), float64(n)/took.Seconds(), heapMiB()-before),
		"all refused, nothing kept")
}

// dialTunnel registers at the relay's tunnel endpoint by hand, as an agent
// (or an attacker posing as one) would.
func dialTunnel(t *testing.T, r *relay, d *net.Dialer, tok, agentID, routes string, tweak ...func(*websocket.Dialer)) (*websocket.Conn, *http.Response, error) {
	h := http.Header{}
	if tok != "" {
		h.Set("Authorization", "Bearer "+tok)
	}
	h.Set(tunnel.HeaderAgent, agentID)
	h.Set(tunnel.HeaderRoutes, routes)
	wd := websocket.Dialer{
		NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, r.addr)
		},
		TLSClientConfig:  &tls.Config{ServerName: domain, RootCAs: r.caPool(t)},
		HandshakeTimeout: 5 * time.Second,
	}
	for _, f := range tweak {
		f(&wd)
	}
	return wd.Dial("wss://"+domain+tunnel.Path, h)
}

func TestAbuseBadTokenFlood(t *testing.T) {
	const n, burst = 200, 10
	var logs bytes.Buffer
	var logMu sync.Mutex
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) {
		c.AuthFailureBurst = burst
		c.Logger = slog.New(slog.NewTextHandler(lockedWriter{&logs, &logMu}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	goodFile, _ := r.issue(t, "abc", "", time.Hour)
	good, err := os.ReadFile(goodFile)
	require.NoError(t, err)
	other := startRelay(t, "127.0.0.1:0", "", nil)
	foreignFile, _ := other.issue(t, "abc", "", time.Hour)
	foreign, err := os.ReadFile(foreignFile)
	require.NoError(t, err)

	codes := map[int]int{}
	var retryAfter string
	start := time.Now()
	for i := range n {
		tok := "spx1.garbage" + fmt.Sprint(i)
		if i%2 == 1 {
			tok = string(foreign) // well formed, signed by another relay
		}
		ws, resp, _ := dialTunnel(t, r, &net.Dialer{}, tok, "flood", "cluster-abc=passthrough")
		require.NotNil(t, resp)
		if ws != nil {
			ws.Close()
		}
		codes[resp.StatusCode]++
		if resp.StatusCode == http.StatusTooManyRequests {
			retryAfter = resp.Header.Get("Retry-After")
		}
	}
	took := time.Since(start)
	assert.Equal(t, map[int]int{401: burst, 429: n - burst}, codes)
	assert.NotEmpty(t, retryAfter, "429 says when to come back")

	// A real agent from another address is not held back by the flood.
	ws, resp, err := dialTunnel(t, r, otherSource, string(good), "real", "cluster-abc=passthrough")
	require.NoError(t, err)
	assert.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)
	ws.Close()

	m := r.metrics(t)
	assert.Equal(t, float64(n-burst), m[refusals("auth_rate_limited")])
	assert.Equal(t, float64(burst), m[refusals("bad_token")])
	logMu.Lock()
	logged := logs.String()
	logMu.Unlock()
	assert.Contains(t, logged, "reason=auth_rate_limited")
	assert.NotContains(t, logged, string(good), "tokens are never logged")
	assert.NotContains(t, logged, string(foreign), "tokens are never logged")
	assert.NotContains(t, logged, "garbage", "not even bad ones")
	figure(t, "tunnel registrations with bad tokens from one address",
		fmt.Sprintf("%d tried in %v: %d checked (401), %d turned away unchecked (429, Retry-After %ss); real agent from another address accepted",
			n, took.Round(time.Millisecond), codes[401], codes[429], retryAfter),
		fmt.Sprintf("burst %d per source", burst))
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestAbuseCrossClusterRegistration(t *testing.T) {
	hostB := "cluster-bbb." + domain
	beB := newBackend(t, hostB)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tokB, _ := r.issue(t, "bbb", "", time.Hour)
	startAgent(t, r, client.Config{ClusterUID: "bbb", TokenFile: tokB, Mode: tunnel.Passthrough,
		APIServer: beB.srv.URL, APIServerCAFile: beB.caFile, AgentID: "agent-b"}).waitReady(t)
	tokAFile, _ := r.issue(t, "aaa", "", time.Hour)
	tokA, err := os.ReadFile(tokAFile)
	require.NoError(t, err)

	tests := []struct {
		name, agentID, routes string
		code                  int
	}{
		{"B's host name", "agent-a", "cluster-bbb=passthrough", http.StatusForbidden},
		{"B's dashboard", "agent-a", "cluster-aaa=passthrough,cluster-bbb-dashboard=terminate", http.StatusForbidden},
		{"a name B could own", "agent-a", "cluster-bbb-vmdashboard=terminate", http.StatusForbidden},
		{"own name, B's agent id", "agent-b", "cluster-aaa=passthrough", http.StatusSwitchingProtocols},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ws, resp, _ := dialTunnel(t, r, &net.Dialer{}, string(tokA), tc.agentID, tc.routes)
			require.NotNil(t, resp)
			assert.Equal(t, tc.code, resp.StatusCode)
			if ws != nil {
				ws.Close()
				return
			}
			body, _ := io.ReadAll(resp.Body)
			assert.Contains(t, string(body), "token for cluster aaa may not register")
		})
	}
	// B is still served by B's agent alone.
	c, err := dialTLS(r, hostB, beB.roots)
	require.NoError(t, err, "B's host name still reaches B's API server")
	c.Close()
	m := r.metrics(t)
	assert.Equal(t, float64(3), m[refusals("label_not_allowed")])
	figure(t, "a token for cluster A registering B's names", "3 of 3 refused (403), B's session untouched", "all refused")
}

func TestAbuseStreamFlood(t *testing.T) {
	const maxStreams, n = 20, 100
	const uid = "flood"
	host := clusterHost(uid)
	be := newBackend(t, host)
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) { c.MaxStreamsPerTunnel = maxStreams })
	tok, _ := r.issue(t, uid, "", time.Hour)
	startAgent(t, r, client.Config{ClusterUID: uid, TokenFile: tok, Mode: tunnel.Passthrough,
		APIServer: be.srv.URL, APIServerCAFile: be.caFile}).waitReady(t)

	var mu sync.Mutex
	var open []*tls.Conn
	var refused, other atomic.Int64
	start := time.Now()
	parallel(n, 25, func(int) {
		c, err := dialTLS(r, host, be.roots)
		switch {
		case err == nil:
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
		case strings.Contains(err.Error(), "internal error"):
			refused.Add(1)
		default:
			other.Add(1)
			t.Logf("unexpected: %v", err)
		}
	})
	took := time.Since(start)
	assert.Len(t, open, maxStreams, "the tunnel carries its maximum")
	assert.Equal(t, int64(n-maxStreams), refused.Load(), "the rest are refused at once")
	assert.Zero(t, other.Load())
	m := r.metrics(t)
	assert.Equal(t, float64(n-maxStreams), m[refusals("too_many_streams")])
	for _, c := range open {
		c.Close()
	}
	// Slots come back when streams end.
	require.Eventually(t, func() bool {
		c, err := dialTLS(r, host, be.roots)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, 5*time.Second, 20*time.Millisecond)
	figure(t, "stream flood on one tunnel (passthrough connections held open)",
		fmt.Sprintf("%d of %d carried, %d refused with a TLS alert in %v", maxStreams, n, refused.Load(), took.Round(time.Millisecond)),
		fmt.Sprintf("max %d streams per tunnel", maxStreams))
}

func TestAbuseOversizedWebSocketMessage(t *testing.T) {
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tokFile, _ := r.issue(t, "big", "", time.Hour)
	tok, err := os.ReadFile(tokFile)
	require.NoError(t, err)
	// A write buffer larger than the message makes it one frame, so the
	// relay sees the oversized length in the first frame header (split in
	// frames, the first bytes would already fail as HTTP/2 garbage).
	ws, _, err := dialTunnel(t, r, &net.Dialer{}, string(tok), "big", "cluster-big=passthrough",
		func(d *websocket.Dialer) { d.WriteBufferSize = 2 * tunnel.MaxMessageSize })
	require.NoError(t, err)
	defer ws.Close()
	require.Eventually(t, func() bool { return r.srv.Tunnels() == 1 }, 5*time.Second, 10*time.Millisecond)

	start := time.Now()
	// The relay reads the frame header, answers close 1009 and drops the
	// tunnel, possibly before the payload is even sent (then the write
	// fails with a reset).
	werr := ws.WriteMessage(websocket.BinaryMessage, make([]byte, tunnel.MaxMessageSize+1))
	if werr == nil {
		ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		for {
			_, _, err := ws.ReadMessage()
			if err != nil {
				var closeErr *websocket.CloseError
				if errors.As(err, &closeErr) {
					assert.Equal(t, websocket.CloseMessageTooBig, closeErr.Code)
				}
				var ne net.Error
				require.False(t, errors.As(err, &ne) && ne.Timeout(), "the relay must drop the tunnel: %v", err)
				break
			}
		}
	}
	require.Eventually(t, func() bool { return r.srv.Tunnels() == 0 }, 5*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return r.metrics(t)[refusals("message_too_large")] == 1 }, 5*time.Second, 20*time.Millisecond,
		"the refusal is counted with its reason")
	figure(t, "WebSocket message over the 1 MiB limit on a tunnel",
		fmt.Sprintf("tunnel closed (1009) in %v", time.Since(start).Round(time.Millisecond)), "closed, nothing buffered past 1 MiB")
}

func TestAbuseTLSVersionsAndCiphers(t *testing.T) {
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tests := []struct {
		name string
		conf *tls.Config
		ok   bool
	}{
		{"TLS 1.3", &tls.Config{MinVersion: tls.VersionTLS13}, true},
		{"TLS 1.2 AEAD", &tls.Config{MaxVersion: tls.VersionTLS12}, true},
		{"TLS 1.1", &tls.Config{MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11}, false},
		{"TLS 1.2 CBC only", &tls.Config{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA}}, false},
		{"TLS 1.2 RSA key exchange", &tls.Config{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{
			tls.TLS_RSA_WITH_AES_128_GCM_SHA256}}, false},
	}
	refused := 0
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conf := tc.conf.Clone()
			conf.ServerName, conf.RootCAs = domain, r.caPool(t)
			c, err := tls.Dial("tcp", r.addr, conf)
			if tc.ok {
				require.NoError(t, err)
				st := c.ConnectionState()
				assert.GreaterOrEqual(t, st.Version, uint16(tls.VersionTLS12))
				c.Close()
				return
			}
			require.Error(t, err)
			refused++
		})
	}
	figure(t, "TLS below 1.2, CBC or RSA key exchange offered", fmt.Sprintf("%d of 3 handshakes refused", refused), "all refused")
}
