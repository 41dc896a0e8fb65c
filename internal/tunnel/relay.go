//lint:file-ignore SA1019 x/net/http2 is deprecated in favour of net/http's own HTTP/2 (Go 1.26: http.Transport.NewClientConn, http.Server.Protocols); moving the tunnel's both ends to it changes the wire code and wants its own make bench run, so it is a change of its own.

package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// relayConnWindow is the relay's receive window per tunnel (downloads),
// 256 MiB. Connection-level credit only comes back as clients read, so it
// is a bounded number of streams' worth; clients that read slowly or not
// at all are capped per source and cut after a write stall, so they cannot
// use it up for the other streams of their tunnel. (x/net's default is
// 1 GiB.)
const relayConnWindow = 256 << 20

// RelayTransport is the relay's side of its tunnels: the one HTTP/2
// transport its tunnels' clients share (rather than one per tunnel). Each
// relay makes its own, so two relays in one process share nothing.
type RelayTransport struct {
	t    *http2.Transport
	live Liveness
}

// NewRelayTransport returns the transport for tunnels watched with live.
func NewRelayTransport(live Liveness) (*RelayTransport, error) {
	// Receive windows are only configurable through a net/http
	// Transport's HTTP2 settings. Without them x/net gives each stream
	// 4 MiB, which capped one passthrough connection at 80 MiB/s on a
	// 50 ms link (make bench, long link).
	t1 := &http.Transport{HTTP2: &http.HTTP2Config{
		MaxReceiveBufferPerStream:     streamWindow,
		MaxReceiveBufferPerConnection: relayConnWindow,
	},
		// Responses come from targets through the agent: bounded, as
		// every header section a stranger writes (x/net's default is
		// 10 MiB).
		MaxResponseHeaderBytes: MaxResponseHeaderBytes,
	}
	t, err := http2.ConfigureTransports(t1)
	if err != nil {
		return nil, fmt.Errorf("configuring http2 transport: %w", err)
	}
	t.MaxReadFrameSize = frameSize
	t.ReadIdleTimeout = live.ReadIdle
	t.PingTimeout = live.Ping
	// The agent's answer to a new stream is quick or the agent is gone.
	t.WriteByteTimeout = 15 * time.Second
	return &RelayTransport{t: t, live: live}, nil
}

// NewClientConn runs the HTTP/2 client side on conn (the relay's side).
func (r *RelayTransport) NewClientConn(conn net.Conn) (*http2.ClientConn, error) {
	cc, err := r.t.NewClientConn(conn)
	if err != nil {
		return nil, fmt.Errorf("starting http2 client on tunnel: %w", err)
	}
	return cc, nil
}

// LazyClientConn is the relay's HTTP/2 client on one tunnel, started by
// the first request that needs it. Until then the tunnel costs a TLS
// connection, a WebSocket and one goroutine waiting in Conn.AwaitData:
// x/net's client would allocate 8 KiB of buffers, a framer, HPACK state
// and its read loop per tunnel up front, and most of a relay's tunnels sit
// idle most of the time.
type LazyClientConn struct {
	conn *Conn
	rt   *RelayTransport

	mu     sync.Mutex
	cc     *http2.ClientConn
	err    error
	closed bool
}

// StartLazyClientConn watches conn and returns its client. If the agent
// sends first (earlier agent builds served HTTP/2 at once), the client
// starts then, so that the agent's HTTP/2 pings are answered.
func (r *RelayTransport) StartLazyClientConn(conn *Conn) *LazyClientConn {
	l := &LazyClientConn{conn: conn, rt: r}
	go func() {
		if conn.AwaitData(context.Background(), r.live) == nil {
			_, _ = l.get()
		}
	}()
	return l
}

func (l *LazyClientConn) get() (*http2.ClientConn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cc == nil && l.err == nil {
		if l.closed {
			return nil, net.ErrClosed
		}
		l.cc, l.err = l.rt.NewClientConn(l.conn)
		if l.err != nil {
			l.conn.Close()
		}
	}
	return l.cc, l.err
}

