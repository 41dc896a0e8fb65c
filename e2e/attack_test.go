package e2e

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
	"net/url"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

// The attacks of issue 11, each against a relay and two clusters: the
// victim (whose hosts the attacker uses) and a bystander. While the attack
// runs, a legitimate client of each cluster, from another source address,
// keeps making requests; the tests check that the bystander sees no
// failure, that the victim's requests succeed within 2 s of the attacker
// being cut, and how far the memory of this process (relay, agents and
// backends all run in it) grew.

// scene is a relay with a victim and a bystander cluster.
type scene struct {
	r                   *relay
	victim, bystander   string // API host names
	victimDash          string // the victim's dashboard host name
	be                  *backend
	victimC, bystanderC *http.Client // legitimate clients, from otherSource
}

// newScene starts the relay (tweaked), the victim's agent (API route in
// terminate mode to a backend, dashboard route to dashURL when set) and the
// bystander's.
func newScene(t *testing.T, tweak func(*server.Config), dashURL string) *scene {
	return newSceneMode(t, tweak, dashURL, tunnel.Terminate)
}

// newSceneMode is newScene with the victim's API route in mode.
func newSceneMode(t *testing.T, tweak func(*server.Config), dashURL string, mode tunnel.Mode) *scene {
	t.Helper()
	sc := &scene{victim: "cluster-victim." + domain, bystander: "cluster-bystander." + domain, victimDash: "cluster-victim-dashboard." + domain}
	sc.be = newBackend(t, sc.victim, sc.bystander)
	sc.r = startRelay(t, "127.0.0.1:0", "", tweak)
	for _, uid := range []string{"victim", "bystander"} {
		tok, _ := sc.r.issue(t, uid, "", time.Hour)
		cfg := client.Config{ClusterUID: uid, TokenFile: tok, Mode: tunnel.Terminate, APIServer: sc.be.srv.URL, APIServerCAFile: sc.be.caFile}
		if uid == "victim" {
			cfg.Mode = mode
			cfg.K8sDashboardURL = dashURL
			cfg.DashboardInsecureSkipVerify = true
		}
		startAgent(t, sc.r, cfg).waitReady(t)
	}
	roots := sc.r.caPool(t)
	victimRoots := roots
	if mode == tunnel.Passthrough {
		victimRoots = sc.be.roots
	}
	sc.victimC = legitClient(sc.r, sc.victim, victimRoots)
	sc.bystanderC = legitClient(sc.r, sc.bystander, roots)
	return sc
}

// legitClient reaches host from otherSource (another address than the
// attacker's), over HTTP/2.
func legitClient(r *relay, host string, roots *x509.CertPool) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return otherSource.DialContext(ctx, network, r.addr)
		},
		TLSClientConfig:   &tls.Config{ServerName: host, RootCAs: roots},
		ForceAttemptHTTP2: true,
	}}
}

// load is a legitimate client making requests in a loop until stopped.
type load struct {
	c          *http.Client
	url        string
	ok, failed atomic.Int64
	lastFail   atomic.Int64 // unix nanos of the last failure
	lastOK     atomic.Int64
	stop       chan struct{}
	done       chan struct{}
	firstErrMu sync.Mutex
	firstErr   error
}

func startLoad(c *http.Client, url string) *load {
	l := &load{c: c, url: url, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		tick := time.NewTicker(25 * time.Millisecond)
		defer tick.Stop()
		for first := true; ; first = false {
			if !first {
				select {
				case <-l.stop:
					return
				case <-tick.C:
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, l.url, nil)
			resp, err := l.c.Do(req)
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err == nil && resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
			}
			cancel()
			if err != nil {
				l.failed.Add(1)
				l.lastFail.Store(time.Now().UnixNano())
				l.firstErrMu.Lock()
				if l.firstErr == nil {
					l.firstErr = err
				}
				l.firstErrMu.Unlock()
				continue
			}
			l.ok.Add(1)
			l.lastOK.Store(time.Now().UnixNano())
		}
	}()
	return l
}

// end stops the load once it has made at least 5 requests (so that every
// attack, however quick, ran alongside some).
func (l *load) end() {
	deadline := time.Now().Add(10 * time.Second)
	for l.ok.Load()+l.failed.Load() < 5 && time.Now().Before(deadline) {
		time.Sleep(25 * time.Millisecond) // the load's own pace
	}
	close(l.stop)
	<-l.done
}

func (l *load) String() string {
	l.firstErrMu.Lock()
	defer l.firstErrMu.Unlock()
	if l.firstErr == nil {
		return fmt.Sprintf("%d ok, %d failed", l.ok.Load(), l.failed.Load())
	}
	return fmt.Sprintf("%d ok, %d failed (first error: %v)", l.ok.Load(), l.failed.Load(), l.firstErr)
}

