package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Terminate-mode requests that end soon, carry no body and may be sent
// twice (gets and lists: most of what kubectl and dashboards send; see
// connPool for why they must be replayable) travel as HTTP/1.1 on
// keep-alive connections to the route's target, each a raw stream
// (tunnel.StreamHTTP) that the agent joins to a connection of its own.
// The agent then reads none of them: no HTTP/2 request, handler and
// second reverse proxy per request there, which cost as much again as
// the relay's own work (docs/performance.md, fifth pass). Watches, logs
// -f, requests with a body and deletes stay HTTP/2 requests on the
// tunnel, where any number share one connection and a body may stream
// both ways.
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
		s.retireSplices()
	}
}

// httpConns are a session's pools of such connections, one per label,
// made by the first request for the label.
type httpConns struct {
	mu      sync.Mutex
	byLabel map[string]*connPool
	closed  bool
}

// errPoolClosed: the session's tunnel is going away; its requests take
// the HTTP/2 path, which fails over to another tunnel.
var errPoolClosed = errors.New("tunnel going away")

// httpPool returns sess's pool for label.
func (s *Server) httpPool(sess *session, label string) (*connPool, error) {
	hc := &sess.http
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.closed {
		return nil, errPoolClosed
	}
	if p := hc.byLabel[label]; p != nil {
		return p, nil
	}
	p := newConnPool(func() io.ReadWriteCloser {
		// The connection outlives the request that dialed it (it goes
		// back to the pool): its stream must not end with that request.
		return tunnel.OpenStreamEarly(context.Background(), sess.cc, label, tunnel.StreamHTTP, s.cfg.StreamTimeout)
	}, maxIdleHTTPConns, httpConnIdle)
	if hc.byLabel == nil {
		hc.byLabel = map[string]*connPool{}
		s.pooled.add(sess)
	}
	hc.byLabel[label] = p
	return p, nil
}

// closeHTTPConns closes sess's pools for good (its tunnel went away or
// ended).
func (s *Server) closeHTTPConns(sess *session) {
	sess.http.close()
	s.pooled.remove(sess)
}

// close closes the pools' idle connections, and the busy ones once their
// requests end.
func (hc *httpConns) close() {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	hc.closed = true
	for _, p := range hc.byLabel {
		p.close()
	}
}

// roundTripHTTP sends req on one of sess's connections for label. The
// request holds one of the session's stream slots until its body is
// closed, as an HTTP/2 request does; idle connections hold none (they are
// bounded by maxIdleHTTPConns), so the slots still count what users are
// doing now, and an idle pool never keeps an upgrade or a passthrough
// connection out.
func (s *Server) roundTripHTTP(sess *session, label string, req *http.Request) (*http.Response, error) {
	p, err := s.httpPool(sess, label)
	if err != nil {
		return nil, err
	}
	if !sess.acquire() {
		return nil, fmt.Errorf("agent %s: %w (%d)", sess.agentID, errTooManyStreams, sess.maxStreams)
	}
	sl := &slot{sess: sess}
	resp, err := p.roundTrip(req, sl.free)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", sess.agentID, err)
	}
	return resp, nil
}
