// Package tunnel is the wire shared by the relay and the agent: a WebSocket
// connection adapted to net.Conn, HTTP/2 run over it (the agent serves, the
// relay is the client), and the byte pumps that join two streams. It knows
// nothing about tokens, Kubernetes or which label is served where (it only
// checks that labels are labels, with package hostname).
//
// Files by role: wsconn.go and batch.go are the connection both sides use;
// agent.go is the agent's HTTP/2 server; relay.go is the relay's HTTP/2
// client and its streams; liveness.go is how either side notices a dead
// peer; join.go moves bytes between two connections; protocol.go is the
// wire's names.
package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// MaxMessageSize bounds one WebSocket message read from the peer. HTTP/2
// frames are at most MaxFrameSize plus a 9-byte header and our writer never
// sends more than maxWriteMessage at once, so anything larger is abuse.
const MaxMessageSize = 1 << 20

// maxWriteMessage splits large writes so that the peer's MaxMessageSize holds.
const maxWriteMessage = 256 << 10

// writeBuffers lends the relay's WebSocket connections a write buffer for
// the length of one message, so idle tunnels hold none.
var writeBuffers sync.Pool

// NewUpgrader returns the WebSocket upgrader for the relay's tunnel
// endpoint, sized for many idle tunnels (measured with `make bench`):
//   - A 256-byte read buffer, not the 4 KiB one net/http already has for
//     the connection. It only ever holds frame headers and small frames:
//     payloads bypass it (bufio reads straight into a caller's buffer that
//     is bigger than its own, and x/net reads in 4 KiB or whole frames), so
//     a larger one costs every idle tunnel memory and buys nothing. 64 KiB
//     buffers were once 64 of the relay's 77 KiB per idle tunnel; 4 KiB
//     was 3.7 of 49. gorilla needs room for a control frame's 125 bytes.
//   - Writes borrow a pooled buffer. As the server side, gorilla sends each
//     message as one frame and copies only the first buffer-full, writing
//     the rest straight from our slice, so 16 KiB (one TLS record) is
//     enough.
//
// The default same-origin check stays: agents are Go programs, not
// browsers.
func NewUpgrader() websocket.Upgrader {
	return websocket.Upgrader{ReadBufferSize: 256, WriteBufferSize: 16 << 10, WriteBufferPool: &writeBuffers}
}

// Conn adapts a gorilla *websocket.Conn to net.Conn. Each Write becomes one
// or more binary messages; Read streams message payloads back to back, so
// message boundaries carry no meaning.
//
// Conn is safe for one reader and any number of concurrent writers (the
// HTTP/2 framer writes from several goroutines). It deviates from net.Conn
// in one way that callers must know: as with gorilla itself, once a read or
// write deadline is hit the connection is broken and must be closed; it
// cannot be resumed by moving the deadline. Pings, not deadlines, keep a
// live tunnel honest: HTTP/2's, and WebSocket's before HTTP/2 has started
// (AwaitData).
//
// Close sends a normal-closure frame (bounded by a short deadline) and then
// closes the socket; a normal close from the peer reads as io.EOF.
type Conn struct {
	ws *websocket.Conn

	readMu  sync.Mutex
	r       io.Reader
	reading bool // Read has run: HTTP/2 owns the read side

	errMu   sync.Mutex
	readErr error // the first, to explain the tunnel's end in a log line

	pongs atomic.Uint64 // WebSocket pongs received (AwaitData's liveness)

	wq    writeQueue // writes are queued and sent by a flusher goroutine (see Write)
	batch *BatchConn // under the TLS connection, when there is one

	closeOnce sync.Once
	closeErr  error
	// What Close starts: AfterClose's functions, run then rather than by
	// a goroutine per tunnel waiting, and Done's channel, made only when
	// asked for. (A context cancelled by Close did the same, at about
	// 0.4 KiB more per idle tunnel: its children map and AfterFunc's
	// context, in a relay's heap profile with 10,000 tunnels.)
	closeMu    sync.Mutex
	isClosed   bool
	afterClose []func()
	done       chan struct{}
}

var _ net.Conn = (*Conn)(nil)

// NewConn wraps ws. The caller hands ownership of ws to the returned Conn.
func NewConn(ws *websocket.Conn) *Conn {
	ws.SetReadLimit(MaxMessageSize)
	c := &Conn{ws: ws, batch: batchOf(ws.NetConn())}
	ws.SetPongHandler(func(string) error { c.pongs.Add(1); return nil })
	return c
}