// attack is the common frame of an attack on a scene: loads on the victim
// and the bystander and the process's memory, watched from before the attack.
type attack struct {
	sc                *scene
	mem               *peakMem
	victim, bystander *load
}

func (sc *scene) attack() *attack {
	return &attack{
		sc:        sc,
		mem:       watchMem(),
		victim:    startLoad(sc.victimC, "https://"+sc.victim+"/small"),
		bystander: startLoad(sc.bystanderC, "https://"+sc.bystander+"/small"),
	}
}

// finish waits for the victim to recover, ends both loads and checks what
// every attack must leave: no bystander request failed and the memory held
// grew within heldBound. It returns the recovery time and the growth.
func (a *attack) finish(t *testing.T) (recovery time.Duration, grew memGrowth) {
	t.Helper()
	recovery = recovered(t, a.sc.victimC, "https://"+a.sc.victim+"/small")
	a.victim.end()
	a.bystander.end()
	grew = a.mem.growth()
	assert.Zero(t, a.bystander.failed.Load(), "bystander: %v", a.bystander)
	assert.LessOrEqual(t, grew.held, float64(heldBound), "memory held by this process grew (MiB); %v", grew)
	return recovery, grew
}

// recovered waits until a request of the victim's client succeeds and
// returns how long it took.
func recovered(t *testing.T, c *http.Client, url string) time.Duration {
	t.Helper()
	start := time.Now()
	require.Eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := c.Do(req)
		if err != nil {
			return false
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 2*time.Second, 20*time.Millisecond, "the attacked cluster recovers within 2s")
	return time.Since(start)
}

// heldBound is the growth allowed to the memory this process holds under
// one attack: the issue's 64 MiB.
//
// What is held is the live heap after each GC plus goroutine stacks, not
// RSS. RSS also carries the GC's headroom (GOGC=100 lets the heap reach
// twice what was live at the last collection), which in a test process
// whose heap starts at about 13 MiB doubles whatever the attack holds: 20
// never-reading passthrough clients hold about 45 MiB (their 2 MiB stream
// windows and copy buffers), and RSS grew 66-74 MiB when that test ran
// alone, 43 MiB when it ran after the others. Under the race detector RSS
// also carries shadow memory, 107-265 MiB for the same attack. Both figures
// are reported; docs/hardening.md has them from runs without -race.
const heldBound = 64

// memMiB reads this process's resident memory and what it holds: the live
// heap as of the last GC, plus goroutine stacks.
func memMiB() (rss, held float64) {
	samples := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	metrics.Read(samples)
	held = float64(samples[0].Value.Uint64()+samples[1].Value.Uint64()) / (1 << 20)
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, held
	}
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kib, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kib / 1024, held
		}
	}
	return 0, held
}

// peakMem samples memMiB until stopped and keeps the highest figures.
type peakMem struct {
	baseRSS, baseHeld float64
	rss, held         float64 // peaks; written by the sampler, read after done
	stop              chan struct{}
	done              chan struct{}
}

func watchMem() *peakMem {
	runtime.GC()
	debug.FreeOSMemory()
	p := &peakMem{stop: make(chan struct{}), done: make(chan struct{})}
	p.baseRSS, p.baseHeld = memMiB()
	p.rss, p.held = p.baseRSS, p.baseHeld
	go func() {
		defer close(p.done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-tick.C:
				rss, held := memMiB()
				p.rss, p.held = max(p.rss, rss), max(p.held, held)
			}
		}
	}()
	return p
}

// growth stops sampling and returns the peaks' growth over the base, MiB.
func (p *peakMem) growth() memGrowth {
	close(p.stop)
	<-p.done
	return memGrowth{rss: p.rss - p.baseRSS, held: p.held - p.baseHeld}
}

// memGrowth is how far an attack grew this process's memory, MiB.
type memGrowth struct{ rss, held float64 }

func (g memGrowth) String() string {
	return fmt.Sprintf("memory held %+.0f MiB (process RSS %+.0f MiB)", g.held, g.rss)
}

// repeatReader yields n bytes of b, without holding them.
type repeatReader struct {
	b byte
	n int64
}

func (r *repeatReader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.n)]
	for i := range p {
		p[i] = r.b
	}
	r.n -= int64(len(p))
	return len(p), nil
}

