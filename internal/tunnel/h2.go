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

// Flow-control windows. The HTTP/2 defaults (64 KiB per stream on the
// server side, 1 MiB per connection) cap a single stream at window/RTT, which
// is what makes other multiplexing tunnels crawl on long links. These allow
// ~16 MiB in flight per stream, and per tunnel 64 MiB of uploads (agent
// side) and relayConnWindow of downloads (relay side); memory is only used
// when a reader falls behind.
const (
	streamWindow = 16 << 20
	connWindow   = 64 << 20
	// frameSize is the largest DATA frame each side accepts. Bigger frames
	// mean fewer WebSocket messages and fewer syscalls per byte.
	frameSize = 256 << 10
)

// Liveness is how a tunnel notices a dead peer: after ReadIdle without a
// frame it sends a ping and gives up if no answer comes within Ping.
type Liveness struct {
	ReadIdle time.Duration
	Ping     time.Duration
}

// DefaultLiveness detects a dead tunnel within 10 s, inside the 15 s promise.
var DefaultLiveness = Liveness{ReadIdle: 5 * time.Second, Ping: 5 * time.Second}

// Server serves HTTP/2 on tunnel connections the agent dialed. Shutdown
// sends GOAWAY on every connection it serves, so the relay stops opening new
// streams there while the running ones finish.
type Server struct {
	hs   *http.Server
	h2   *http2.Server
	live Liveness

	mu       sync.Mutex
	shutdown bool
	waiting  map[*Conn]struct{} // tunnels the relay has not used yet
}

// NewServer returns a Server that hands each stream to h.
func NewServer(h http.Handler, maxStreams uint32, live Liveness) *Server {
	hs := &http.Server{Handler: h}
	h2 := &http2.Server{
		MaxConcurrentStreams:         maxStreams,
		MaxReadFrameSize:             frameSize,
		MaxUploadBufferPerConnection: connWindow,
		MaxUploadBufferPerStream:     streamWindow,
		ReadIdleTimeout:              live.ReadIdle,
		PingTimeout:                  live.Ping,
	}
	// ConfigureServer hooks h2's graceful shutdown into hs.Shutdown.
	if err := http2.ConfigureServer(hs, h2); err != nil {
		panic(fmt.Sprintf("tunnel: configuring http2 server: %v", err)) // only fails on a bad TLSConfig, which we never set
	}
	return &Server{hs: hs, h2: h2, live: live, waiting: map[*Conn]struct{}{}}
}

// ServeConn serves HTTP/2 on conn until the connection ends or ctx is done,
// then closes conn. On a tunnel Conn, HTTP/2 starts when the relay sends
// its first bytes (the relay starts its side on first use; see
// LazyClientConn); until then WebSocket pings watch the connection.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn) {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	if wc, ok := conn.(*Conn); ok && !s.await(ctx, wc) {
		return
	}
	s.h2.ServeConn(conn, &http2.ServeConnOpts{Context: ctx, BaseConfig: s.hs, Handler: s.hs.Handler})
}

// await waits for the relay's first bytes on conn, and reports whether
// HTTP/2 should be served on it: not if the connection ended, nor once
// Shutdown has begun (the relay then sends new streams to another replica).
func (s *Server) await(ctx context.Context, conn *Conn) bool {
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		return false
	}
	s.waiting[conn] = struct{}{}
	s.mu.Unlock()
	err := conn.AwaitData(ctx, s.live)
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.waiting, conn)
	return err == nil && !s.shutdown
}

// Shutdown sends GOAWAY on every served connection and closes tunnels the
// relay has not used yet. Streams in flight keep running; ServeConn returns
// once they are done.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutdown = true
	for c := range s.waiting {
		c.Close()
	}
	s.mu.Unlock()
	return s.hs.Shutdown(ctx)
}

// relayConnWindow is the relay's receive window per tunnel (downloads).
// Connection-level credit only comes back as clients read, so it is kept
// at sixteen streams' worth: a few kubectls reading slowly cannot starve
// the other streams of their tunnel. (x/net's default is 1 GiB.)
const relayConnWindow = 16 * streamWindow

// clientTransports holds the relay's HTTP/2 transport per liveness setting
// (one per relay in practice), rather than one per tunnel.
var clientTransports sync.Map // Liveness -> *http2.Transport

func clientTransport(live Liveness) (*http2.Transport, error) {
	if t, ok := clientTransports.Load(live); ok {
		return t.(*http2.Transport), nil
	}
	// Receive windows are only configurable through a net/http
	// Transport's HTTP2 settings. Without them x/net gives each stream
	// 4 MiB, which capped one passthrough connection at 80 MiB/s on a
	// 50 ms link (make bench, long link).
	t1 := &http.Transport{HTTP2: &http.HTTP2Config{
		MaxReceiveBufferPerStream:     streamWindow,
		MaxReceiveBufferPerConnection: relayConnWindow,
	}}
	t, err := http2.ConfigureTransports(t1)
	if err != nil {
		return nil, fmt.Errorf("configuring http2 transport: %w", err)
	}
	t.MaxReadFrameSize = frameSize
	t.ReadIdleTimeout = live.ReadIdle
	t.PingTimeout = live.Ping
	// The agent's answer to a new stream is quick or the agent is gone.
	t.WriteByteTimeout = 15 * time.Second
	actual, _ := clientTransports.LoadOrStore(live, t)
	return actual.(*http2.Transport), nil
}

