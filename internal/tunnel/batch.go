package tunnel

import (
	"crypto/tls"
	"net"
	"sync"
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
