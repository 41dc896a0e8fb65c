package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/spectroproxy/spectro-proxy/internal/kubereq"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// The drain (SIGTERM): the relay fails /readyz and refuses new tunnels
// (503, so an agent's dial lands on another replica), asks every agent to
// move (a "move" stream on each tunnel), and waits, at most half the drain
// timeout, until each agent that took the move holds its replacement
// elsewhere. Once the shutdown delay is over it stops accepting (the
// moves go on), lets requests in flight finish within the drain timeout,
// ends its streamed responses (watches, logs -f) at an event boundary once
// the agents moved and nothing else is left (or just before the timeout),
// and closes the rest, the tunnels once the moves are over.
// An agent too old to know "move" answers 400 and keeps its tunnel until
// the end, as before.

// moveConcurrency bounds the move streams opened at once: thousands of
// tunnels are told in a few rounds, not in one burst of goroutines.
const moveConcurrency = 64

// drainer is the relay's drain state.
type drainer struct {
	draining prometheus.Gauge
	// plain counts terminate-mode requests in flight that are not
	// streamed responses: the drain ends streamed responses only once
	// these are done, so a list is never cut for a watch's sake.
	plain atomic.Int64

	mu       sync.Mutex
	streamed map[*streamBody]struct{}
	ending   bool // streamed responses are being ended; new ones end at once

	begun atomic.Bool   // beginDrain ran
	moved chan struct{} // closed once the moves are over
}

func newDrainer(s *Server) *drainer {
	d := &drainer{
		draining: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_draining", Help: "1 while the relay is draining (after SIGTERM).",
		}),
		streamed: map[*streamBody]struct{}{},
		moved:    make(chan struct{}),
	}
	s.m.reg.MustRegister(d.draining, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "spectro_proxy_drain_tunnels_remaining",
		Help: "While draining: tunnels this relay still holds whose agent has not moved to another replica.",
	}, func() float64 {
		if !s.draining.Load() {
			return 0
		}
		n := 0
		for _, sess := range s.reg.all() {
			if !s.moved(sess) {
				n++
			}
		}
		return float64(n)
	}))
	return d
}

// tunnelHeaders are sent on every tunnel's 101 answer: the replica and
// the live replicas (Config.Replicas, else the registry's count).
func (s *Server) tunnelHeaders() http.Header {
	n := 0
	if s.cfg.Replicas != nil {
		n = s.cfg.Replicas()
	} else {
		n = len(s.fl.reg.Replicas())
	}
	return http.Header{
		tunnel.HeaderReplica:  {s.cfg.ReplicaID},
		tunnel.HeaderReplicas: {strconv.Itoa(max(1, n))},
	}
}

// beginDrain runs when the serve context ends: it marks the relay
// draining, starts moving its agents, and closes ln once the shutdown
// delay is over. The moves run alongside: the drain proper (drain) does
// not close the tunnels before they are over.
func (s *Server) beginDrain(ln net.Listener) {
	s.draining.Store(true)
	s.drainer.draining.Set(1)
	s.drainer.begun.Store(true)
	go func() { defer close(s.drainer.moved); s.moveTunnels() }()
	if s.cfg.ShutdownDelay <= 0 {
		ln.Close()
		return
	}
	s.log.Info("relay not ready; accepting until the shutdown delay is over", "delay", s.cfg.ShutdownDelay.String())
	time.AfterFunc(s.cfg.ShutdownDelay, func() { ln.Close() })
}

// awaitMoves waits until the moves are over (they are bounded by half
// the drain timeout) or ctx ends.
func (s *Server) awaitMoves(ctx context.Context) {
	if !s.drainer.begun.Load() {
		return // Serve ended without a drain request (the listener failed)
	}
	select {
	case <-s.drainer.moved:
	case <-ctx.Done():
	}
}