// NewClientConn runs the HTTP/2 client side on conn (the relay's side).
func NewClientConn(conn net.Conn, live Liveness) (*http2.ClientConn, error) {
	t, err := clientTransport(live)
	if err != nil {
		return nil, err
	}
	cc, err := t.NewClientConn(conn)
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
	live Liveness

	mu     sync.Mutex
	cc     *http2.ClientConn
	err    error
	closed bool
}

// StartLazyClientConn watches conn and returns its client. If the agent
// sends first (earlier agent builds served HTTP/2 at once), the client
// starts then, so that the agent's HTTP/2 pings are answered.
func StartLazyClientConn(conn *Conn, live Liveness) *LazyClientConn {
	l := &LazyClientConn{conn: conn, live: live}
	go func() {
		if conn.AwaitData(context.Background(), live) == nil {
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
		l.cc, l.err = NewClientConn(l.conn, l.live)
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
		return !closed && l.conn.closed.Err() == nil
	}
	return cc.CanTakeNewRequest()
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

// Stream is a raw byte stream over one HTTP/2 stream: writes go in the
// request body, reads come from the response body.
type Stream struct {
	w      *io.PipeWriter
	req    *reqBody
	body   io.ReadCloser
	cancel context.CancelFunc
	once   sync.Once
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
	timer := time.AfterFunc(headerTimeout, cancel)
	resp, err := cc.RoundTrip(req)
	if !timer.Stop() && err != nil {
		err = fmt.Errorf("no answer from agent within %v: %w", headerTimeout, err)
	}
	if err != nil {
		cancel()
		pw.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		reason := resp.Header.Get(HeaderError)
		resp.Body.Close()
		cancel()
		pw.Close()
		return nil, fmt.Errorf("%w: %s: %s", ErrRefused, resp.Status, reason)
	}
	return &Stream{w: pw, req: rb, body: resp.Body, cancel: cancel}, nil
}

func (s *Stream) Read(p []byte) (int, error)  { return s.body.Read(p) }
func (s *Stream) Write(p []byte) (int, error) { return s.w.Write(p) }

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
		s.body.Close()
		s.cancel()
	})
	return nil
}

// ServerStream is the agent's side of a CONNECT stream inside an
// http.Handler: reads come from the request body, writes are flushed to the
// response at once so interactive sessions never wait on a buffer.
type ServerStream struct {
	body io.ReadCloser
	w    io.Writer
	rc   *http.ResponseController
}

// AcceptStream answers a CONNECT stream with 200 and returns its byte stream.
func AcceptStream(w http.ResponseWriter, r *http.Request) (*ServerStream, error) {
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return nil, fmt.Errorf("sending stream headers: %w", err)
	}
	return &ServerStream{body: r.Body, w: w, rc: rc}, nil
}

func (s *ServerStream) Read(p []byte) (int, error) { return s.body.Read(p) }

func (s *ServerStream) Write(p []byte) (int, error) {
	n, err := s.w.Write(p)
	if err != nil {
		return n, err
	}
	return n, s.rc.Flush()
}

// Join copies between the stream and target until target's side ends:
// src (the stream's body, or a reader that buffered part of it) goes to
// target, half-closing target at EOF; target's bytes come back until it
// closes, which ends the stream (an HTTP/2 response can only end by the
// handler returning, so this is the one direction that finishes the join).
// It returns the bytes moved each way.
func (s *ServerStream) Join(target io.ReadWriteCloser, src io.Reader) (toTarget, fromTarget int64, err error) {
	if src == nil {
		src = s.body
	}
	done := make(chan error, 1)
	go func() {
		n, err := Copy(target, src)
		toTarget = n
		if err == nil {
			err = CloseWrite(target)
		} else {
			// The stream broke (reset, or the tunnel is gone): nobody will
			// read target's answer, and a quiet target (a watch with no
			// events) would otherwise hold the copy below forever.
			target.Close()
		}
		done <- err
	}()
	fromTarget, err = Copy(s, target)
	target.Close()
	s.body.Close()
	if errIn := <-done; err == nil {
		err = firstReal(errIn)
	}
	return toTarget, fromTarget, firstReal(err)
}

// RefuseStream answers a stream with an error status and a reason the relay
// logs.
func RefuseStream(w http.ResponseWriter, code int, reason string) {
	w.Header().Set(HeaderError, reason)
	w.WriteHeader(code)
}
