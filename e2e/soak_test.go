package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
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
)

// usage is what a leak would grow: goroutines, open file descriptors and
// resident memory of this process (relay, agents and backend all live in
// it).
type usage struct {
	goroutines, fds int
	heapMiB, rssMiB float64
}

func measure(t testing.TB) usage {
	t.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	status, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	var rssKiB float64
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			rssKiB, err = strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			require.NoError(t, err)
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return usage{goroutines: runtime.NumGoroutine(), fds: len(fds), heapMiB: float64(ms.HeapInuse) / (1 << 20), rssMiB: rssKiB / 1024}
}

// kubectlClient is a new client for one operation; exit closes every
// connection it opened, as a kubectl process does when it exits (an HTTP/2
// connection whose stream was just reset is not idle yet, so
// CloseIdleConnections alone would leave it open).
func kubectlClient(r *relay, conf *tls.Config, h2 bool) (*http.Client, func()) {
	var mu sync.Mutex
	var conns []net.Conn
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, r.addr)
			if err == nil {
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
			return c, err
		},
		TLSClientConfig:   conf,
		ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}, func() {
		tr.CloseIdleConnections()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	}
}

func TestSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test")
	}
	const (
		requests = 3000
		watches  = 300
		upgrades = 150
		workers  = 16
		limit    = 90 * time.Second

		slackGoroutines, slackFDs = 6, 4
		slackHeapMiB              = 16
	)
	// RSS: the runtime keeps freed spans for a while, and under -race
	// shadow memory grows with whatever ever ran at once.
	slackRSSMiB := 32.0
	if raceEnabled {
		slackRSSMiB = 128
	}
	hostP, hostT := clusterHost("soakp"), clusterHost("soakt")
	be := newBackend(t, hostP, hostT)
	r := startRelay(t, "127.0.0.1:0", "", nil)
	for _, m := range []struct {
		uid  string
		mode tunnel.Mode
	}{{"soakp", tunnel.Passthrough}, {"soakt", tunnel.Terminate}} {
		tok, _ := r.issue(t, m.uid, "", time.Hour)
		startAgent(t, r, client.Config{ClusterUID: m.uid, TokenFile: tok, Mode: m.mode, APIServer: be.srv.URL,
			APIServerCAFile: be.caFile, AgentID: "soak-" + m.uid}).waitReady(t)
	}
	type target struct {
		host string
		mode tunnel.Mode
		h2   bool
	}
	targets := []target{{hostP, tunnel.Passthrough, false}, {hostP, tunnel.Passthrough, true}, {hostT, tunnel.Terminate, false}, {hostT, tunnel.Terminate, true}}
	rootsT := r.caPool(t)
	roots := func(tg target) *tls.Config {
		conf := &tls.Config{ServerName: tg.host, RootCAs: be.roots}
		if tg.mode == tunnel.Terminate {
			conf.RootCAs = rootsT
		}
		return conf
	}

	var failures atomic.Int64
	fail := func(format string, args ...any) {
		if failures.Add(1) <= 5 {
			t.Logf(format, args...)
		}
	}
	// One kubectl-like operation: a short GET, a watch opened and then
	// cancelled, or an upgrade (exec, port-forward) opened and closed. Every
	// client is new, so connections are opened and closed throughout.
	op := func(ctx context.Context, i int) {
		tg := targets[i%len(targets)]
		hc, exit := kubectlClient(r, roots(tg), tg.h2)
		defer exit()
		switch {
		case i < requests:
			resp, err := hc.Get("https://" + tg.host + "/small")
			if err != nil {
				fail("get %s: %v", tg.host, err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				fail("get %s: %d", tg.host, resp.StatusCode)
			}
		case i < requests+watches:
			wctx, cancel := context.WithCancel(ctx)
			defer cancel()
			req, _ := http.NewRequestWithContext(wctx, "GET", "https://"+tg.host+"/watch", nil)
			resp, err := hc.Do(req)
			if err != nil {
				fail("watch %s: %v", tg.host, err)
				return
			}
			cancel() // the user presses ^C
			resp.Body.Close()
		default:
			d := websocket.Dialer{
				NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
					return (&net.Dialer{}).DialContext(ctx, network, r.addr)
				},
				TLSClientConfig: roots(tg),
			}
			ws, _, err := d.DialContext(ctx, "wss://"+tg.host+"/ws", nil)
			if err != nil {
				fail("upgrade %s: %v", tg.host, err)
				return
			}
			defer ws.Close()
			msg := []byte("ping " + strconv.Itoa(i))
			if err := ws.WriteMessage(websocket.BinaryMessage, msg); err != nil {
				fail("ws write: %v", err)
				return
			}
			if _, got, err := ws.ReadMessage(); err != nil || !bytes.Equal(got, msg) {
				fail("ws echo: %v", err)
			}
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	total := requests + watches + upgrades
	var done atomic.Int64
	round := func(n int) {
		// Spread n operations over the same mix: every 1 in total/n.
		parallel(n, workers, func(j int) {
			if ctx.Err() != nil {
				return
			}
			op(ctx, j*total/n)
			done.Add(1)
		})
	}
	// A warm-up round first: it grows the pools, buffers and (under -race)
	// shadow memory that any run needs once, so that the baseline is what
	// a running relay looks like and only a leak grows past it.
	round(total / 4)
	require.Zero(t, failures.Load(), "warm-up")
	base := measure(t)
	start := time.Now()
	round(total)
	took := time.Since(start)
	require.NoError(t, ctx.Err(), "soak did not finish within %v (%d done)", limit, done.Load())
	assert.Zero(t, failures.Load(), "no operation failed")

	// Everything must go back to where it was: poll, since connections
	// close asynchronously on all three sides. The baseline was taken with
	// the warm-up's last connections possibly still closing, so this is
	// strict.
	var after usage
	settled := assert.Eventually(t, func() bool {
		after = measure(t)
		// The slack is the agent's pooled connection to the API server
		// (kept idle for reuse, 3 goroutines and 2 fds), which may or may
		// not have been open at the baseline.
		return after.goroutines <= base.goroutines+slackGoroutines && after.fds <= base.fds+slackFDs
	}, 20*time.Second, 100*time.Millisecond, "goroutines and fds back to baseline")
	if !settled {
		t.Logf("baseline %+v, after %+v", base, after)
		if os.Getenv("SOAK_DUMP") != "" {
			pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		}
	}
	// The heap is what a leak of thousands of connections and their
	// buffers would grow (tens of MiB). RSS is reported and bounded
	// loosely: the runtime keeps freed spans, and -race adds shadow memory
	// in proportion to what ever ran at once.
	assert.Less(t, after.heapMiB, base.heapMiB+slackHeapMiB, "heap back near baseline")
	assert.Less(t, after.rssMiB, base.rssMiB+slackRSSMiB, "RSS bounded")
	figure(t, "soak: short requests, watches opened and cancelled, upgrades (both modes, h1+h2, new connection each)",
		fmt.Sprintf("%d requests + %d watches + %d upgrades in %v, %d failed", requests, watches, upgrades, took.Round(time.Millisecond), failures.Load()),
		"0 failed")
	figure(t, "soak: goroutines / fds / heap / RSS, baseline -> after",
		fmt.Sprintf("%d -> %d / %d -> %d / heap %.1f -> %.1f MiB / RSS %.0f -> %.0f MiB", base.goroutines, after.goroutines,
			base.fds, after.fds, base.heapMiB, after.heapMiB, base.rssMiB, after.rssMiB),
		fmt.Sprintf("+%d / +%d / +%d MiB / +%.0f MiB", slackGoroutines, slackFDs, slackHeapMiB, slackRSSMiB))
}
