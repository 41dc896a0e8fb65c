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
	hs *http.Server
	h2 *http2.Server
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
	return &Server{hs: hs, h2: h2}
}

// ServeConn serves HTTP/2 on conn until the connection ends or ctx is done,
// then closes conn.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn) {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	s.h2.ServeConn(conn, &http2.ServeConnOpts{Context: ctx, BaseConfig: s.hs, Handler: s.hs.Handler})
	conn.Close()
}

// Shutdown sends GOAWAY on every served connection. Streams in flight keep
// running; ServeConn returns once they are done.
func (s *Server) Shutdown(ctx context.Context) error { return s.hs.Shutdown(ctx) }

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
func OpenStream(ctx context.Context, cc *http2.ClientConn, label, kind string, headerTimeout time.Duration) (*Stream, error) {
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