// moveTunnels asks every agent to move and waits, at most half the drain
// timeout, until those that agreed have.
func (s *Server) moveTunnels() {
	sessions := s.reg.all()
	if len(sessions) == 0 {
		return
	}
	bound := s.cfg.DrainTimeout / 2
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	s.log.Info("asking agents to move to another relay replica", "tunnels", len(sessions), "wait", bound.String())
	var (
		mu          sync.Mutex
		accepted    []*session
		old, failed int
		wg          sync.WaitGroup
		sem         = make(chan struct{}, moveConcurrency)
		timeout     = min(s.cfg.StreamTimeout, bound)
		started     = time.Now()
	)
	for _, sess := range sessions {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			err := s.sendMove(ctx, sess, timeout)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				accepted = append(accepted, sess)
			case errors.Is(err, tunnel.ErrRefused):
				old++
				s.log.Info("agent does not know move (an older build): its tunnel is closed at the end of the drain",
					"cluster", sess.clusterUID, "agent", sess.agentID, "answer", err.Error())
			default:
				failed++
				s.log.Warn("asking an agent to move: not delivered", "cluster", sess.clusterUID, "agent", sess.agentID, "error", err)
			}
		})
	}
	wg.Wait()
	// Poll: moves finish over seconds (a dial through the load balancer,
	// possibly a Retry-After), and the registry has no event to wait on.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	pending := accepted
	for {
		pending = slices.DeleteFunc(pending, s.moved)
		if len(pending) == 0 {
			break
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
			continue
		}
		break
	}
	s.log.Info("agents moved", "moved", len(accepted)-len(pending), "not_moved_in_time", len(pending),
		"old_agents", old, "not_told", failed, "took", time.Since(started).Round(time.Millisecond).String())
}

// sendMove opens a move stream on the session's tunnel; nil when the
// agent answered 200.
func (s *Server) sendMove(ctx context.Context, sess *session, timeout time.Duration) error {
	labels := make([]string, 0, len(sess.routes))
	for label := range sess.routes.all() {
		labels = append(labels, label)
	}
	slices.Sort(labels)
	if len(labels) == 0 {
		return errors.New("session has no labels")
	}
	// A real label: an agent that predates move then reaches its stream
	// kind check and answers 400 (an unknown host would be 404).
	st, err := tunnel.OpenStream(ctx, sess.cc, labels[0], tunnel.StreamMove, timeout)
	if err != nil {
		return err
	}
	return st.Close()
}

// moved reports whether a session's agent has moved: it closed the
// tunnel, sent GOAWAY on it (an agent does once its replacement is
// registered), or the fleet's registry shows another replica holding
// every label of it (with two tunnels per agent, at once: the cluster is
// reachable there already). A relay alone (the in-memory registry)
// knows of no other replica and waits for the agent.
func (s *Server) moved(sess *session) bool {
	if !s.reg.holds(sess) || !sess.cc.CanTakeNewRequest() {
		return true
	}
	for label := range sess.routes.all() {
		elsewhere := false
		for _, h := range s.fl.reg.Lookup(label) {
			if h.Replica.ID != s.cfg.ReplicaID && h.ClusterUID == sess.clusterUID {
				elsewhere = true
				break
			}
		}
		if !elsewhere {
			return false
		}
	}
	return true
}

// holds reports whether sess is registered (not closed nor replaced).
func (r *registry) holds(sess *session) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byAgent[agentKey(sess)] == sess
}

