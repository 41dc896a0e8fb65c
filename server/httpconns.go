package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Terminate-mode requests that end soon and carry no body (gets, lists,
// deletes: most of what kubectl and dashboards send) travel as HTTP/1.1
// on keep-alive connections to the route's target, each a raw stream
// (tunnel.StreamHTTP) that the agent joins to a connection of its own.
// The agent then reads none of them: no HTTP/2 request, handler and
// second reverse proxy per request there, which cost as much again as
// the relay's own work (docs/performance.md, fifth pass). Watches, logs
// -f and requests with a body stay HTTP/2 requests on the tunnel, where
// any number share one connection and a body may stream both ways.
const (
	// maxIdleHTTPConns bounds the idle connections a session keeps per
	// route: each holds a stream on the tunnel, about 80 KiB of the
	// relay (x/net keeps a frame's scratch buffer while a request body
	// is open) and a connection to the target on the agent.
	maxIdleHTTPConns = 64
	// httpConnIdle closes a connection unused that long: a burst's
	// connections do not outlive it by much.
	httpConnIdle = 30 * time.Second
	// retireEvery is how often the relay looks for tunnels that went
	// away (see retireHTTPConns).
	retireEvery = 250 * time.Millisecond
)

// pooledSessions are the sessions with HTTP connection pools, for
// retireHTTPConns.
type pooledSessions struct {
	mu  sync.Mutex
	set map[*session]struct{}
}

func (p *pooledSessions) add(sess *session) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.set == nil {
		p.set = map[*session]struct{}{}
	}
	p.set[sess] = struct{}{}
}

func (p *pooledSessions) remove(sess *session) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.set, sess)
}

func (p *pooledSessions) list() []*session {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*session, 0, len(p.set))
	for sess := range p.set {
		out = append(out, sess)
	}
	return out
}

// retireHTTPConns closes, every retireEvery until ctx is done, the pools
// of sessions whose agent sent GOAWAY. An agent that moves or stops
// shuts its tunnel down gracefully, waiting for the streams open on it;
// an idle kept-alive connection is such a stream and would hold the
// agent until its drain timeout. The relay alone knows a connection is
// between requests, so it closes them (and the busy ones as their
// requests end).
func (s *Server) retireHTTPConns(ctx context.Context) {
	t := time.NewTicker(retireEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, sess := range s.pooled.list() {
			if sess.cc.GoingAway() {
				s.closeHTTPConns(sess)
			}
		}
	}
}

// httpConns are a session's pools of such connections, one per label,
// made by the first request for the label.
type httpConns struct {
	mu      sync.Mutex
	byLabel map[string]*http.Transport
	closed  bool
}

// errPoolClosed: the session's tunnel is going away; its requests take
// the HTTP/2 path, which fails over to another tunnel.
var errPoolClosed = errors.New("tunnel going away")

// transport returns sess's pool for label.
func (s *Server) httpTransport(sess *session, label string) (*http.Transport, error) {
	hc := &sess.http
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.closed {
		return nil, errPoolClosed
	}
	if t := hc.byLabel[label]; t != nil {
		return t, nil
	}
	t := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return s.dialHTTPConn(ctx, sess, label)
		},
		// The client's Accept-Encoding goes through untouched, and so
		// does the answer.
		DisableCompression:     true,
		MaxIdleConnsPerHost:    maxIdleHTTPConns,
		IdleConnTimeout:        httpConnIdle,
		MaxResponseHeaderBytes: tunnel.MaxResponseHeaderBytes,
		// No proxy (the zero Transport's), and no HTTP/2: the stream
		// is plain bytes, TLS is the agent's.
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{},
	}
	if hc.byLabel == nil {
		hc.byLabel = map[string]*http.Transport{}
		s.pooled.add(sess)
	}
	hc.byLabel[label] = t
	return t, nil
}

// closeHTTPConns closes sess's pools for good (its tunnel went away or
// ended).
func (s *Server) closeHTTPConns(sess *session) {
	sess.http.close()
	s.pooled.remove(sess)
}

// close closes the pools' idle connections, and the busy ones once their
// requests end (no request queues on a closed pool again, so net/http
// keeps closing connections that become idle).
func (hc *httpConns) close() {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	hc.closed = true
	for _, t := range hc.byLabel {
		t.CloseIdleConnections()
	}
}

// roundTripHTTP sends req on one of sess's connections for label. The
// request holds one of the session's stream slots until its body is
// closed, as an HTTP/2 request does; idle connections hold none (they are
// bounded by maxIdleHTTPConns), so the slots still count what users are
// doing now, and an idle pool never keeps an upgrade or a passthrough
// connection out.
func (s *Server) roundTripHTTP(sess *session, label string, req *http.Request) (*http.Response, error) {
	t, err := s.httpTransport(sess, label)
	if err != nil {
		return nil, err
	}
	if !sess.acquire() {
		return nil, fmt.Errorf("agent %s: %w (%d)", sess.agentID, errTooManyStreams, sess.maxStreams)
	}
	// The request line says http: the bytes on the stream are plain,
	// whatever the target speaks (the agent's connection to it).
	out := *req
	u := *req.URL
	u.Scheme = "http"
	out.URL = &u
	resp, err := t.RoundTrip(&out)
	if err != nil {
		sess.release()
		return nil, fmt.Errorf("agent %s: %w", sess.agentID, err)
	}
	resp.Body = &releaseBody{ReadCloser: resp.Body, slot: &slot{sess: sess}}
	return resp, nil
}

// dialHTTPConn opens a StreamHTTP stream for label on sess without
// waiting for the agent's answer (the request follows the stream's
// headers at once).
func (s *Server) dialHTTPConn(ctx context.Context, sess *session, label string) (net.Conn, error) {
	// The connection outlives the request that dialed it (it goes back
	// to the pool): its stream must not end with that request.
	st := tunnel.OpenStreamEarly(context.WithoutCancel(ctx), sess.cc, label, tunnel.StreamHTTP, s.cfg.StreamTimeout)
	return streamConn{st}, nil
}

// streamConn is a stream as the net.Conn http.Transport dials. It has no
// addresses and no deadlines (the Transport sets none on plain
// connections); the tunnel's liveness checks end a stream whose agent is
// gone.
type streamConn struct{ *tunnel.Stream }

func (streamConn) LocalAddr() net.Addr                { return streamAddr{} }
func (streamConn) RemoteAddr() net.Addr               { return streamAddr{} }
func (streamConn) SetDeadline(t time.Time) error      { return nil }
func (streamConn) SetReadDeadline(t time.Time) error  { return nil }
func (streamConn) SetWriteDeadline(t time.Time) error { return nil }

type streamAddr struct{}

func (streamAddr) Network() string { return "tunnel" }
func (streamAddr) String() string  { return "tunnel" }
