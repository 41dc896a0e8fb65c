package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/kubereq"
	"github.com/spectroproxy/spectro-proxy/internal/kubestatus"
	"github.com/spectroproxy/spectro-proxy/internal/setcookie"
	"github.com/spectroproxy/spectro-proxy/internal/sni"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// serveTerminated forwards a request whose TLS the relay terminated to the
// agent serving label. An HTTP/2 request is proxied on a worker, whose
// stack is grown already (workers.go).
func (s *Server) serveTerminated(w http.ResponseWriter, r *http.Request, label string) {
	if r.ProtoMajor == 2 {
		s.workers.run(func() { s.proxyTerminated(w, r, label) })
		return
	}
	s.proxyTerminated(w, r, label)
}

func (s *Server) proxyTerminated(w http.ResponseWriter, r *http.Request, label string) {
	// CONNECT is the tunnel's own stream protocol (and a user's CONNECT
	// would carry the user's :authority down it); nothing behind a
	// terminate-mode route serves it, nor methods outside HTTP's usual set.
	if !servedMethods[r.Method] {
		s.refuse(reasonMethodNotAllowed, "host", label, "method", r.Method, "remote", r.RemoteAddr)
		w.Header().Set("Allow", allowedMethods)
		kubestatus.Write(w, http.StatusMethodNotAllowed, "MethodNotAllowed", "spectro-proxy: method "+r.Method+" is not served here")
		return
	}
	release, ok := s.srcStreams.enter(sourceOf(r.RemoteAddr), label)
	if !ok {
		s.refuse(reasonTooManyStreamsFromSource, "host", label, "remote", r.RemoteAddr, "max", s.cfg.MaxStreamsPerSource)
		w.Header().Set("Retry-After", "1")
		kubestatus.Write(w, http.StatusTooManyRequests, "TooManyRequests",
			fmt.Sprintf("spectro-proxy: more than %d concurrent requests from your address to %s", s.cfg.MaxStreamsPerSource, label))
		return
	}
	defer release()
	if r.ProtoMajor == 2 {
		// A stream of an HTTP/2 connection can stall alone (the client
		// reads the others): each write to it must finish in time.
		w = &stallWriter{ResponseWriter: w, rc: http.NewResponseController(w), d: s.cfg.WriteStallTimeout}
	}
	// streamed lets the drain end a watch's response at an event boundary.
	streamed := func(*http.Response) {}
	if isUpgrade(r) {
		s.conns.Add(1) // hijacked connections are ours to drain
		defer s.conns.Done()
		w = closeOnStop{ResponseWriter: w, ctx: r.Context()}
		s.m.streams.WithLabelValues("upgrade").Inc()
		defer s.m.streams.WithLabelValues("upgrade").Dec()
		s.inFlight.Add(1)
		defer s.inFlight.Add(-1)
	} else {
		req := s.drainer.enter()
		defer req.done()
		streamed = func(resp *http.Response) { s.streamResponse(r, resp, req) }
		g := s.m.streams.WithLabelValues("http") // one label lookup per request, not two
		g.Inc()
		defer g.Dec()
		s.inFlight.Add(1)
		defer s.inFlight.Add(-1)
		if r.ProtoMajor == 1 {
			// The response streams back while the request body may still
			// be arriving (an upstream that answers early, or echoes).
			// net/http's HTTP/1 server would otherwise cut the request
			// body once the response starts, truncating both.
			_ = http.NewResponseController(w).EnableFullDuplex()
		}
	}
	if s.forwardTerminated(w, r, label, streamed) {
		return // no local tunnel: another replica's (forward.go)
	}
	if s.serveShort(w, r, label, streamed) {
		return
	}
	bufs := &tunnel.ResponseBuffers{}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "https"
			pr.Out.URL.Host = label
			pr.Out.Host = r.Host
			pr.SetXForwarded()
			// The relay alone speaks the tunnel's protocol: whatever
			// Spectro-Proxy-* fields a user sent are dropped.
			tunnel.StripInternal(pr.Out.Header)
			tunnel.StripInternal(pr.Out.Trailer)
		},
		Transport:  routeTransport{s: s, label: label},
		BufferPool: bufs,
		// Watches and logs -f (no Content-Length) are flushed at every
		// write by ReverseProxy itself; a response of known length goes
		// out without a flush per write (see client/forward.go).
		FlushInterval: 0,
		// A dashboard's cookie must stay on its own host: with Domain set
		// to the relay's domain it would reach every other tenant's
		// hosts (cookie tossing; SameSite does not separate tenants of
		// one site).
		ModifyResponse: func(resp *http.Response) error {
			stripCookieDomains(resp.Header)
			streamed(resp)
			bufs.Size(resp)
			return nil
		},
		ErrorHandler: s.proxyError,
		ErrorLog:     nil,
	}
	rp.ServeHTTP(w, r)
}