// Done is closed once Close has been called, by either side's code.
func (c *Conn) Done() <-chan struct{} {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.done == nil {
		c.done = make(chan struct{})
		if c.isClosed {
			close(c.done)
		}
	}
	return c.done
}

// AfterClose runs f in a goroutine of its own once Close has been called
// (at once if it has). A relay holds thousands of idle tunnels; a goroutine
// per tunnel waiting on Done would cost each a stack.
func (c *Conn) AfterClose(f func()) {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.isClosed {
		go f()
		return
	}
	c.afterClose = append(c.afterClose, f)
}

// closing marks c closed, closes Done and starts AfterClose's functions.
func (c *Conn) closing() {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	c.isClosed = true
	if c.done != nil {
		close(c.done)
	}
	for _, f := range c.afterClose {
		go f()
	}
	c.afterClose = nil
}

// Closed reports whether Close has been called.
func (c *Conn) Closed() bool {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	return c.isClosed
}

// Read reads payload bytes of binary messages in order.
func (c *Conn) Read(p []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	c.reading = true
	for {
		if c.r == nil {
			if err := c.nextMessage(); err != nil {
				return 0, err
			}
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		if err != nil {
			return n, c.readFailed(mapCloseErr(err))
		}
		return n, nil
	}
}

// nextMessage makes the next binary message the one Read reads. Call it
// with readMu held.
func (c *Conn) nextMessage() error {
	typ, r, err := c.ws.NextReader()
	if err != nil {
		return c.readFailed(mapCloseErr(err))
	}
	if typ != websocket.BinaryMessage {
		// A text message is a protocol violation on the tunnel; refusing
		// it beats feeding text into the HTTP/2 framer.
		c.Close()
		return c.readFailed(errors.New("tunnel: unexpected non-binary websocket message"))
	}
	c.r = r
	return nil
}

func (c *Conn) readFailed(err error) error {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	if c.readErr == nil {
		c.readErr = err
	}
	return err
}

// ReadErr returns the first error reading failed with (nil while none
// has): an oversized message, a reset, a close from the peer (io.EOF).
func (c *Conn) ReadErr() error {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	return c.readErr
}

// Write queues p and returns (see writeQueue); the flusher sends what has
// queued up as one message, one TLS write and, with a BatchConn under TLS,
// one syscall. A failed send is returned by the next Write; Close sends
// what is queued first.
func (c *Conn) Write(p []byte) (int, error) { return c.wq.writeAll(p, c) }

func (c *Conn) flush() { c.wq.run(c.send) }

// send writes p as one or more binary messages, with one write syscall per
// message when a BatchConn is under the TLS connection. Only the flusher
// calls it: gorilla allows one writer of data messages at a time, and its
// write deadline is not safe beside that writer, so it is set here.
func (c *Conn) send(p []byte, deadline time.Time) (err error) {
	_ = c.ws.SetWriteDeadline(deadline)
	if c.batch != nil {
		c.batch.begin()
		defer func() {
			if ferr := c.batch.end(); ferr != nil && err == nil {
				err = ferr
			}
		}()
	}
	for len(p) > 0 {
		chunk := p[:min(len(p), maxWriteMessage)]
		if err := c.ws.WriteMessage(websocket.BinaryMessage, chunk); err != nil {
			return mapCloseErr(err)
		}
		p = p[len(chunk):]
	}
	return nil
}

// Close sends a close frame and closes the underlying connection. It is safe
// to call more than once.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.closing()
		// What was written before Close goes first (a GOAWAY, the end
		// of a stream).
		c.wq.drain(time.Now().Add(time.Second), func(d time.Time) { _ = c.ws.NetConn().SetWriteDeadline(d) })
		// WriteControl is safe beside a concurrent WriteMessage.
		_ = c.ws.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""),
			time.Now().Add(time.Second))
		c.closeErr = c.ws.Close()
	})
	return c.closeErr
}

func (c *Conn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }

func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.ws.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}
func (c *Conn) SetReadDeadline(t time.Time) error { return c.ws.SetReadDeadline(t) }

// SetWriteDeadline applies to sends that start after it. Write itself only
// queues, so a deadline set around one Write (x/net's WriteByteTimeout)
// bounds little: HTTP/2 pings (liveness) find a tunnel whose peer stopped
// reading, and Close bounds the last send.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.wq.setDeadline(t)
	return nil
}

func mapCloseErr(err error) error {
	var ce *websocket.CloseError
	if errors.As(err, &ce) && (ce.Code == websocket.CloseNormalClosure || ce.Code == websocket.CloseNoStatusReceived) {
		return io.EOF
	}
	return err
}
