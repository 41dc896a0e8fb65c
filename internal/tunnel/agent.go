//lint:file-ignore SA1019 x/net/http2 is deprecated in favour of net/http's own HTTP/2 (Go 1.26: http.Transport.NewClientConn, http.Server.Protocols); moving the tunnel's both ends to it changes the wire code and wants its own make bench run, so it is a change of its own.

package tunnel

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"

	"golang.org/x/net/http2"
)

// AgentServer is the agent's side of its tunnels: it serves HTTP/2 on
// tunnel connections the agent dialed. Shutdown sends GOAWAY on every
// connection it serves, so the relay stops opening new streams there while
// the running ones finish.
type AgentServer struct {
	hs   *http.Server
	h2   *http2.Server
	live Liveness

	mu       sync.Mutex
	shutdown bool
	waiting  map[*Conn]struct{} // tunnels the relay has not used yet
}

// NewAgentServer returns an AgentServer that hands each stream to h.
func NewAgentServer(h http.Handler, maxStreams uint32, live Liveness) *AgentServer {
	hs := &http.Server{Handler: h}
	h2 := &http2.Server{
		MaxConcurrentStreams:         maxStreams,
		MaxReadFrameSize:             uploadFrameSize,
		MaxUploadBufferPerConnection: connWindow,
		MaxUploadBufferPerStream:     streamWindow,
		ReadIdleTimeout:              live.ReadIdle,
		PingTimeout:                  live.Ping,
	}
	// ConfigureServer hooks h2's graceful shutdown into hs.Shutdown.
	if err := http2.ConfigureServer(hs, h2); err != nil {
		panic(fmt.Sprintf("tunnel: configuring http2 server: %v", err)) // only fails on a bad TLSConfig, which we never set
	}
	return &AgentServer{hs: hs, h2: h2, live: live, waiting: map[*Conn]struct{}{}}
}

// ServeConn serves HTTP/2 on conn until the connection ends or ctx is done,
// then closes conn. On a tunnel Conn, HTTP/2 starts when the relay sends
// its first bytes (the relay starts its side on first use; see
// LazyClientConn); until then WebSocket pings watch the connection.
func (s *AgentServer) ServeConn(ctx context.Context, conn net.Conn) {
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
func (s *AgentServer) await(ctx context.Context, conn *Conn) bool {
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
func (s *AgentServer) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutdown = true
	for c := range s.waiting {
		c.Close()
	}
	s.mu.Unlock()
	return s.hs.Shutdown(ctx)
}

// AgentStream is the agent's side of a CONNECT stream inside an
// http.Handler: reads come from the request body, writes are flushed to the
// response at once so interactive sessions never wait on a buffer.
type AgentStream struct {
	body io.ReadCloser
	w    io.Writer
	rc   *http.ResponseController
}

// AcceptStream answers a CONNECT stream with 200 and returns its byte stream.
func AcceptStream(w http.ResponseWriter, r *http.Request) (*AgentStream, error) {
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return nil, fmt.Errorf("sending stream headers: %w", err)
	}
	return &AgentStream{body: r.Body, w: w, rc: rc}, nil
}

func (s *AgentStream) Read(p []byte) (int, error) { return s.body.Read(p) }

func (s *AgentStream) Write(p []byte) (int, error) {
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
func (s *AgentStream) Join(target io.ReadWriteCloser, src io.Reader) (toTarget, fromTarget int64, err error) {
	if src == nil {
		src = s.body
	}
	return Join(agentEnd{AgentStream: s, src: src}, target)
}

// agentEnd is the stream's end of a Join: it reads from src and cannot
// half-close (the response ends when the handler returns), so Join ends
// once target's side has.
type agentEnd struct {
	*AgentStream
	src io.Reader
}

func (e agentEnd) Read(p []byte) (int, error) { return e.src.Read(p) }
func (e agentEnd) Close() error               { return e.body.Close() }

// RefuseStream answers a stream with an error status and a reason the relay
// logs.
func RefuseStream(w http.ResponseWriter, code int, reason string) {
	w.Header().Set(HeaderError, reason)
	w.WriteHeader(code)
}