// RoundTrip sends req on the tunnel, starting HTTP/2 if it has not yet.
func (l *LazyClientConn) RoundTrip(req *http.Request) (*http.Response, error) {
	cc, err := l.get()
	if err != nil {
		return nil, fmt.Errorf("tunnel closed: %w", err)
	}
	return cc.RoundTrip(req)
}

// CanTakeNewRequest reports whether a new request may go to this tunnel.
func (l *LazyClientConn) CanTakeNewRequest() bool {
	l.mu.Lock()
	cc, closed := l.cc, l.closed || l.err != nil
	l.mu.Unlock()
	if cc == nil {
		return !closed && !l.conn.Closed()
	}
	return cc.CanTakeNewRequest()
}

// GoingAway reports whether the tunnel takes no new streams for good: the
// agent sent GOAWAY (it is moving or stopping; the streams open on it may
// finish), or the tunnel is closing or closed. Unlike CanTakeNewRequest it
// does not say so for a tunnel that is only busy.
func (l *LazyClientConn) GoingAway() bool {
	l.mu.Lock()
	cc, closed := l.cc, l.closed || l.err != nil
	l.mu.Unlock()
	if cc == nil {
		return closed || l.conn.Closed()
	}
	st := cc.State()
	return st.Closed || st.Closing
}

// Close closes the client and the tunnel.
func (l *LazyClientConn) Close() error {
	l.mu.Lock()
	cc := l.cc
	l.closed = true
	l.mu.Unlock()
	if cc != nil {
		cc.Close()
	}
	return l.conn.Close()
}

// ErrRefused is returned by OpenStream when the agent answered but refused
// the stream (for example because it could not reach the target).
var ErrRefused = errors.New("agent refused stream")

// RefusedError is the agent's refusal of a stream: its status and reason.
// It is ErrRefused to errors.Is.
type RefusedError struct {
	Status string // "502 Bad Gateway"
	Code   int
	Reason string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("%v: %s: %s", ErrRefused, e.Status, e.Reason)
}

func (e *RefusedError) Is(target error) bool { return target == ErrRefused }

// Stream is a raw byte stream over one HTTP/2 stream: writes go in the
// request body, reads come from the response body.
type Stream struct {
	w      *io.PipeWriter
	req    *reqBody
	cancel context.CancelFunc
	once   sync.Once

	// ready is closed once the agent answered (or the stream failed):
	// then body or openErr is set.
	ready   chan struct{}
	body    io.ReadCloser
	openErr error
}

// reqBody is a stream's request body. Bytes come from Stream.Write through
// a pipe until Stream.ReadFrom attaches a source; from then on the HTTP/2
// transport's body goroutine reads that source itself. That saves a copy
// and, more to the point, a goroutine handoff per chunk: a small request
// through a passthrough stream no longer wakes a copier that wakes the
// transport.
type reqBody struct {
	pr    *io.PipeReader
	srcCh chan io.Reader // ReadFrom's source, sent before the pipe is switched off
	src   io.Reader      // only used by the transport's goroutine
	n     atomic.Int64   // bytes read from src

	doneOnce sync.Once
	done     chan struct{} // src ended or the transport closed the body
	err      error         // why; written before done is closed
}

// errAttached ends the pipe when ReadFrom takes over; the reader never
// returns it.
var errAttached = errors.New("tunnel: source attached")

func (b *reqBody) Read(p []byte) (int, error) {
	if b.src == nil {
		n, err := b.pr.Read(p)
		if !errors.Is(err, errAttached) {
			return n, err
		}
		b.src = <-b.srcCh
	}
	n, err := b.src.Read(p)
	b.n.Add(int64(n))
	if err != nil {
		b.finish(err)
	}
	return n, err
}

// Close is called by the transport when the stream no longer needs the
// body: sent in full, or the stream ended first. The latter is not an error
// of this direction: the response side reports how the stream ended, and
// the joined connection must stay open until its last bytes are written.
func (b *reqBody) Close() error {
	b.pr.Close()
	b.finish(nil)
	return nil
}

