package client

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http/httpproxy"

	"github.com/spectroproxy/spectro-proxy/internal/proctest"
)

// syncWriter collects output written while the test reads it.
type syncWriter = proctest.Buffer

func newTextLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// noProxy keeps tests independent of the environment's proxy variables.
func noProxy() *httpproxy.Config { return &httpproxy.Config{} }

// fakeProxy is an HTTP proxy on 127.0.0.1 that answers CONNECT with status
// and, on 200, joins the client to the requested address.
type fakeProxy struct {
	addr   string
	status int
	mu     sync.Mutex
	reqs   []*http.Request
}

func startFakeProxy(t *testing.T, status int) *fakeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &fakeProxy{addr: ln.Addr().String(), status: status}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { p.serve(conn) })
		}
	})
	return p
}

func (p *fakeProxy) serve(conn net.Conn) {
	defer conn.Close()
	req, err := http.ReadRequest(bufio.NewReader(conn))
	if err != nil {
		return
	}
	p.mu.Lock()
	p.reqs = append(p.reqs, req)
	p.mu.Unlock()
	if p.status != http.StatusOK {
		fmt.Fprintf(conn, "HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n", p.status, http.StatusText(p.status))
		return
	}
	target, err := net.Dial("tcp", req.Host)
	if err != nil {
		io.WriteString(conn, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
		return
	}
	defer target.Close()
	io.WriteString(conn, "HTTP/1.1 200 Connection established\r\n\r\n")
	go func() {
		io.Copy(target, conn)
		target.Close()
	}()
	io.Copy(conn, target)
}

func (p *fakeProxy) requests() []*http.Request {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]*http.Request(nil), p.reqs...)
}

// echoServer answers every connection by echoing it.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { defer conn.Close(); io.Copy(conn, conn) })
		}
	})
	return ln.Addr().String()
}

func testDialer(t *testing.T, relayAddr string, pc *httpproxy.Config) (*relayDialer, error) {
	t.Helper()
	cfg := Config{Server: "proxy.test", Port: 443, RelayAddress: relayAddr, Proxy: pc, Logger: slog.New(slog.DiscardHandler)}
	return newRelayDialer(&cfg, &net.Dialer{Timeout: 2 * time.Second})
}

func TestDialThroughProxy(t *testing.T) {
	relay := echoServer(t)
	proxy := startFakeProxy(t, http.StatusOK)
	d, err := testDialer(t, relay, &httpproxy.Config{HTTPSProxy: "http://agent:s%40cret@" + proxy.addr})
	require.NoError(t, err)
	assert.Equal(t, "http://agent:xxxxx@"+proxy.addr, d.proxyName())
	conn, err := d.DialContext(t.Context())
	require.NoError(t, err)
	defer conn.Close()
	_, err = io.WriteString(conn, "hello")
	require.NoError(t, err)
	buf := make([]byte, 5)
	_, err = io.ReadFull(conn, buf)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(buf))

	reqs := proxy.requests()
	require.Len(t, reqs, 1)
	assert.Equal(t, http.MethodConnect, reqs[0].Method)
	assert.Equal(t, relay, reqs[0].Host, "CONNECT names the relay address (RelayAddress: no DNS needed)")
	assert.Equal(t, "Basic "+base64.StdEncoding.EncodeToString([]byte("agent:s@cret")), reqs[0].Header.Get("Proxy-Authorization"))
}

func TestProxySelection(t *testing.T) {
	tests := []struct {
		name      string
		pc        httpproxy.Config
		wantProxy string
	}{
		{"https proxy", httpproxy.Config{HTTPSProxy: "http://10.0.0.1:3128"}, "http://10.0.0.1:3128"},
		{"host without scheme means http", httpproxy.Config{HTTPSProxy: "10.0.0.1:3128"}, "http://10.0.0.1:3128"},
		{"NO_PROXY names the relay", httpproxy.Config{HTTPSProxy: "http://10.0.0.1:3128", NoProxy: "proxy.test"}, ""},
		{"NO_PROXY names a parent domain", httpproxy.Config{HTTPSProxy: "http://10.0.0.1:3128", NoProxy: ".test"}, ""},
		{"NO_PROXY names something else", httpproxy.Config{HTTPSProxy: "http://10.0.0.1:3128", NoProxy: "svc,cluster.local,10.96.0.0/12"}, "http://10.0.0.1:3128"},
		{"HTTP_PROXY is for http:// only", httpproxy.Config{HTTPProxy: "http://10.0.0.1:3128"}, ""},
		{"none", httpproxy.Config{}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := testDialer(t, "", &tc.pc)
			require.NoError(t, err)
			assert.Equal(t, tc.wantProxy, d.proxyName())
			assert.Equal(t, "proxy.test:443", d.addr)
		})
	}
}