// headerEcho is a dashboard stand-in that answers with the request's
// Spectro-Proxy-* and X-Forwarded-For fields.
func headerEcho(t *testing.T) string {
	t.Helper()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var got []string
		for k, v := range r.Header {
			if strings.HasPrefix(k, "Spectro-Proxy-") || k == "X-Forwarded-For" {
				got = append(got, k+"="+strings.Join(v, ","))
			}
		}
		sort.Strings(got)
		fmt.Fprint(w, strings.Join(got, ";"))
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func TestAbuseUserDrivesTunnelProtocol(t *testing.T) {
	sc := newScene(t, nil, headerEcho(t))
	roots := sc.r.caPool(t)
	at := sc.attack()

	// An HTTP/2 CONNECT to the dashboard host, naming the API server's
	// route as its :authority and the tunnel's upgrade stream kind, with
	// a raw request behind it (forged X-Forwarded-For, then a 400 MiB
	// header line).
	tc, err := tls.Dial("tcp", sc.r.addr, &tls.Config{ServerName: sc.victimDash, RootCAs: roots, NextProtos: []string{"h2"}})
	require.NoError(t, err)
	defer tc.Close()
	// x/net's client sends a CONNECT with any :authority on a conn of
	// our choosing, as an attacker's client would.
	//lint:ignore SA1019 x/net/http2 is what the tunnel itself uses (see internal/tunnel/relay.go)
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	require.NoError(t, err)
	raw := io.MultiReader(strings.NewReader("GET /small HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Forwarded-For: 6.6.6.6\r\nX-Big: "),
		&repeatReader{b: 'a', n: 400 << 20})
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: "cluster-victim"}, Host: "cluster-victim",
		Header: http.Header{tunnel.HeaderStream: {tunnel.StreamUpgrade}}, Body: io.NopCloser(raw)}
	resp, err := cc.RoundTrip(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode, "CONNECT is the tunnel's own protocol")

	// An ordinary request with forged tunnel headers: none reaches the
	// dashboard, and X-Forwarded-For is the relay's.
	hc := httpClient(sc.r, sc.victimDash, roots, true)
	defer hc.CloseIdleConnections()
	greq, _ := http.NewRequest(http.MethodGet, "https://"+sc.victimDash+"/", nil)
	greq.Header.Set(tunnel.HeaderStream, tunnel.StreamTCP)
	greq.Header.Set(tunnel.HeaderRoute, "cluster-victim")
	greq.Header.Set(tunnel.HeaderAgent, "forged")
	greq.Header.Set("Spectro-Proxy-Anything", "x")
	greq.Header.Set("X-Forwarded-For", "6.6.6.6")
	gresp, err := hc.Do(greq)
	require.NoError(t, err)
	body, _ := io.ReadAll(gresp.Body)
	gresp.Body.Close()
	assert.Equal(t, http.StatusOK, gresp.StatusCode)
	assert.Equal(t, "X-Forwarded-For=127.0.0.1", string(body), "the dashboard sees only the relay's headers")

	// TRACE is not served either.
	treq, _ := http.NewRequest("TRACE", "https://"+sc.victimDash+"/", nil)
	tresp, err := hc.Do(treq)
	require.NoError(t, err)
	tresp.Body.Close()
	assert.Equal(t, http.StatusMethodNotAllowed, tresp.StatusCode)

	tc.Close()
	took, grew := at.finish(t)
	assert.Equal(t, float64(2), sc.r.metrics(t)[refusals("method_not_allowed")])
	figure(t, "HTTP/2 CONNECT to a dashboard host naming the API route, forged Spectro-Proxy-Stream and X-Forwarded-For, 400 MiB request line",
		fmt.Sprintf("before (issue 11): forwarded, agent 13 MiB -> 1.1 GiB; now 405 at the relay, forged headers dropped, %v; victim recovered in %v (%v), bystander %v",
			grew, took.Round(time.Millisecond), at.victim, at.bystander),
		"405; memory held grows <= 64 MiB; bystander 0 failed; victim recovers within 2s")
}

// rawServer serves each connection on 127.0.0.1 with handle, in plain
// bytes, for dashboards that misbehave below HTTP. done is closed when the
// test ends, before the listener, so that handlers that wait can return.
func rawServer(t *testing.T, handle func(c net.Conn, done <-chan struct{})) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	done := make(chan struct{})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				handle(c, done)
			})
		}
	})
	t.Cleanup(func() { close(done); ln.Close(); wg.Wait() })
	return "http://" + ln.Addr().String()
}