// growStack makes the calling goroutine's stack fit what a request's
// proxying needs, in one step, for an HTTP/2 request that finds every
// worker busy (workers.go). Each HTTP/2 request runs in a new goroutine
// whose stack starts small (Go sizes it to the average of all of the
// relay's goroutines, most of them small) and was doubled three times
// deep inside ReverseProxy, each time copying and adjusting every frame
// above (docs/performance.md, seventh pass). One growth here, near the
// goroutine's top, copies almost nothing. A goroutine that holds its
// request long (a watch) gets its stack shrunk back by the GC.
//
//go:noinline
func growStack() {
	var frame [8 << 10]byte
	keepFrame(frame[:])
}

// keepFrame keeps the compiler from dropping growStack's frame.
//
//go:noinline
func keepFrame([]byte) {}

// servedMethods are the methods terminate-mode routes (the API server,
// dashboards) serve.
var servedMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true,
	http.MethodPatch: true, http.MethodDelete: true, http.MethodOptions: true,
}

const allowedMethods = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" && headerHasToken(r.Header, "Connection", "upgrade")
}

// upgradeType is the protocol an Upgrade header names, when Connection
// says upgrade.
func upgradeType(h http.Header) string {
	if !headerHasToken(h, "Connection", "upgrade") {
		return ""
	}
	return h.Get("Upgrade")
}

// errUpgradeMismatch: the target switched to another protocol than the
// one asked for.
var errUpgradeMismatch = errors.New("upgrade mismatch")

func headerHasToken(h http.Header, name, tok string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), tok) {
				return true
			}
		}
	}
	return false
}

// proxyError answers in the form kubectl prints well: a Kubernetes Status.
func (s *Server) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	code, reason := http.StatusBadGateway, "BadGateway"
	var na *noAgentError
	if errors.As(err, &na) {
		code, reason = http.StatusServiceUnavailable, "ServiceUnavailable"
		s.refuse(reasonAgentUnavailable, "host", na.label, "remote", r.RemoteAddr)
	} else if errors.Is(err, errTooManyStreams) {
		code, reason = http.StatusServiceUnavailable, "ServiceUnavailable"
		w.Header().Set("Retry-After", "1")
		s.refuse(reasonTooManyStreams, "host", r.Host, "remote", r.RemoteAddr)
	} else if errors.Is(err, errUpgradeMismatch) {
		s.refuse(reasonUpgradeMismatch, "host", r.Host, "remote", r.RemoteAddr, "error", err.Error())
	} else if tunnel.IsHeaderTooLarge(err) {
		s.refuse(reasonUpstreamHeadersTooLarge, "host", r.Host, "remote", r.RemoteAddr, "error", err.Error())
	} else if errors.Is(err, context.Canceled) {
		return // the client went away; nobody to answer
	} else {
		s.refuse(reasonStreamFailed, "host", r.Host, "remote", r.RemoteAddr, "error", err.Error())
	}
	kubestatus.Write(w, code, reason, "spectro-proxy: "+err.Error())
}

type noAgentError struct{ label string }

