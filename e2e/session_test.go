package e2e

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

// TestStaleSessionTakeover: a replica whose old tunnel is dead but not yet
// detected (here a WebSocket that never answers HTTP/2) reconnects with the
// same agent id. The new session replaces the stale one at once, instead of
// requests being sent into the dead tunnel until pings time out.
func TestStaleSessionTakeover(t *testing.T) {
	const uid = "stale"
	host := clusterHost(uid)
	be := newBackend(t, host)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tokFile, _ := r.issue(t, uid, "", time.Hour)
	tok, err := os.ReadFile(tokFile)
	require.NoError(t, err)

	h := http.Header{}
	h.Set("Authorization", "Bearer "+string(tok))
	h.Set(tunnel.HeaderAgent, "replica-1")
	h.Set(tunnel.HeaderRoutes, hostname.DefaultSubdomain(uid)+"=terminate")
	d := websocket.Dialer{
		NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		},
		TLSClientConfig: &tls.Config{ServerName: domain, RootCAs: r.caPool(t)},
	}
	stale, _, err := d.Dial("wss://"+domain+tunnel.Path, h)
	require.NoError(t, err)
	defer stale.Close()
	require.Eventually(t, func() bool { return r.srv.Tunnels() == 1 }, 5*time.Second, 10*time.Millisecond)

	a := startAgent(t, r, client.Config{ClusterUID: uid, TokenFile: tokFile, Mode: tunnel.Terminate,
		APIServer: be.srv.URL, APIServerCAFile: be.caFile, AgentID: "replica-1"})
	a.waitReady(t)

	// The relay closed the stale tunnel: reading from it ends.
	stale.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		if _, _, err := stale.NextReader(); err != nil {
			var ne net.Error
			require.False(t, errors.As(err, &ne) && ne.Timeout(), "stale tunnel still open: %v", err)
			break
		}
	}
	assert.Equal(t, 1, r.srv.Tunnels())
	assert.Equal(t, 1.0, r.metrics(t)[`spectro_proxy_tunnel_registrations_total{result="replaced"}`])
	assert.Equal(t, 1.0, r.metrics(t)["spectro_proxy_tunnels_connected"])

	// Every request goes to the live session, none into the dead one.
	hc := httpClient(r, host, r.caPool(t), true)
	defer hc.CloseIdleConnections()
	for range 10 {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+host+"/small", nil)
		resp, err := hc.Do(req)
		require.NoError(t, err)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		cancel()
		assert.Equal(t, 200, resp.StatusCode)
	}
}