// hugeUpgrader is a dashboard stand-in (plain HTTP) that answers every
// upgrade with a 101 whose header line never ends, up to 400 MiB. It
// reports how much it managed to write.
func hugeUpgrader(t *testing.T) (string, *atomic.Int64) {
	t.Helper()
	var written atomic.Int64
	url := rawServer(t, func(c net.Conn, _ <-chan struct{}) {
		br := bufio.NewReader(c)
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if l == "\r\n" {
				break
			}
		}
		n, _ := io.Copy(c, io.MultiReader(strings.NewReader("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Big: "),
			&repeatReader{b: 'a', n: 400 << 20}))
		written.Add(n)
	})
	return url, &written
}

func TestAbuseOversizedUpgradeResponse(t *testing.T) {
	const attempts = 5
	dash, written := hugeUpgrader(t)
	sc := newScene(t, nil, dash)
	roots := sc.r.caPool(t)
	at := sc.attack()

	hc := httpClient(sc.r, sc.victimDash, roots, false)
	defer hc.CloseIdleConnections()
	for range attempts {
		req, _ := http.NewRequest(http.MethodGet, "https://"+sc.victimDash+"/ws", nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		resp, err := hc.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusBadGateway, resp.StatusCode)
	}
	took, grew := at.finish(t)
	assert.Equal(t, float64(attempts), sc.r.metrics(t)[refusals("upstream_headers_too_large")])
	assert.Less(t, written.Load(), int64(attempts)*(100<<20), "the dashboard could not push its 400 MiB")
	figure(t, fmt.Sprintf("a dashboard answering %d upgrades with a 400 MiB header line", attempts),
		fmt.Sprintf("before (issue 11): relay 13 MiB -> 1.1-1.7 GiB; now 502 each, stream closed at 64 KiB (upstream_headers_too_large), %.1f MiB written by the dashboard in all, %v; victim recovered in %v (%v), bystander %v",
			float64(written.Load())/(1<<20), grew, took.Round(time.Millisecond), at.victim, at.bystander),
		"502; memory held grows <= 64 MiB; bystander 0 failed; victim recovers within 2s")
}

// badUpgrader is a dashboard stand-in (plain HTTP) whose answer to an
// upgrade depends on the path: /mismatch switches to another protocol
// than asked, /error hangs up without a word, /hang says nothing until
// the connection is closed.
func badUpgrader(t *testing.T) string {
	t.Helper()
	return rawServer(t, func(c net.Conn, done <-chan struct{}) {
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		switch req.URL.Path {
		case "/mismatch":
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
			select {
			case <-done:
			case <-time.After(10 * time.Second):
			}
		case "/hang":
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			io.Copy(io.Discard, c)
		}
	})
}

func TestAbuseUpgradeSlotsReleased(t *testing.T) {
	const maxStreams, attempts = 10, 25 // more failures than slots
	sc := newScene(t, func(c *server.Config) { c.MaxStreamsPerTunnel = maxStreams }, badUpgrader(t))
	roots := sc.r.caPool(t)
	const slots = "spectro_proxy_stream_slots_used"
	var got []string
	for _, shape := range []struct {
		path string
		want int // status, 0 for the client giving up
	}{{"/mismatch", http.StatusBadGateway}, {"/error", http.StatusBadGateway}, {"/hang", 0}} {
		hc := httpClient(sc.r, sc.victimDash, roots, false)
		hc.Timeout = 5 * time.Second
		if shape.want == 0 {
			hc.Timeout = 300 * time.Millisecond // the client gives up
		}
		parallel(attempts, 5, func(int) {
			req, _ := http.NewRequest(http.MethodGet, "https://"+sc.victimDash+shape.path, nil)
			req.Header.Set("Connection", "Upgrade")
			req.Header.Set("Upgrade", "websocket")
			resp, err := hc.Do(req)
			if shape.want == 0 {
				assert.Error(t, err, shape.path)
				return
			}
			if assert.NoError(t, err, shape.path) {
				resp.Body.Close()
				assert.Equal(t, shape.want, resp.StatusCode, shape.path)
			}
		})
		hc.CloseIdleConnections()
		start := time.Now()
		require.Eventually(t, func() bool {
			v, ok := sc.r.metrics(t)[slots]
			return ok && v == 0
		}, 5*time.Second, 20*time.Millisecond, "%s: slots back to zero", shape.path)
		// And the tunnel still carries requests.
		resp, err := sc.victimC.Get("https://" + sc.victim + "/small")
		require.NoError(t, err, shape.path)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode, shape.path)
		// Its HTTP/2 connection is spliced: a slot of its own while it
		// is open, which the next shape's count must not see.
		sc.victimC.CloseIdleConnections()
		got = append(got, fmt.Sprintf("%s: 0 after %v", shape.path, time.Since(start).Round(10*time.Millisecond)))
	}
	assert.Equal(t, float64(attempts), sc.r.metrics(t)[refusals("upgrade_mismatch")])
	figure(t, fmt.Sprintf("%d failed upgrades of each shape on a tunnel of %d slots (mismatched Upgrade, target hung up, client gave up)", attempts, maxStreams),
		"before (issue 11): a mismatched 101 kept its slot, 1000 of them silenced the tunnel; now slots in use "+strings.Join(got, ", ")+", tunnel still serving",
		"slots back to 0 after each")
}