func (e *noAgentError) Error() string {
	return fmt.Sprintf("no agent connected for %s (is the spectro-proxy agent running in the cluster?)", e.label)
}

// routeTransport sends requests down the tunnel of an agent serving label.
type routeTransport struct {
	s     *Server
	label string
}

func (t routeTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	cands, _, _ := t.s.reg.candidates(t.label)
	if len(cands) == 0 {
		return nil, &noAgentError{label: t.label}
	}
	if isUpgrade(req) {
		return t.upgrade(req, cands)
	}
	// Requests that end soon and carry no body go on an HTTP/1.1
	// connection to the target where the agent serves them
	// (httpconns.go); the rest are HTTP/2 requests on the tunnel, which
	// name their route.
	short := kubereq.Short(req) && kubereq.Replayable(req)
	var errs []error
	for i, sess := range cands {
		var resp *http.Response
		var err error
		onHTTPConn := short && sess.httpStreams
		if onHTTPConn {
			resp, err = t.s.roundTripHTTP(sess, t.label, req)
		}
		if !onHTTPConn || errors.Is(err, errPoolClosed) {
			resp, err = t.roundTripTunnel(sess, req)
		}
		if err == nil {
			return resp, nil
		}
		errs = append(errs, err)
		if errors.Is(err, errTooManyStreams) {
			continue // nothing was sent
		}
		// Only a request without a body can be replayed on another
		// replica; a body may be half sent.
		if req.Context().Err() != nil || kubereq.HasBody(req) || i == len(cands)-1 {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// roundTripTunnel sends req as an HTTP/2 request on sess's tunnel.
func (t routeTransport) roundTripTunnel(sess *session, req *http.Request) (*http.Response, error) {
	req.Header.Set(tunnel.HeaderRoute, t.label)
	if !sess.acquire() {
		return nil, fmt.Errorf("agent %s: %w (%d)", sess.agentID, errTooManyStreams, sess.maxStreams)
	}
	resp, err := sess.cc.RoundTrip(req)
	if err != nil {
		sess.release()
		return nil, fmt.Errorf("agent %s: %w", sess.agentID, err)
	}
	// The stream is open until ReverseProxy closes the body.
	resp.Body = &releaseBody{ReadCloser: resp.Body, slot: &slot{sess: sess}}
	return resp, nil
}

// upgrade opens a raw stream, writes the HTTP/1.1 request on it for the
// agent to forward, and returns the target's answer; on 101 the response
// body is the raw stream both ways, which ReverseProxy joins to the client.
func (t routeTransport) upgrade(req *http.Request, cands []*session) (*http.Response, error) {
	st, err := t.s.openStream(req.Context(), t.label, tunnel.StreamUpgrade, cands)
	if err != nil {
		return nil, err
	}
	// The slot is given back on every path: ReverseProxy does not close
	// the body of a 101 it refuses (an Upgrade that does not match, a
	// connection it cannot hijack), and the request's context ends when
	// the handler returns, whatever happened.
	context.AfterFunc(req.Context(), func() { st.Close() })
	if err := writeRequest(st, req); err != nil {
		st.Close()
		return nil, fmt.Errorf("writing upgrade request to tunnel: %w", err)
	}
	// The answer comes from the target (a tenant's dashboard, say):
	// its header section is bounded before the relay holds it.
	lim := &tunnel.HeaderLimitReader{R: st}
	br := bufio.NewReader(lim)
	resp, err := readBoundedResponse(br, lim, tunnel.MaxUpgradeResponseHeaderBytes, req)
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("reading upgrade response from tunnel: %w", err)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		if want, got := upgradeType(req.Header), upgradeType(resp.Header); !strings.EqualFold(want, got) {
			st.Close()
			return nil, fmt.Errorf("%w: asked for %q, target switched to %q", errUpgradeMismatch, want, got)
		}
		resp.Body = &upgradedStream{Reader: br, st: st, s: t.s}
		return resp, nil
	}
	resp.Body = &closeBoth{ReadCloser: resp.Body, c: st}
	return resp, nil
}

// upgradedStream is the body ReverseProxy expects for a 101: readable and
// writable. Reads drain what the response reader buffered first.
type upgradedStream struct {
	io.Reader
	st *countedStream
	s  *Server
}

func (u *upgradedStream) Read(p []byte) (int, error) {
	n, err := u.Reader.Read(p)
	u.s.m.bytes.WithLabelValues("from_agent").Add(float64(n))
	return n, err
}

func (u *upgradedStream) Write(p []byte) (int, error) {
	n, err := u.st.Write(p)
	u.s.m.bytes.WithLabelValues("to_agent").Add(float64(n))
	return n, err
}

func (u *upgradedStream) CloseWrite() error { return u.st.CloseWrite() }
func (u *upgradedStream) Close() error      { return u.st.Close() }

// stripCookieDomains removes the Domain attribute of every Set-Cookie in
// h, making each a host-only cookie of the host that set it (setcookie).
func stripCookieDomains(h http.Header) {
	for i, c := range h["Set-Cookie"] {
		if setcookie.HasDomain([]byte(c)) {
			h["Set-Cookie"][i] = string(setcookie.StripDomain([]byte(c)))
		}
	}
}

// stallWriter gives each write to a response WriteStallTimeout to finish;
// past it the stream is reset.
//
// It keeps its own timer rather than moving the stream's write deadline
// around each write: on an HTTP/2 stream SetWriteDeadline is a message to
// the connection's serve loop (a channel send and a wakeup, and a timer
// made there), two per write and two per flush, which profiles of small
// GETs over HTTP/2 showed on every request. A deadline in the past, set
// only when the timer fires, resets the stream at once from the timer's
// goroutine.
type stallWriter struct {
	http.ResponseWriter
	rc *http.ResponseController
	d  time.Duration
	t  *time.Timer // made by the first write; armed only while one runs
}

func (w *stallWriter) arm() {
	if w.t == nil {
		w.t = time.AfterFunc(w.d, w.stalled)
		return
	}
	w.t.Reset(w.d)
}

func (w *stallWriter) disarm() { w.t.Stop() }

// stalled resets the stream: a write has waited WriteStallTimeout.
func (w *stallWriter) stalled() { _ = w.rc.SetWriteDeadline(time.Unix(1, 0)) }

func (w *stallWriter) Write(p []byte) (int, error) {
	w.arm()
	n, err := w.ResponseWriter.Write(p)
	w.disarm()
	return n, err
}

func (w *stallWriter) Flush() {
	w.arm()
	_ = w.rc.Flush()
	w.disarm()
}

func (w *stallWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// releaseBody gives the stream's slot back when the body is closed.
type releaseBody struct {
	io.ReadCloser
	slot *slot
}

func (b *releaseBody) Close() error { defer b.slot.free(); return b.ReadCloser.Close() }

type closeBoth struct {
	io.ReadCloser
	c io.Closer
}

func (c *closeBoth) Close() error {
	err := c.ReadCloser.Close()
	c.c.Close()
	return err
}

var _ net.Conn = (*sni.Conn)(nil)

// closeOnStop is an upgrade's ResponseWriter: the connection it hijacks is
// closed when the request's context ends, which the drain's hard stop
// does. ReverseProxy then closes the backend's side, but it waits for the
// user's side to end as well once the backend has ended cleanly (it
// half-closes to the user, who may still be sending), and a user who
// sends nothing and keeps the connection (an exec session left open)
// never ends it: the relay's drain waited forever
// (TestDrainCutsHalfClosedUpgrade; TestDrainCutsForwardedUpgrade, now
// and then, when the tunnel's end read as a clean one).
type closeOnStop struct {
	http.ResponseWriter
	ctx context.Context
}

func (w closeOnStop) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w closeOnStop) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	// Once the request is over (ReverseProxy closed c), this closes it
	// again: harmless.
	context.AfterFunc(w.ctx, func() { c.Close() })
	return c, brw, nil
}
