package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/relaytest"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

func TestMain(m *testing.M) {
	code := m.Run()
	stopKube()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreCurrent()); err != nil {
			fmt.Fprintln(os.Stderr, "goroutine leak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// backend is an API-server stand-in: real TLS with a private CA, HTTP/1.1
// and HTTP/2, a big body, an echo, a watch-like stream and a WebSocket.
type backend struct {
	srv    *httptest.Server
	caFile string
	roots  *x509.CertPool
	big    []byte
	events chan string
}

func newBackend(t *testing.T, sans ...string) *backend {
	t.Helper()
	ca, err := pki.NewCA("backend CA")
	require.NoError(t, err)
	leaf, err := ca.Issue("backend", append([]string{"127.0.0.1"}, sans...), nil, false)
	require.NoError(t, err)
	cert, err := leaf.TLSCertificate()
	require.NoError(t, err)
	b := &backend{big: make([]byte, 10<<20), events: make(chan string)}
	_, _ = rand.Read(b.big)
	mux := http.NewServeMux()
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"kind":"Status","proto":%q,"auth":%q,"pad":%q}`, r.Proto, r.Header.Get("Authorization"), strings.Repeat("x", 900))
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) { w.Write(b.big) })
	// /cookies is a workload behind the API server's proxy setting
	// cookies for the relay's whole domain.
	mux.HandleFunc("/cookies", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Set-Cookie", "session=1; Path=/; Domain="+domain+"; HttpOnly")
		w.Header().Add("Set-Cookie", "other=2; domain=.proxy.test")
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) { io.Copy(w, r.Body) })
	// /early answers when all but the last 64 KiB of the request body
	// have arrived, then reads the rest and reports the body's hash: a
	// proxy must keep both directions open meanwhile. (Go's HTTP/1 server
	// discards what is left of a request body, if under 256 KiB, once a
	// response starts, unless full duplex is enabled.)
	mux.HandleFunc("/early", func(w http.ResponseWriter, r *http.Request) {
		_ = http.NewResponseController(w).EnableFullDuplex() // the backend itself, over HTTP/1
		h := sha256.New()
		first, err := io.CopyN(h, r.Body, r.ContentLength-64<<10)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintln(w, "accepted")
		w.(http.Flusher).Flush()
		rest, err := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%d %x %v\n", first+rest, h.Sum(nil), err)
	})
	mux.HandleFunc("/watch", relaytest.WatchHandler(b.events))
	mux.HandleFunc("/ws", relaytest.EchoWebSocket(""))
	b.srv = httptest.NewUnstartedServer(mux)
	b.srv.EnableHTTP2 = true
	b.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	b.srv.StartTLS()
	t.Cleanup(b.srv.Close)
	b.caFile = filepath.Join(t.TempDir(), "backend-ca.crt")
	require.NoError(t, os.WriteFile(b.caFile, ca.CertPEM, 0o600))
	b.roots, err = pki.Pool(ca.CertPEM)
	require.NoError(t, err)
	return b
}

// gatedReader reads nothing until its gate is closed, then EOF; it gives
// up with ctx (net/http waits for the body's reader before it returns).
type gatedReader struct {
	ctx  context.Context
	gate <-chan struct{}
}

func (g gatedReader) Read([]byte) (int, error) {
	select {
	case <-g.gate:
		return 0, io.EOF
	case <-g.ctx.Done():
		return 0, g.ctx.Err()
	}
}

// httpClient reaches host through the relay, trusting roots.
func httpClient(r *relay, host string, roots *x509.CertPool, h2 bool) *http.Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		},
		TLSClientConfig:   &tls.Config{ServerName: host, RootCAs: roots},
		ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

func TestTunnelModes(t *testing.T) {
	const uid = "abc"
	host := clusterHost(uid)
	be := newBackend(t, host)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	for _, mode := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		t.Run(string(mode), func(t *testing.T) {
			tokFile, _ := r.issue(t, uid, "", time.Hour)
			a := startAgent(t, r, client.Config{ClusterUID: uid, TokenFile: tokFile, Mode: mode,
				APIServer: be.srv.URL, APIServerCAFile: be.caFile, AgentID: "a-" + string(mode)})
			a.waitReady(t)
			roots := be.roots // passthrough: TLS ends at the backend
			if mode == tunnel.Terminate {
				roots = r.caPool(t)
			}
			for _, h2 := range []bool{false, true} {
				t.Run(fmt.Sprintf("h2=%v", h2), func(t *testing.T) {
					hc := httpClient(r, host, roots, h2)
					defer hc.CloseIdleConnections()

					req, _ := http.NewRequest("GET", "https://"+host+"/small", nil)
					req.Header.Set("Authorization", "Bearer user-token")
					resp, err := hc.Do(req)
					require.NoError(t, err)
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					require.Equal(t, 200, resp.StatusCode, string(body))
					assert.Contains(t, string(body), `"auth":"Bearer user-token"`, "bearer token passes through")

					resp, err = hc.Get("https://" + host + "/big")
					require.NoError(t, err)
					got, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					require.NoError(t, err)
					assert.Equal(t, sha256.Sum256(be.big), sha256.Sum256(got), "10 MiB body intact")

					resp, err = hc.Post("https://"+host+"/echo", "application/octet-stream", bytes.NewReader(be.big[:4<<20]))
					require.NoError(t, err)
					got, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					require.NoError(t, err)
					assert.Equal(t, sha256.Sum256(be.big[:4<<20]), sha256.Sum256(got), "4 MiB upload echoed intact")

					// The client holds back the last 64 KiB until the answer
					// has begun: the relay must still carry them.
					upload := be.big[:4<<20]
					gate := make(chan struct{})
					ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
					defer cancel()
					slow := io.MultiReader(bytes.NewReader(upload[:len(upload)-64<<10]),
						gatedReader{ctx, gate}, bytes.NewReader(upload[len(upload)-64<<10:]))
					req, _ = http.NewRequestWithContext(ctx, "POST", "https://"+host+"/early", slow)
					req.ContentLength = int64(len(upload))
					resp, err = hc.Do(req)
					close(gate)
					require.NoError(t, err)
					got, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					require.NoError(t, err)
					assert.Equal(t, fmt.Sprintf("accepted\n%d %x <nil>\n", len(upload), sha256.Sum256(upload)), string(got),
						"an upload the backend answers early arrives whole")

					// Each watch event must arrive before the next is sent:
					// nothing may sit in a buffer.
					resp, err = hc.Get("https://" + host + "/watch")
					require.NoError(t, err)
					buf := make([]byte, 64)
					for i := range 5 {
						ev := fmt.Sprintf("event-%d", i)
						select {
						case be.events <- ev:
						case <-time.After(5 * time.Second):
							t.Fatal("backend watch not reading events")
						}
						n, err := resp.Body.Read(buf)
						require.NoError(t, err)
						assert.Equal(t, ev+"\n", string(buf[:n]))
					}
					resp.Body.Close()
				})
			}
			t.Run("websocket upgrade", func(t *testing.T) {
				d := websocket.Dialer{
					NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
						return (&net.Dialer{}).DialContext(ctx, network, r.addr)
					},
					TLSClientConfig: &tls.Config{ServerName: host, RootCAs: roots},
				}
				ws, resp, err := d.Dial("wss://"+host+"/ws", nil)
				require.NoError(t, err)
				defer ws.Close()
				assert.Equal(t, 101, resp.StatusCode)
				for i := range 3 {
					msg := bytes.Repeat([]byte{byte(i)}, 100_000)
					require.NoError(t, ws.WriteMessage(websocket.BinaryMessage, msg))
					_, echo, err := ws.ReadMessage()
					require.NoError(t, err)
					assert.Equal(t, msg, echo)
				}
			})
		})
	}
}

func TestRegistrationRefusals(t *testing.T) {
	r := startRelay(t, "127.0.0.1:0", "", nil)
	good, claims := r.issue(t, "abc", "", time.Hour)
	expired, _ := r.issue(t, "abc", "", time.Nanosecond)
	revoked, revClaims := r.issue(t, "abc", "", time.Hour)
	require.NoError(t, os.WriteFile(r.revoked, []byte(revClaims.ID+"\n"), 0o600))
	other, _ := r.issue(t, "other", "", time.Hour)
	otherRelay := startRelay(t, "127.0.0.1:0", "", nil)
	foreign, _ := otherRelay.issue(t, "abc", "", time.Hour)
	_ = claims

	read := func(p string) string { b, _ := os.ReadFile(p); return string(b) }
	tests := []struct {
		name   string
		token  string
		routes string
		code   int
		msg    string
	}{
		{"valid", read(good), "cluster-abc=passthrough,cluster-abc-dashboard=terminate", 101, ""},
		{"no token", "", "cluster-abc=passthrough", 401, "missing bearer token"},
		{"garbage token", "hello", "cluster-abc=passthrough", 401, "malformed token"},
		{"signed by another relay", read(foreign), "cluster-abc=passthrough", 401, "signature does not match"},
		{"expired", read(expired), "cluster-abc=passthrough", 401, "token expired"},
		{"revoked", read(revoked), "cluster-abc=passthrough", 401, "is revoked"},
		{"other cluster's host name", read(other), "cluster-abc=passthrough", 403, `may not register "cluster-abc"`},
		{"unknown mode", read(good), "cluster-abc=tunnel", 400, "unknown mode"},
		{"not a DNS label", read(good), "Cluster_ABC=passthrough", 400, "must be lower-case"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			if tc.token != "" {
				h.Set("Authorization", "Bearer "+tc.token)
			}
			h.Set(tunnel.HeaderAgent, "agent-1")
			h.Set(tunnel.HeaderRoutes, tc.routes)
			d := websocket.Dialer{
				NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
					return (&net.Dialer{}).DialContext(ctx, network, r.addr)
				},
				TLSClientConfig: &tls.Config{ServerName: domain, RootCAs: r.caPool(t)},
			}
			ws, resp, err := d.Dial("wss://"+domain+tunnel.Path, h)
			require.NotNil(t, resp, "dial error: %v", err)
			assert.Equal(t, tc.code, resp.StatusCode)
			if ws != nil {
				ws.Close()
				return
			}
			body, _ := io.ReadAll(resp.Body)
			assert.Contains(t, string(body), tc.msg)
		})
	}
}

func TestUnknownHostAndAgentDown(t *testing.T) {
	be := newBackend(t, "cluster-pt."+domain)
	r := startRelay(t, "127.0.0.1:0", "", nil)

	t.Run("unknown host gets an alert at once", func(t *testing.T) {
		start := time.Now()
		_, err := dialTLS(r, "cluster-nope."+domain, r.caPool(t))
		require.ErrorContains(t, err, "unrecognized name")
		assert.Less(t, time.Since(start), 2*time.Second)
	})
	t.Run("no server name", func(t *testing.T) {
		c, err := net.Dial("tcp", r.addr)
		require.NoError(t, err)
		defer c.Close()
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
		require.ErrorContains(t, tc.Handshake(), "unrecognized name")
	})
	t.Run("not TLS", func(t *testing.T) {
		c, err := net.Dial("tcp", r.addr)
		require.NoError(t, err)
		defer c.Close()
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadAll(c)
		require.NoError(t, err, "closed, not left hanging")
	})

	for _, mode := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		t.Run("agent down "+string(mode), func(t *testing.T) {
			uid := "pt"
			if mode == tunnel.Terminate {
				uid = "tm"
			}
			host := clusterHost(uid)
			tok, _ := r.issue(t, uid, "", time.Hour)
			a := startAgent(t, r, client.Config{ClusterUID: uid, TokenFile: tok, Mode: mode, APIServer: be.srv.URL, APIServerCAFile: be.caFile})
			a.waitReady(t)
			a.stop()
			require.Eventually(t, func() bool { return r.srv.Tunnels() == 0 }, 5*time.Second, 10*time.Millisecond)
			start := time.Now()
			if mode == tunnel.Passthrough {
				_, err := dialTLS(r, host, be.roots)
				require.ErrorContains(t, err, "internal error")
			} else {
				resp, err := httpClient(r, host, r.caPool(t), true).Get("https://" + host + "/small")
				require.NoError(t, err)
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				assert.Equal(t, 503, resp.StatusCode)
				assert.Contains(t, string(body), "no agent connected for cluster-tm")
			}
			assert.Less(t, time.Since(start), 2*time.Second, "a clear error fast, not a hang")
		})
	}
}

func TestRelayRestartAndFailover(t *testing.T) {
	const uid = "rs"
	host := clusterHost(uid)
	be := newBackend(t, host)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tok, _ := r.issue(t, uid, "", time.Hour)
	cfg := client.Config{ClusterUID: uid, TokenFile: tok, Mode: tunnel.Terminate, APIServer: be.srv.URL, APIServerCAFile: be.caFile}
	cfg.AgentID = "replica-1"
	a1 := startAgent(t, r, cfg)
	cfg.AgentID = "replica-2"
	a2 := startAgent(t, r, cfg)
	a1.waitReady(t)
	a2.waitReady(t)
	require.Eventually(t, func() bool { return r.srv.Tunnels() == 2 }, 5*time.Second, 10*time.Millisecond)

	get := func(r *relay) error {
		hc := httpClient(r, host, r.caPool(t), true)
		defer hc.CloseIdleConnections()
		resp, err := hc.Get("https://" + host + "/small")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	for range 10 {
		require.NoError(t, get(r))
	}

	t.Run("one replica killed: no request fails", func(t *testing.T) {
		a1.stop()
		for range 20 {
			require.NoError(t, get(r))
		}
	})

	t.Run("relay restart: back within 5s", func(t *testing.T) {
		addr, dir := r.addr, r.stateDir
		connects := a2.c.Connects()
		r.stop()
		start := time.Now()
		r2 := startRelay(t, addr, dir, nil)
		require.Eventually(t, func() bool { return get(r2) == nil }, 5*time.Second, 20*time.Millisecond)
		t.Logf("relay restart: agent back and request served %v after restart", time.Since(start).Round(time.Millisecond))
		assert.Greater(t, a2.c.Connects(), connects)
	})
}