func TestAbuseClientsThatNeverRead(t *testing.T) {
	// As many as one source may open: the worst it can pin.
	conns := server.DefaultMaxStreamsPerSource
	const requests, stall = 4, time.Second
	sc := newSceneMode(t, func(c *server.Config) { c.WriteStallTimeout = stall }, "", tunnel.Passthrough)
	at := sc.attack()

	// Passthrough connections that pipeline requests for 10 MiB each and
	// read nothing.
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	start := time.Now()
	for range conns {
		c, err := tls.Dial("tcp", sc.r.addr, &tls.Config{ServerName: sc.victim, RootCAs: sc.be.roots, NextProtos: []string{"http/1.1"}})
		require.NoError(t, err)
		held = append(held, c)
		for range requests {
			_, err = io.WriteString(c, "GET /big HTTP/1.1\r\nHost: "+sc.victim+"\r\n\r\n")
			require.NoError(t, err)
		}
	}
	// The relay cuts every one once its writes have stalled.
	require.Eventually(t, func() bool { return sc.r.metrics(t)[refusals("write_stall")] == float64(conns) }, stall+10*time.Second, 50*time.Millisecond)
	cut := time.Since(start)
	for _, c := range held {
		c.Close()
	}
	took, grew := at.finish(t)
	figure(t, fmt.Sprintf("%d passthrough connections pipelining %d requests for 10 MiB each and reading nothing", conns, requests),
		fmt.Sprintf("before (issue 11): relay 13 -> 286 MiB, the cluster's new requests timed out; now all cut by the %v write-stall timeout after %v, %v; victim %v (recovered in %v), bystander %v",
			stall, cut.Round(10*time.Millisecond), grew, at.victim, took.Round(time.Millisecond), at.bystander),
		"memory held grows <= 64 MiB; bystander 0 failed; victim recovers within 2s")
}

func TestAbuseOneSourceTakesAllStreams(t *testing.T) {
	const maxStreams, perSource, n = 100, 32, 200
	sc := newSceneMode(t, func(c *server.Config) {
		c.MaxStreamsPerTunnel = maxStreams
		c.MaxStreamsPerSource = perSource
	}, "", tunnel.Passthrough)
	at := sc.attack()
	var mu sync.Mutex
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	var refused atomic.Int64
	start := time.Now()
	parallel(n, 16, func(int) {
		c, err := dialTLS(sc.r, sc.victim, sc.be.roots)
		if err != nil {
			refused.Add(1)
			return
		}
		mu.Lock()
		held = append(held, c)
		mu.Unlock()
	})
	took := time.Since(start)
	// While one source holds its share, another still gets through.
	resp, err := sc.victimC.Get("https://" + sc.victim + "/small")
	require.NoError(t, err, "the cluster serves another source while one holds its share")
	resp.Body.Close()
	mu.Lock()
	carried := len(held)
	for _, c := range held {
		c.Close()
	}
	mu.Unlock()
	rec, grew := at.finish(t)
	assert.Equal(t, perSource, carried)
	assert.Equal(t, float64(n-perSource), sc.r.metrics(t)[refusals("too_many_streams_from_source")])
	figure(t, fmt.Sprintf("%d idle passthrough TLS connections from one source to one cluster (%d slots per tunnel)", n, maxStreams),
		fmt.Sprintf("before (issue 11): 1000 in under 3s took every slot, kubectl got tls: internal error; now %d carried, %d refused (too_many_streams_from_source) in %v, another source served; %v; victim %v (recovered in %v), bystander %v",
			carried, refused.Load(), took.Round(time.Millisecond), grew, at.victim, rec.Round(time.Millisecond), at.bystander),
		fmt.Sprintf("%d per source; bystander 0 failed", perSource))
}