// endStreamedResponses ends the streamed responses once the agents have
// moved (a client that re-watches then finds the cluster on another
// replica) and the other terminate-mode requests in flight are done, or
// shortly before ctx's deadline (so they can still end cleanly before the
// hard stop), or when ctx ends.
func (s *Server) endStreamedResponses(ctx context.Context) {
	grace := min(time.Second, s.cfg.DrainTimeout/4)
	deadline, ok := ctx.Deadline()
	if ok {
		early, cancel := context.WithDeadline(ctx, deadline.Add(-grace))
		s.awaitMoves(early)
		cancel()
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for (s.drainer.plain.Load() > 0 || s.splicedPlain() > 0) && (!ok || time.Until(deadline) > grace) {
		select {
		case <-ctx.Done():
		case <-tick.C:
			continue
		}
		break
	}
	d := s.drainer
	d.mu.Lock()
	d.ending = true
	bodies := make([]*streamBody, 0, len(d.streamed))
	for b := range d.streamed {
		bodies = append(bodies, b)
	}
	d.mu.Unlock()
	if len(bodies) > 0 {
		s.log.Info("ending streamed responses (watches, logs -f) at an event boundary", "count", len(bodies))
	}
	for _, b := range bodies {
		b.end()
	}
	s.endSplices()
}

// request is one terminate-mode request, counted as plain until its
// response turns out to be streamed.
type request struct {
	d    *drainer
	once sync.Once
}

func (d *drainer) enter() *request {
	d.plain.Add(1)
	return &request{d: d}
}

// done is called when the request ends, or when its response is streamed.
func (r *request) done() { r.once.Do(func() { r.d.plain.Add(-1) }) }

// streamResponse makes resp, the answer to req, end cleanly at the drain
// when it is a streamed one (a watch, logs -f, an event stream) whose
// framing the relay knows: its body then ends at the next event boundary,
// which the client reads as a normal end of the response (client-go's
// watch re-watches from its resourceVersion; kubectl logs -f and get -w
// end). Other responses are waited for.
func (s *Server) streamResponse(req *http.Request, resp *http.Response, r *request) {
	if resp.StatusCode == http.StatusSwitchingProtocols || resp.ContentLength >= 0 || !isStreamed(req, resp) {
		return
	}
	ct := resp.Header.Get("Content-Type")
	var bnd boundaries
	switch {
	case strings.Contains(ct, "protobuf"):
		bnd = &frames{}
	case ct == "" || strings.Contains(ct, "json") || strings.HasPrefix(ct, "text/"):
		bnd = &lines{at: true}
	default:
		// A framing the relay cannot tell the events of (CBOR
		// sequences, say): the stream is cut at the drain's end as
		// before, and it does not hold the other streamed responses
		// up.
		r.done()
		return
	}
	b := &streamBody{ReadCloser: resp.Body, d: s.drainer, bnd: bnd}
	d := s.drainer
	d.mu.Lock()
	d.streamed[b] = struct{}{}
	b.ending = d.ending
	d.mu.Unlock()
	resp.Body = b
	r.done()
}

// isStreamed tells a response that never ends by itself: a watch, a
// followed log, an event stream.
func isStreamed(req *http.Request, resp *http.Response) bool {
	return kubereq.StaysOpen(req.URL) || strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream")
}

// boundaries follows a stream's framing.
type boundaries interface {
	// advance consumes p and returns how much it consumed: all of it,
	// or with stop, up to the first boundary it reaches after at least
	// one byte.
	advance(p []byte, stop bool) int
	// boundary reports whether what was consumed ends at a boundary.
	boundary() bool
}

// lines: JSON watch events, log lines.
type lines struct{ at bool }

func (l *lines) advance(p []byte, stop bool) int {
	if len(p) == 0 {
		return 0
	}
	if stop {
		if i := bytes.IndexByte(p, '\n'); i >= 0 {
			l.at = true
			return i + 1
		}
	}
	l.at = p[len(p)-1] == '\n'
	return len(p)
}

func (l *lines) boundary() bool { return l.at }

// frames: Kubernetes protobuf watch frames, a 4-byte big-endian length
// and that many bytes.
type frames struct {
	hdr       uint32
	hdrN      int
	remaining uint32
}

func (f *frames) advance(p []byte, stop bool) int {
	i := 0
	for i < len(p) {
		if f.remaining > 0 {
			k := len(p) - i
			if uint32(k) > f.remaining {
				k = int(f.remaining)
			}
			f.remaining -= uint32(k)
			i += k
		} else {
			f.hdr = f.hdr<<8 | uint32(p[i])
			f.hdrN++
			i++
			if f.hdrN == 4 {
				f.remaining, f.hdr, f.hdrN = f.hdr, 0, 0
			}
		}
		if stop && f.boundary() {
			return i
		}
	}
	return i
}

func (f *frames) boundary() bool { return f.hdrN == 0 && f.remaining == 0 }

// streamBody is a streamed response's body that can be ended at the next
// boundary: after end, the reader gets io.EOF right after the event it is
// in, or at once between events (a read waiting for the next event is
// woken by closing the body under it; whatever that read brings is
// dropped, as the client never saw any of it).
type streamBody struct {
	io.ReadCloser
	d   *drainer
	bnd boundaries

	mu      sync.Mutex
	ending  bool
	reading bool
	cut     bool // the body was closed under a read at a boundary
}

func (b *streamBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	if b.ending && b.bnd.boundary() {
		b.mu.Unlock()
		return 0, io.EOF
	}
	b.reading = true
	b.mu.Unlock()
	n, err := b.ReadCloser.Read(p)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.reading = false
	if b.cut {
		return 0, io.EOF
	}
	if b.ending {
		k := b.bnd.advance(p[:n], true)
		if b.bnd.boundary() {
			return k, nil // the next read ends the body
		}
		return k, err
	}
	b.bnd.advance(p[:n], false)
	return n, err
}

// end makes the body end at the next boundary.
func (b *streamBody) end() {
	b.mu.Lock()
	b.ending = true
	closeNow := b.reading && b.bnd.boundary()
	if closeNow {
		b.cut = true
	}
	b.mu.Unlock()
	if closeNow {
		// Outside the lock: closing resets the tunnel stream, a write.
		b.ReadCloser.Close()
	}
}

func (b *streamBody) Close() error {
	b.d.mu.Lock()
	delete(b.d.streamed, b)
	b.d.mu.Unlock()
	return b.ReadCloser.Close()
}