// TestPassthroughSANCheck: in passthrough mode the agent tells the user,
// with the snippet to paste, when the API server certificate lacks the
// proxy host name (kubectl would fail with an x509 error).
func TestPassthroughSANCheck(t *testing.T) {
	r := startRelay(t, "127.0.0.1:0", "", nil)
	for _, tc := range []struct {
		name string
		sans []string
		want []string
	}{
		{"missing", nil, []string{"lacks the proxy host name", "certSANs:", "- cluster-san.proxy.test", "tls-san:"}},
		{"present", []string{"cluster-san." + domain}, []string{"carries the proxy host name"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be := newBackend(t, tc.sans...)
			tokFile, _ := r.issue(t, "san", "", time.Hour)
			var logs syncBuffer
			a := startAgent(t, r, client.Config{ClusterUID: "san", TokenFile: tokFile, Mode: tunnel.Passthrough,
				APIServer: be.srv.URL, APIServerCAFile: be.caFile, AgentID: "san-" + tc.name,
				Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			a.waitReady(t)
			for _, w := range tc.want {
				assert.Contains(t, logs.String(), strings.ReplaceAll(w, "\n", `\n`))
			}
		})
	}
}

// TestAgentHealth: /readyz follows the tunnel, /healthz the process.
func TestAgentHealth(t *testing.T) {
	be := newBackend(t)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tokFile, _ := r.issue(t, "health", "", time.Hour)
	addr := freeAddr(t)
	a := startAgent(t, r, client.Config{ClusterUID: "health", TokenFile: tokFile, Mode: tunnel.Terminate,
		APIServer: be.srv.URL, APIServerCAFile: be.caFile, HealthAddr: addr})
	a.waitReady(t)
	waitHTTP(t, "http://"+addr+"/readyz", 200)
	r.stop()
	waitHTTP(t, "http://"+addr+"/readyz", 503)
	waitHTTP(t, "http://"+addr+"/healthz", 200)
}

// TestAgentLogsRefusal: an agent whose token the relay refuses keeps
// retrying and says why in its log, never reporting ready.
func TestAgentLogsRefusal(t *testing.T) {
	be := newBackend(t)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tokFile, claims := r.issue(t, "refused", "", time.Hour)
	require.NoError(t, os.WriteFile(r.revoked, []byte(claims.ID+"\n"), 0o600))
	var logs syncBuffer
	a := startAgent(t, r, client.Config{ClusterUID: "refused", TokenFile: tokFile, Mode: tunnel.Terminate,
		APIServer: be.srv.URL, APIServerCAFile: be.caFile, BackoffMin: 10 * time.Millisecond, BackoffMax: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.Eventually(t, func() bool { return strings.Count(logs.String(), "is revoked") >= 2 }, 10*time.Second, 10*time.Millisecond,
		"agent logs the relay's reason on each retry")
	assert.Contains(t, logs.String(), "401 Unauthorized")
	assert.False(t, a.c.Ready())
	assert.Zero(t, r.srv.Tunnels())
}

// TestHostNameOwnership: two clusters never share a host name, and a request
// cannot ride another cluster's connection.
func TestHostNameOwnership(t *testing.T) {
	be := newBackend(t)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	cfg := client.Config{Mode: tunnel.Terminate, APIServer: be.srv.URL, APIServerCAFile: be.caFile}

	t.Run("a subdomain held by another cluster is refused", func(t *testing.T) {
		tokA, _ := r.issue(t, "owner-a", "shared", time.Hour)
		tokB, _ := r.issue(t, "owner-b", "shared", time.Hour)
		a := cfg
		a.ClusterUID, a.TokenFile, a.Subdomain, a.AgentID = "owner-a", tokA, "shared", "a"
		startAgent(t, r, a).waitReady(t)
		var logs syncBuffer
		b := cfg
		b.ClusterUID, b.TokenFile, b.Subdomain, b.AgentID = "owner-b", tokB, "shared", "b"
		b.Logger = slog.New(slog.NewTextHandler(&logs, nil))
		agentB := startAgent(t, r, b)
		require.Eventually(t, func() bool { return strings.Contains(logs.String(), "409 Conflict") }, 10*time.Second, 10*time.Millisecond)
		assert.Contains(t, logs.String(), "shared.proxy.test is served by another cluster")
		assert.False(t, agentB.c.Ready())
		assert.Equal(t, 1.0, r.metrics(t)[`spectro_proxy_refusals_total{reason="label_conflict"}`])
	})

	t.Run("a request for another cluster on this connection gets 421", func(t *testing.T) {
		for _, uid := range []string{"mis-a", "mis-b"} {
			tok, _ := r.issue(t, uid, "", time.Hour)
			c := cfg
			c.ClusterUID, c.TokenFile, c.AgentID = uid, tok, uid
			startAgent(t, r, c).waitReady(t)
		}
		hc := httpClient(r, "cluster-mis-a."+domain, r.caPool(t), true)
		defer hc.CloseIdleConnections()
		req, _ := http.NewRequest("GET", "https://cluster-mis-a."+domain+"/small", nil)
		req.Host = "cluster-mis-b." + domain
		resp, err := hc.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusMisdirectedRequest, resp.StatusCode)
	})
}

// TestRelayShutdownDelay: after SIGTERM the relay first reports not ready
// while still accepting (the load balancer's cue), then stops accepting.
func TestRelayShutdownDelay(t *testing.T) {
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) { c.ShutdownDelay = 2 * time.Second })
	health := httptest.NewServer(r.srv.HealthHandler())
	defer health.Close()
	waitHTTP(t, health.URL+"/readyz", 200)

	start := time.Now()
	r.cancel()
	waitHTTP(t, health.URL+"/readyz", 503)
	c, err := dialTLS(r, domain, r.caPool(t))
	require.NoError(t, err, "still accepting during the shutdown delay")
	c.Close()
	require.Eventually(t, func() bool {
		c, err := net.DialTimeout("tcp", r.addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	}, 10*time.Second, 20*time.Millisecond, "listener closes after the delay")
	assert.GreaterOrEqual(t, time.Since(start), 2*time.Second)
}
