package tunnel

import (
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// BatchConn sits under a tunnel's TLS connection and lets Conn.Write send
// a whole WebSocket message, which crypto/tls cuts into 16 KiB records and
// writes one record per call, with one write syscall instead of one per
// record. Outside a batch every write goes straight through, so TLS
// handshakes and anything else sharing the connection behave as usual.
//
// Profiles of `make bench` bulk transfers had write syscalls at a third of
// relay and agent CPU; a 256 KiB message was 17 of them.
type BatchConn struct {
	net.Conn

	mu       sync.Mutex
	batching bool    // Conn.Write holds its write lock for a batch, so they never nest
	buf      *[]byte // pooled, only held during a batch
	err      error   // a failed flush; the connection is broken from then on

	// q, once QueueWrites has set it, queues every write (see writeQueue):
	// a public HTTP/2 connection, whose server flushes each response on
	// its own.
	q atomic.Pointer[writeQueue]
	// sentBy is the write deadline the flusher last set on Conn (under mu).
	sentBy time.Time
}

// QueueWrites makes every later write to the BatchConn under c (through
// TLS and wrappers that unwrap) queued and sent by a flusher, as the
// tunnel's own writes are: net/http's HTTP/2 server flushes each
// response's frames with a TLS record and a syscall of their own, and the
// responses of concurrent streams then leave together. Write deadlines set
// from then on go with the writes (see writeQueue). It reports whether c
// has a BatchConn under it.
func QueueWrites(c net.Conn) bool {
	b := batchOf(c)
	if b == nil {
		return false
	}
	b.q.CompareAndSwap(nil, &writeQueue{})
	return true
}

// NewBatchConn wraps c (a TCP connection, before TLS).
func NewBatchConn(c net.Conn) *BatchConn { return &BatchConn{Conn: c} }

// batchFlushAt is how much a batch holds before writing early: a little
// over one maxWriteMessage with its records' overhead fits.
const batchFlushAt = maxWriteMessage + 16<<10

var batchBuffers = sync.Pool{New: func() any {
	b := make([]byte, 0, batchFlushAt+tlsRecordMax)
	return &b
}}

// tlsRecordMax is the largest record crypto/tls writes: 16 KiB of
// plaintext plus header, nonce, tag and padding.
const tlsRecordMax = 16<<10 + 256

// Write holds p while a batch is open, and writes it otherwise. The mutex
// keeps bytes in order when a write outside the batch (a WebSocket ping
// from another goroutine) meets a flush.
func (b *BatchConn) Write(p []byte) (int, error) {
	if q := b.q.Load(); q != nil {
		return q.writeAll(p, b)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return 0, b.err
	}
	if !b.batching {
		return b.Conn.Write(p)
	}
	if b.buf == nil {
		b.buf = batchBuffers.Get().(*[]byte)
	}
	*b.buf = append(*b.buf, p...)
	if len(*b.buf) >= batchFlushAt {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// flush runs the queue's flusher (QueueWrites sets the queue once, for
// good).
func (b *BatchConn) flush() { b.q.Load().run(b.send) }

// send writes what the queue took, in order with any direct write, under
// the deadline its writes were accepted with. A deadline is set on Conn
// only when it changed: the relay's public connections (the only queued
// BatchConns) rarely have one, and their stall guard below re-arms its own
// after any outside deadline, a timer operation per write.
func (b *BatchConn) send(p []byte, deadline time.Time) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return b.err
	}
	if !deadline.Equal(b.sentBy) {
		_ = b.Conn.SetWriteDeadline(deadline)
		b.sentBy = deadline
	}
	if _, err := b.Conn.Write(p); err != nil {
		b.err = err
	}
	return b.err
}

// SetWriteDeadline applies to the writes that follow: queued ones once
// QueueWrites has switched the connection, the socket's before.
func (b *BatchConn) SetWriteDeadline(t time.Time) error {
	if q := b.q.Load(); q != nil {
		q.setDeadline(t)
		return nil
	}
	return b.Conn.SetWriteDeadline(t)
}

// SetDeadline sets the read deadline on the socket and the write deadline
// as SetWriteDeadline does.
func (b *BatchConn) SetDeadline(t time.Time) error {
	if err := b.Conn.SetReadDeadline(t); err != nil {
		return err
	}
	return b.SetWriteDeadline(t)
}

// Close sends what is queued first (within a second), then closes.
func (b *BatchConn) Close() error {
	if q := b.q.Load(); q != nil {
		q.drain(time.Now().Add(time.Second), func(d time.Time) { _ = b.Conn.SetWriteDeadline(d) })
	}
	return b.Conn.Close()
}

func (b *BatchConn) flushLocked() error {
	if b.buf == nil {
		return b.err
	}
	_, err := b.Conn.Write(*b.buf)
	*b.buf = (*b.buf)[:0]
	batchBuffers.Put(b.buf)
	b.buf = nil
	if err != nil && b.err == nil {
		b.err = err
	}
	return b.err
}

func (b *BatchConn) begin() {
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

// end closes a batch and writes what it holds.
func (b *BatchConn) end() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	return b.flushLocked()
}

// batchOf finds the BatchConn under a WebSocket's TLS connection, through
// any wrappers that can unwrap.
func batchOf(c net.Conn) *BatchConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	for {
		switch w := c.(type) {
		case *BatchConn:
			return w
		case interface{ NetConn() net.Conn }:
			c = w.NetConn()
		default:
			return nil
		}
	}
}