func TestProxyFromEnvironment(t *testing.T) {
	for _, k := range []string{"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"} {
		t.Setenv(k, "")
	}
	t.Setenv("HTTPS_PROXY", "http://u:pw@10.0.0.1:3128")
	logs := &syncWriter{}
	cfg := Config{Server: "proxy.test", ClusterUID: "abc", Mode: "terminate", APIServer: "https://127.0.0.1:1",
		APIServerCAFile: writeCA(t), AgentID: "a", Logger: newTextLogger(logs)}
	c, err := New(cfg)
	require.NoError(t, err)
	assert.Equal(t, "http://u:xxxxx@10.0.0.1:3128", c.relay.proxyName())
	assert.Contains(t, logs.String(), "the relay connection goes through an HTTP proxy")
	assert.NotContains(t, logs.String(), "pw@")

	t.Setenv("HTTPS_PROXY", "")
	t.Setenv("HTTP_PROXY", "http://10.0.0.1:3128")
	c, err = New(cfg)
	require.NoError(t, err)
	assert.Empty(t, c.relay.proxyName())
	assert.Contains(t, logs.String(), "HTTP_PROXY is set but HTTPS_PROXY is not")
}

func writeCA(t *testing.T) string {
	t.Helper()
	_, caFile := newCertPair(t)
	return caFile
}

// TestProxyRefusals: every way a proxy can fail names the proxy (without
// its password) and says what to do.
func TestProxyRefusals(t *testing.T) {
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	deadAddr := dead.Addr().String()
	dead.Close()
	relay := echoServer(t)

	tests := []struct {
		name    string
		status  int    // of a fake proxy; 0: deadAddr
		user    string // user info in the proxy URL
		want    string // %s is the proxy's address
		wantErr string
	}{
		{"407 without credentials", http.StatusProxyAuthRequired, "",
			"proxy http://%s refused CONNECT " + relay + ": 407 Proxy Authentication Required (the proxy wants credentials: put them in the proxy URL, http://user:password@host:port)", ""},
		{"407 with credentials", http.StatusProxyAuthRequired, "agent:hunter2@",
			"proxy http://agent:xxxxx@%s refused CONNECT " + relay + ": 407 Proxy Authentication Required (the proxy did not accept the credentials in the proxy URL)", ""},
		{"401 with credentials (as tinyproxy answers)", http.StatusUnauthorized, "agent:hunter2@",
			"proxy http://agent:xxxxx@%s refused CONNECT " + relay + ": 401 Unauthorized (the proxy did not accept the credentials in the proxy URL)", ""},
		{"403", http.StatusForbidden, "",
			"proxy http://%s refused CONNECT " + relay + ": 403 Forbidden (the proxy does not allow CONNECT to the relay's address and port)", ""},
		{"502", http.StatusBadGateway, "", "proxy http://%s refused CONNECT " + relay + ": 502 Bad Gateway", ""},
		{"unreachable", 0, "agent:hunter2@", "dialing proxy http://agent:xxxxx@%s: ", "connection refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			addr := deadAddr
			if tc.status != 0 {
				addr = startFakeProxy(t, tc.status).addr
			}
			d, err := testDialer(t, relay, &httpproxy.Config{HTTPSProxy: "http://" + tc.user + addr})
			require.NoError(t, err)
			_, err = d.DialContext(t.Context())
			require.Error(t, err)
			want := strings.ReplaceAll(tc.want, "%s", addr)
			if tc.wantErr == "" {
				assert.Equal(t, want, err.Error())
			} else {
				assert.True(t, strings.HasPrefix(err.Error(), want), "got %q, want prefix %q", err, want)
				assert.Contains(t, err.Error(), tc.wantErr)
			}
			assert.NotContains(t, err.Error(), "hunter2", "the proxy password is never shown")
		})
	}
}

func TestProxyThatNeverAnswers(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		conn, err := ln.Accept()
		if err == nil {
			io.Copy(io.Discard, conn) // reads the CONNECT, never answers
			conn.Close()
		}
	})
	d, err := testDialer(t, "127.0.0.1:1", &httpproxy.Config{HTTPSProxy: "http://" + ln.Addr().String()})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = d.DialContext(ctx)
	require.ErrorContains(t, err, "reading proxy http://"+ln.Addr().String()+"'s answer to CONNECT 127.0.0.1:1")
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(start), 5*time.Second)
	ln.Close()
}

func TestUnsupportedProxyScheme(t *testing.T) {
	_, err := testDialer(t, "", &httpproxy.Config{HTTPSProxy: "socks5://u:pw@10.0.0.1:1080"})
	require.EqualError(t, err, `proxy socks5://u:xxxxx@10.0.0.1:1080: scheme "socks5" is not supported (want http:// or https://)`)
}