func TestAbuseRevokedAndExpiredSessionsEnd(t *testing.T) {
	const interval, ttl = 500 * time.Millisecond, 3 * time.Second
	be := newBackend(t)
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) { c.RevocationInterval = interval })
	roots := r.caPool(t)
	revTok, revClaims := r.issue(t, "revoked", "", time.Hour)
	expTok, expClaims := r.issue(t, "expiring", "", ttl)
	for uid, tok := range map[string]string{"revoked": revTok, "expiring": expTok} {
		startAgent(t, r, client.Config{ClusterUID: uid, TokenFile: tok, Mode: tunnel.Terminate, APIServer: be.srv.URL, APIServerCAFile: be.caFile,
			BackoffMin: 50 * time.Millisecond, BackoffMax: 200 * time.Millisecond}).waitReady(t)
	}
	served := func(uid string) bool {
		hc := httpClient(r, "cluster-"+uid+"."+domain, roots, true)
		defer hc.CloseIdleConnections()
		resp, err := hc.Get("https://cluster-" + uid + "." + domain + "/small")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	require.True(t, served("revoked"))
	require.True(t, served("expiring"))

	require.NoError(t, os.WriteFile(r.revoked, []byte(revClaims.ID+"\n"), 0o600))
	revokedAt := time.Now()
	require.Eventually(t, func() bool { return !served("revoked") }, interval+3*time.Second, 50*time.Millisecond,
		"a revoked token's session ends within the revocation interval and a few seconds")
	revokedEnd := time.Since(revokedAt)

	expiresAt := time.Unix(expClaims.ExpiresAt, 0)
	require.Eventually(t, func() bool { return !served("expiring") }, time.Until(expiresAt)+3*time.Second, 50*time.Millisecond,
		"an expired token's session ends at the expiry")
	expiredLate := time.Since(expiresAt)
	m := r.metrics(t)
	assert.Equal(t, float64(1), m[refusals("session_revoked")])
	assert.Equal(t, float64(1), m[refusals("session_expired")])
	figure(t, "live sessions of a revoked token and of a token with a 3s TTL",
		fmt.Sprintf("before (issue 11): both still carried requests 15s after revocation and 12s after expiry; now the revoked one ended %v after the revocation (interval %v), the expired one %v after its expiry",
			revokedEnd.Round(10*time.Millisecond), interval, expiredLate.Round(10*time.Millisecond)),
		"revocation: interval + a few s; TTL: at expiry")
}

// A configured revocation file that does not exist revokes nothing; the
// relay says so loudly at start.
func TestMissingRevocationFileLogged(t *testing.T) {
	var logs syncBuffer
	startRelay(t, "127.0.0.1:0", "", func(c *server.Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "revocation file does not exist") }, 5*time.Second, 10*time.Millisecond)
	assert.Contains(t, logs.String(), "level=ERROR")
}

func TestAbuseSessionsPerCluster(t *testing.T) {
	const n, maxSessions = 100, 8
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) { c.MaxSessionsPerCluster = maxSessions })
	tokFile, _ := r.issue(t, "greedy", "", time.Hour)
	tok, err := os.ReadFile(tokFile)
	require.NoError(t, err)
	var conns []*websocket.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var upgraded, limited int
	start := time.Now()
	for i := range n {
		c, resp, err := dialTunnel(t, r, &net.Dialer{}, strings.TrimSpace(string(tok)), fmt.Sprintf("agent-%d", i), "cluster-greedy=terminate")
		if err == nil {
			upgraded++
			conns = append(conns, c)
			continue
		}
		if resp != nil && resp.StatusCode == http.StatusTooManyRequests {
			limited++
		}
	}
	took := time.Since(start)
	require.Eventually(t, func() bool { return r.srv.Tunnels() <= maxSessions }, 5*time.Second, 20*time.Millisecond)
	m := r.metrics(t)
	sessions := r.srv.Tunnels()
	assert.LessOrEqual(t, sessions, maxSessions)
	assert.Positive(t, m[refusals("too_many_sessions")]+m[refusals("cluster_rate_limited")])
	// Another cluster still registers at once.
	be := newBackend(t)
	otherTok, _ := r.issue(t, "other", "", time.Hour)
	startAgent(t, r, client.Config{ClusterUID: "other", TokenFile: otherTok, Mode: tunnel.Terminate, APIServer: be.srv.URL, APIServerCAFile: be.caFile}).waitReady(t)
	figure(t, fmt.Sprintf("%d registrations of one token under new agent ids", n),
		fmt.Sprintf("before (issue 11): over 1000 sessions in 5s; now %d sessions at most (max %d): %d upgraded, %d turned away with 429 (too_many_sessions: %.0f, cluster_rate_limited: %.0f) in %v; another cluster registered",
			sessions, maxSessions, upgraded, limited, m[refusals("too_many_sessions")], m[refusals("cluster_rate_limited")], took.Round(time.Millisecond)),
		fmt.Sprintf("<= %d sessions per cluster", maxSessions))
}

