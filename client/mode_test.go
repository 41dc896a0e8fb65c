package client

import (
	"context"
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// fakeAPIServer is a TLS listener on 127.0.0.1 whose certificate carries
// names (plus 127.0.0.1), signed by the CA in caFile.
type fakeAPIServer struct {
	url, caFile string
}

func newCertPair(t *testing.T, names ...string) (tls.Certificate, string) {
	t.Helper()
	ca, err := pki.NewCA("test-cluster-ca")
	require.NoError(t, err)
	leaf, err := ca.Issue("kube-apiserver", append([]string{"127.0.0.1"}, names...), nil, false)
	require.NoError(t, err)
	cert, err := leaf.TLSCertificate()
	require.NoError(t, err)
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	require.NoError(t, os.WriteFile(caFile, ca.CertPEM, 0o600))
	return cert, caFile
}

func startFakeAPIServer(t *testing.T, names ...string) fakeAPIServer {
	t.Helper()
	cert, caFile := newCertPair(t, names...)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the mode check hangs up after the handshake
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return fakeAPIServer{url: srv.URL, caFile: caFile}
}

func newTestClient(t *testing.T, cfg Config) (*Client, *syncWriter) {
	t.Helper()
	w := &syncWriter{}
	if cfg.Server == "" {
		cfg.Server = "proxy.test"
	}
	if cfg.ClusterUID == "" {
		cfg.ClusterUID = "abc"
	}
	if cfg.AgentID == "" {
		cfg.AgentID = "agent-1"
	}
	if cfg.RelayAddress == "" {
		cfg.RelayAddress = "127.0.0.1:1" // nothing listens: Run keeps retrying
	}
	if cfg.Proxy == nil {
		cfg.Proxy = noProxy()
	}
	cfg.BackoffMin, cfg.BackoffMax = 10*time.Millisecond, 50*time.Millisecond
	cfg.DialTimeout = 2 * time.Second
	cfg.Logger = newTextLogger(w)
	c, err := New(cfg)
	require.NoError(t, err)
	return c, w
}

func TestDecideMode(t *testing.T) {
	tests := []struct {
		name       string
		configured tunnel.Mode
		sans       []string
		want       tunnel.Mode
		wantLog    string
	}{
		{"auto with the SAN", ModeAuto, []string{"cluster-abc.proxy.test"}, tunnel.Passthrough, "registering passthrough"},
		{"auto with a wildcard SAN", ModeAuto, []string{"*.proxy.test"}, tunnel.Passthrough, "registering passthrough"},
		{"auto without the SAN", ModeAuto, []string{"kubernetes.default.svc"}, tunnel.Terminate, "registering terminate"},
		{"auto with only the relay's own name", ModeAuto, []string{"proxy.test"}, tunnel.Terminate, "registering terminate"},
		{"empty is auto", "", nil, tunnel.Terminate, "registering terminate"},
		{"forced passthrough without the SAN warns", tunnel.Passthrough, nil, tunnel.Passthrough, "certSANs"},
		{"forced terminate with the SAN", tunnel.Terminate, []string{"cluster-abc.proxy.test"}, tunnel.Terminate, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			api := startFakeAPIServer(t, tc.sans...)
			c, logs := newTestClient(t, Config{Mode: tc.configured, APIServer: api.url, APIServerCAFile: api.caFile})
			got, err := c.decideMode(t.Context())
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			assert.Contains(t, logs.String(), tc.wantLog)
		})
	}
}

func TestForcedTerminateNeedsNoAPIServer(t *testing.T) {
	_, caFile := newCertPair(t)
	c, _ := newTestClient(t, Config{Mode: tunnel.Terminate, APIServer: "https://127.0.0.1:1", APIServerCAFile: caFile})
	got, err := c.decideMode(t.Context())
	require.NoError(t, err)
	assert.Equal(t, tunnel.Terminate, got)
}

// TestAutoWaitsForTheAPIServer: while the API server does not answer, the
// agent retries, stays unready and says why; then it chooses, and reports
// the choice in /readyz and /metrics.
func TestAutoWaitsForTheAPIServer(t *testing.T) {
	cert, caFile := newCertPair(t, "cluster-abc.proxy.test")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	var refuse atomic.Bool
	refuse.Store(true)
	var attempts atomic.Int32
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			attempts.Add(1)
			if refuse.Load() {
				conn.Close() // as an API server that is not up yet
				continue
			}
			go func() {
				defer conn.Close()
				tc := tls.Server(conn, &tls.Config{Certificates: []tls.Certificate{cert}})
				_ = tc.Handshake()
			}()
		}
	}()
	c, logs := newTestClient(t, Config{APIServer: "https://" + ln.Addr().String(), APIServerCAFile: caFile})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()

	require.Eventually(t, func() bool { return attempts.Load() >= 3 }, 10*time.Second, 5*time.Millisecond)
	code, body := get(t, c, "/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Contains(t, body, "choosing a mode: waiting for the API server certificate: reading the API server certificate at "+ln.Addr().String())
	assert.Empty(t, c.Mode())
	_, metrics := get(t, c, "/metrics")
	assert.NotContains(t, metrics, "spectro_proxy_agent_mode{")
	assert.Contains(t, logs.String(), "cannot reach the API server to choose a mode")

	refuse.Store(false)
	require.Eventually(t, func() bool { return c.Mode() != "" }, 10*time.Second, 5*time.Millisecond)
	assert.Equal(t, tunnel.Passthrough, c.Mode())
	code, body = get(t, c, "/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code, "no relay yet")
	assert.Equal(t, "tunnel to relay is not up mode=passthrough\n", body)
	_, metrics = get(t, c, "/metrics")
	assert.Contains(t, metrics, `spectro_proxy_agent_mode{mode="passthrough"} 1`)
	assert.Contains(t, metrics, "spectro_proxy_agent_tunnel_up 0")
}

func get(t *testing.T, c *Client, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	c.healthHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func TestParseMode(t *testing.T) {
	for _, s := range []string{"auto", "passthrough", "terminate"} {
		m, err := ParseMode(s)
		require.NoError(t, err)
		assert.Equal(t, s, string(m))
	}
	_, err := ParseMode("tcp")
	require.EqualError(t, err, `unknown mode "tcp" (want "auto", "passthrough" or "terminate")`)
}

func testutilCount(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}

func testutilGauge(g prometheus.Gauge) float64 {
	var m dto.Metric
	_ = g.Write(&m)
	return m.GetGauge().GetValue()
}