func (b *reqBody) finish(err error) {
	b.doneOnce.Do(func() {
		if errors.Is(err, io.EOF) {
			err = nil
		}
		b.err = err
		close(b.done)
	})
}

// OpenStream opens a CONNECT stream for label carrying kind and waits up to
// headerTimeout for the agent's answer. The stream lives until Close, or
// until ctx is done.
func OpenStream(ctx context.Context, cc http.RoundTripper, label, kind string, headerTimeout time.Duration) (*Stream, error) {
	s := OpenStreamEarly(ctx, cc, label, kind, headerTimeout)
	<-s.ready
	if s.openErr != nil {
		return nil, s.openErr
	}
	return s, nil
}

// OpenStreamEarly opens a CONNECT stream like OpenStream but returns at
// once: what is written meanwhile follows the stream's headers, and the
// first Read waits for the agent's answer (a refusal, or no answer within
// headerTimeout, is its error). A new stream then costs no round trip to
// the agent before its first bytes leave, which on a long link is most
// of what a new connection through the tunnel costs.
func OpenStreamEarly(ctx context.Context, cc http.RoundTripper, label, kind string, headerTimeout time.Duration) *Stream {
	ctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	rb := &reqBody{pr: pr, srcCh: make(chan io.Reader, 1), done: make(chan struct{})}
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Host: label},
		Host:   label,
		Header: http.Header{HeaderStream: {kind}},
		Body:   rb,
	}
	req = req.WithContext(ctx)
	s := &Stream{w: pw, req: rb, cancel: cancel, ready: make(chan struct{})}
	// x/net's RoundTrip returns with the answer's headers; the request
	// body (this stream's writes) is sent by its own goroutine meanwhile.
	go func() {
		defer close(s.ready)
		timer := time.AfterFunc(headerTimeout, cancel)
		resp, err := cc.RoundTrip(req)
		if !timer.Stop() && err != nil {
			err = fmt.Errorf("no answer from agent within %v: %w", headerTimeout, err)
		}
		if err == nil && resp.StatusCode != http.StatusOK {
			err = &RefusedError{Status: resp.Status, Code: resp.StatusCode, Reason: resp.Header.Get(HeaderError)}
			resp.Body.Close()
		}
		if err != nil {
			s.openErr = err
			cancel()
			pw.CloseWithError(err)
			return
		}
		s.body = resp.Body
	}()
	return s
}

func (s *Stream) Read(p []byte) (int, error) {
	<-s.ready
	if s.openErr != nil {
		return 0, s.openErr
	}
	return s.body.Read(p)
}

// Write sends p in the request body. A write that fails because the
// agent refused the stream returns the refusal (which names the target it
// could not reach), not the closed pipe it met: on an early stream
// (OpenStreamEarly) the refusal can close the body while a first write
// still waits for x/net to read it, and what the user is told should not
// depend on which came first (TestTerminateTargetDown failed 1 run in
// 300). The answer is in by then or comes within the header timeout.
func (s *Stream) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	if err != nil {
		<-s.ready
		if s.openErr != nil {
			return n, s.openErr
		}
	}
	return n, err
}

// ReadFrom sends everything src yields into the stream, read by the HTTP/2
// transport directly, and returns once src has ended or the stream is
// done. Don't call Write after it. The request body ends with src (EOF
// half-closes the stream); a read error resets the stream.
func (s *Stream) ReadFrom(src io.Reader) (int64, error) {
	s.req.srcCh <- src
	s.w.CloseWithError(errAttached)
	<-s.req.done
	return s.req.n.Load(), s.req.err
}

// CloseWrite ends the request body, which the agent reads as EOF.
func (s *Stream) CloseWrite() error { return s.w.Close() }

// Close resets the stream if it is still open.
func (s *Stream) Close() error {
	s.once.Do(func() {
		s.w.Close()
		select {
		case <-s.ready:
		default:
			s.cancel() // ends a RoundTrip still waiting for the answer
			<-s.ready
		}
		if s.body != nil {
			s.body.Close()
		}
		s.cancel()
	})
	return nil
}

func (s *Stream) takesSource() {}