func TestAbuseCookieTossingAndMisdirected(t *testing.T) {
	dash := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Set-Cookie", "session=1; Path=/; Domain="+domain+"; HttpOnly")
		w.Header().Add("Set-Cookie", "other=2; domain=.proxy.test")
		w.Header().Add("Set-Cookie", "plain=3; Secure")
	}))
	t.Cleanup(dash.Close)
	sc := newScene(t, nil, dash.URL)
	roots := sc.r.caPool(t)
	hc := httpClient(sc.r, sc.victimDash, roots, true)
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("https://" + sc.victimDash + "/")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, []string{"session=1; Path=/; HttpOnly", "other=2", "plain=3; Secure"}, resp.Header["Set-Cookie"],
		"no cookie is set for the relay's whole domain")

	// A cluster's host on a connection for the relay's own name.
	api := httpClient(sc.r, domain, roots, true)
	defer api.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodGet, "https://"+domain+"/small", nil)
	req.Host = sc.victim
	resp, err = api.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusMisdirectedRequest, resp.StatusCode)

	// A cluster's host on an HTTP/2 connection opened for another
	// cluster's API server, which the relay splices (a browser coalescing
	// hosts the wildcard certificate covers): held back, and the client
	// told to go away, with the request before it answered.
	tc, err := tls.Dial("tcp", sc.r.addr, &tls.Config{ServerName: sc.bystander, RootCAs: roots, NextProtos: []string{"h2"}})
	require.NoError(t, err)
	defer tc.Close()
	//lint:ignore SA1019 x/net/http2 is what the tunnel itself uses (see internal/tunnel/relay.go)
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	require.NoError(t, err)
	own, _ := http.NewRequest(http.MethodGet, "https://"+sc.bystander+"/small", nil)
	resp, err = cc.RoundTrip(own)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	m := sc.r.metrics(t)
	assert.Equal(t, 1.0, m[`spectro_proxy_streams_open{kind="spliced"}`], "the connection is spliced")
	before := m[refusals("misdirected_request")]
	coalesced, _ := http.NewRequest(http.MethodGet, "https://"+sc.victim+"/small", nil)
	resp, err = cc.RoundTrip(coalesced)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusMisdirectedRequest, resp.StatusCode, "another cluster's request is not forwarded on this connection")
	require.Eventually(t, func() bool { return !cc.CanTakeNewRequest() }, 5*time.Second, 5*time.Millisecond, "the client was told to go away")
	assert.Equal(t, before+1, sc.r.metrics(t)[refusals("misdirected_request")])

	// The same over HTTP/1.1, spliced too: 421 after the answers before
	// it, and the connection closed.
	h1c, err := tls.Dial("tcp", sc.r.addr, &tls.Config{ServerName: sc.bystander, RootCAs: roots, NextProtos: []string{"http/1.1"}})
	require.NoError(t, err)
	defer h1c.Close()
	fmt.Fprintf(h1c, "GET /small HTTP/1.1\r\nHost: %s\r\n\r\nGET /small HTTP/1.1\r\nHost: %s\r\n\r\n", sc.bystander, sc.victim)
	br := bufio.NewReader(h1c)
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	io.Copy(io.Discard, resp.Body)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	assert.Equal(t, http.StatusMisdirectedRequest, resp.StatusCode, string(body))
	assert.True(t, resp.Close)
	assert.Equal(t, before+2, sc.r.metrics(t)[refusals("misdirected_request")])

	// A workload behind a cluster's API server (its proxy) setting a
	// cookie for the whole domain, on spliced connections: the cookie
	// stays on the cluster's host. Over HTTP/1.1 the Domain is removed;
	// over HTTP/2 renamed, which keeps both ends' HPACK tables in step.
	cc.Close()
	h1c.Close()
	spliced := func() float64 { return sc.r.metrics(t)[`spectro_proxy_streams_open{kind="spliced"}`] }
	require.Eventually(t, func() bool { return spliced() == 0 }, 5*time.Second, 10*time.Millisecond)
	for _, h2 := range []bool{false, true} {
		c := httpClient(sc.r, sc.bystander, roots, h2)
		for range 2 { // the second from HPACK's dynamic table
			resp, err := c.Get("https://" + sc.bystander + "/cookies")
			require.NoError(t, err)
			resp.Body.Close()
			want := []string{"session=1; Path=/; HttpOnly", "other=2"}
			if h2 {
				want = []string{"session=1; Path=/; Xomain=" + domain + "; HttpOnly", "other=2; Xomain=.proxy.test"}
			}
			assert.Equal(t, want, resp.Header["Set-Cookie"], "HTTP/2: %v", h2)
		}
		assert.Equal(t, 1.0, spliced(), "spliced (HTTP/2: %v)", h2)
		c.CloseIdleConnections()
		require.Eventually(t, func() bool { return spliced() == 0 }, 5*time.Second, 10*time.Millisecond)
	}
	figure(t, "a dashboard, and a workload behind an API server, setting cookies with Domain=<relay domain>; a cluster host on the relay's own SNI; on another cluster's spliced HTTP/2 and HTTP/1.1 connections",
		"before (issue 11): passed through (cookie tossing between tenants); 404; now Domain removed or renamed (host-only cookies); 421; 421 and GOAWAY (HTTP/2) or close (HTTP/1.1), not forwarded",
		"no Domain; 421; 421, not forwarded")
}

func TestAbuseHelloBudgetFilledBySources(t *testing.T) {
	const total, perSource, sources = 200, 50, 5
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) {
		c.MaxPendingHellos = total
		c.MaxPendingHellosPerSource = perSource
		c.HelloTimeout = 10 * time.Second
	})
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	start := time.Now()
	for s := range sources {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(s+1))}, Timeout: 5 * time.Second}
		for range perSource {
			c, err := d.Dial("tcp", r.addr)
			require.NoError(t, err)
			_, err = c.Write([]byte{0x16, 0x03})
			require.NoError(t, err)
			held = append(held, c)
		}
	}
	// Every place is taken (or was, until a newer one took it); a client
	// from another address is still served, at the expense of the
	// oldest silent socket of the biggest source.
	require.Eventually(t, func() bool {
		m := r.metrics(t)
		return m[refusals("hello_evicted")] >= float64(sources*perSource-total)
	}, 5*time.Second, 20*time.Millisecond)
	var served int
	for range 10 {
		lc, err := (&tls.Dialer{NetDialer: otherSource, Config: &tls.Config{ServerName: domain, RootCAs: r.caPool(t)}}).Dial("tcp", r.addr)
		if assert.NoError(t, err, "a client from another address is served while the budget is full") {
			served++
			lc.Close()
		}
	}
	m := r.metrics(t)
	figure(t, fmt.Sprintf("pre-ClientHello budget (%d) filled by %d sources of %d silent sockets", total, sources, perSource),
		fmt.Sprintf("before (issue 11): 16 sources filled the global cap and every other client was refused; now %d of 10 other clients served in %v, %.0f oldest silent sockets evicted, %.0f refused",
			served, time.Since(start).Round(time.Millisecond), m[refusals("hello_evicted")], m[refusals("too_many_pending_hellos")]),
		"other clients served")
}

func TestAbuseIdleKeepAlives(t *testing.T) {
	const n, maxIdle = 400, 100
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) { c.MaxIdleConnsPerSource = maxIdle })
	roots := r.caPool(t)
	before := heapMiB()
	conns := make([]*tls.Conn, n)
	parallel(n, 16, func(i int) {
		c, err := tls.Dial("tcp", r.addr, &tls.Config{ServerName: domain, RootCAs: roots, NextProtos: []string{"http/1.1"}})
		if !assert.NoError(t, err) {
			return
		}
		conns[i] = c
		_, err = io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: "+domain+"\r\n\r\n")
		require.NoError(t, err)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if assert.NoError(t, err) {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	require.Eventually(t, func() bool { return r.metrics(t)[refusals("too_many_idle_conns")] == n-maxIdle }, 5*time.Second, 20*time.Millisecond)
	// The relay closed the excess: reading finds EOF on n-maxIdle of them.
	var closed atomic.Int64
	parallel(n, 32, func(i int) {
		if conns[i] == nil {
			return
		}
		conns[i].SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := conns[i].Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			closed.Add(1)
		}
	})
	assert.Equal(t, int64(n-maxIdle), closed.Load())
	// Another source keeps its own.
	hc := legitClient(r, domain, roots)
	defer hc.CloseIdleConnections()
	resp, err := hc.Get("https://" + domain + "/healthz")
	require.NoError(t, err)
	resp.Body.Close()
	figure(t, fmt.Sprintf("%d idle keep-alive connections from one source to the relay's own name", n),
		fmt.Sprintf("before (issue 11): 3000 stayed open at ~40 KiB each; now %d kept (max %d per source), %d closed (too_many_idle_conns), heap %+.1f MiB; another source served",
			int64(n)-closed.Load(), maxIdle, closed.Load(), heapMiB()-before),
		fmt.Sprintf("<= %d idle per source", maxIdle))
}
