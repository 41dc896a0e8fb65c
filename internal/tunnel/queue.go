package tunnel

import (
	"net"
	"os"
	"runtime"
	"sync"
	"time"
)

// writeQueue turns a connection's writes into queued ones: Write appends
// and returns, and a flusher goroutine, started when the queue was empty
// and ended once it is, sends what has queued up meanwhile in one go.
//
// HTTP/2 framers (x/net's on both ends of a tunnel, net/http's towards the
// API server) flush after every request's and response's headers, each
// holding their connection's write lock through the whole send. Written in
// the caller, every small request cost a write syscall of its own, and on a
// tunnel also a WebSocket frame and a TLS record (profiles of `make bench`
// small GETs, terminate mode: a quarter to a third of relay and agent CPU);
// the next stream's headers waited on the lock. Queued, what concurrent
// streams write while a send is under way leaves together; a lone write
// costs a goroutine start, not a wait.
//
// Past maxPending queued bytes a writer waits for the flusher, so a slow
// peer holds up writers as before. A failed send is returned by the next
// write (x/net's HTTP/2 buffers its writes the same way).
//
// Deadlines (setDeadline) go with the writes: bytes are sent under the
// deadline that was in force when they were accepted, and a deadline set
// later does not reach them, as it would not reach bytes a socket has taken
// into its buffer. crypto/tls's Close queues its close_notify and then sets
// the write deadline to now, to fail any later write; applied to the send
// that followed, that lost the connection's last records (TestQueueWrites,
// once in CI). A write while a past deadline is in force fails, as on a
// socket.
type writeQueue struct {
	mu       sync.Mutex
	cond     sync.Cond // on mu: the queue was taken, or the flusher ended (a value: nothing allocated per idle connection)
	pending  *[]byte   // pooled; bytes accepted and not yet taken by the flusher
	flushing bool      // a flusher goroutine runs
	err      error     // the first failed send (or close): the connection is broken
	deadline time.Time // for the writes accepted after it is set
	// pendingBy is when pending must have left: the latest deadline of
	// its writes (they go in order, so the last bounds them all), zero
	// when one of them had none.
	pendingBy time.Time
	// lastWrite is when the last write came (see writeAll), on the
	// monotonic clock since clockStart (zero: never): 8 bytes on every
	// tunnel, where a time.Time is 24.
	lastWrite time.Duration
}

// clockStart is what lastWrite counts from.
var clockStart = time.Now()

// quietGap is how long a connection must have had no write for the next
// one to be sent by its writer (see writeAll): longer than the gap between
// the frames of one response written in a burst, far shorter than the gap
// between requests at one request at a time.
const quietGap = 50 * time.Microsecond

// lock takes mu, setting cond on it the first time: a zero writeQueue is
// ready to use.
func (q *writeQueue) lock() {
	q.mu.Lock()
	if q.cond.L == nil {
		q.cond.L = &q.mu
	}
}

// maxPending is how many bytes a queue holds before writers wait for the
// flusher: one full tunnel message.
const maxPending = maxWriteMessage

// pendingBuffers are the queues; a connection holds one only while bytes
// wait, so idle connections hold none.
var pendingBuffers = sync.Pool{New: func() any {
	b := make([]byte, 0, 32<<10)
	return &b
}}

// write queues p, or its first n bytes. When it returns start, the caller
// must run a flusher (go ...flush, which calls run), none was running, and
// then call write again with the rest. (Returning start rather than taking
// the flusher as a function saves a closure per write.)
func (q *writeQueue) write(p []byte) (n int, start bool, err error) {
	q.lock()
	defer q.mu.Unlock()
	for len(p) > 0 {
		for q.err == nil && q.pending != nil && len(*q.pending) >= maxPending {
			if start {
				return n, start, nil // the flusher that would make room is not running yet
			}
			q.cond.Wait()
		}
		if q.err != nil {
			return n, start, q.err
		}
		if !q.deadline.IsZero() && !time.Now().Before(q.deadline) {
			return n, start, os.ErrDeadlineExceeded
		}
		if q.pending == nil {
			q.pending = pendingBuffers.Get().(*[]byte)
			q.pendingBy = q.deadline
		} else {
			q.pendingBy = later(q.pendingBy, q.deadline)
		}
		chunk := p[:min(len(p), maxPending-len(*q.pending))]
		*q.pending = append(*q.pending, chunk...)
		n += len(chunk)
		p = p[len(chunk):]
		if !q.flushing {
			q.flushing, start = true, true
		}
	}
	return n, start, nil
}

// flusher starts a queue's flusher goroutine: go x.flush(), where flush
// calls the queue's run with send, and sends one write itself (see
// writeAll). (An interface with pointer receivers, so that a write
// allocates no closure.)
type flusher interface {
	flush()
	send(p []byte, deadline time.Time) error
}

// writeAll queues all of p, starting f's flusher whenever write asks for
// one; a failed earlier send is returned here.
//
// A write to a quiet connection (no send under way, nothing queued, no
// write for quietGap) is sent by the writer itself, in its goroutine: at
// one request at a time there is nothing to batch with, and handing each
// write to a new flusher cost a goroutine start and a thread wake-up per
// hop (docs/performance.md, sixth pass). Writes meanwhile queue as usual
// and a flusher takes them after. An earlier try sent every lone write
// inline and lost throughput at 64 concurrent, where writes come closer
// together than quietGap and now queue.
func (q *writeQueue) writeAll(p []byte, f flusher) (n int, err error) {
	if sent, err := q.writeThrough(p, f); sent {
		if err != nil {
			return 0, err
		}
		return len(p), nil
	}
	for {
		m, start, err := q.write(p[n:])
		n += m
		if start {
			go f.flush()
		}
		if err != nil || n == len(p) {
			return n, err
		}
	}
}

// writeThrough sends p in the caller when the connection is quiet (see
// writeAll) and reports whether it did; err is then the send's.
func (q *writeQueue) writeThrough(p []byte, f flusher) (sent bool, err error) {
	q.lock()
	now := time.Now()
	mono := now.Sub(clockStart)
	quiet := !q.flushing && q.pending == nil && q.err == nil && (q.lastWrite == 0 || mono-q.lastWrite > quietGap) &&
		(q.deadline.IsZero() || now.Before(q.deadline))
	q.lastWrite = mono
	if !quiet {
		q.mu.Unlock()
		return false, nil
	}
	q.flushing = true // writes meanwhile queue behind this one
	deadline := q.deadline
	q.mu.Unlock()

	err = f.send(p, deadline)

	q.mu.Lock()
	if err != nil && q.err == nil {
		q.err = err
	}
	more := q.pending != nil && q.err == nil
	if !more {
		q.flushing = false
		q.cond.Broadcast() // for drain
	}
	q.mu.Unlock()
	if more {
		go f.flush() // still flushing: take over what queued meanwhile
	}
	return true, err
}

// run is the flusher: it sends what is queued with send until nothing is
// left, then ends.
func (q *writeQueue) run(send func(p []byte, deadline time.Time) error) {
	// Let the goroutines that are ready run first: under load they are
	// the other streams' writers (woken by the same netpoll), and what
	// they write joins this send. With nobody else ready it returns at
	// once. (make bench, small GETs at 64 concurrent, profiled: write
	// syscalls per request 2.19 -> 1.39 at the relay in passthrough, 1.15
	// -> 0.39 at the agent in terminate; relay + agent CPU per request
	// -18% in passthrough; 1-concurrent p50 unchanged.)
	runtime.Gosched()
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.err == nil && q.pending != nil {
		buf, deadline := q.pending, q.pendingBy
		q.pending = nil
		q.cond.Broadcast() // room for writers waiting on a full queue
		q.mu.Unlock()
		err := send(*buf, deadline)
		*buf = (*buf)[:0]
		pendingBuffers.Put(buf)
		q.mu.Lock()
		if err != nil && q.err == nil {
			q.err = err
		}
	}
	q.flushing = false
	q.cond.Broadcast()
}

// drain waits until the flusher has sent what was queued, or failed, and
// refuses writes from then on. bound is called with deadline when a send
// is under way: a peer that reads nothing would hold it forever, so bound
// must end it by then (a deadline on the socket).
func (q *writeQueue) drain(deadline time.Time, bound func(time.Time)) {
	q.lock()
	defer q.mu.Unlock()
	if q.flushing {
		q.deadline = deadline
		q.pendingBy = sooner(q.pendingBy, deadline)
		bound(deadline)
		for q.flushing {
			q.cond.Wait()
		}
	}
	if q.err == nil {
		q.err = net.ErrClosed
	}
	q.cond.Broadcast()
}

func (q *writeQueue) setDeadline(t time.Time) {
	q.mu.Lock()
	q.deadline = t
	q.mu.Unlock()
}

// later is the later of two deadlines, where zero (none) is the latest.
func later(a, b time.Time) time.Time {
	if a.IsZero() || b.IsZero() {
		return time.Time{}
	}
	if a.After(b) {
		return a
	}
	return b
}

// sooner is the sooner of two deadlines, where zero (none) is the latest.
func sooner(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

// QueuedConn is a net.Conn whose writes are queued (see writeQueue): the
// agent's connections to the API server, where net/http's HTTP/2 client
// writes each request's headers with a syscall of its own while many
// requests are in flight. Reads are the connection's own.
type QueuedConn struct {
	net.Conn
	q writeQueue
}

// NewQueuedConn wraps c (a TCP connection, under TLS if any).
func NewQueuedConn(c net.Conn) *QueuedConn { return &QueuedConn{Conn: c} }

// Write queues p; a failed earlier send is returned here.
func (c *QueuedConn) Write(p []byte) (int, error) { return c.q.writeAll(p, c) }

func (c *QueuedConn) flush() { c.q.run(c.send) }

func (c *QueuedConn) send(p []byte, deadline time.Time) error {
	_ = c.Conn.SetWriteDeadline(deadline)
	_, err := c.Conn.Write(p)
	return err
}

// SetDeadline sets the read deadline now and the write deadline of the
// writes that follow.
func (c *QueuedConn) SetDeadline(t time.Time) error {
	c.q.setDeadline(t)
	return c.Conn.SetReadDeadline(t)
}

// SetWriteDeadline applies to the writes that follow.
func (c *QueuedConn) SetWriteDeadline(t time.Time) error {
	c.q.setDeadline(t)
	return nil
}

// Close sends what is queued (within a second) and closes the connection.
func (c *QueuedConn) Close() error {
	c.q.drain(time.Now().Add(time.Second), func(d time.Time) { _ = c.Conn.SetWriteDeadline(d) })
	return c.Conn.Close()
}

// CloseWrite sends what is queued, then half-closes, when the connection
// can.
func (c *QueuedConn) CloseWrite() error {
	c.q.drain(time.Now().Add(time.Second), func(d time.Time) { _ = c.Conn.SetWriteDeadline(d) })
	return CloseWrite(c.Conn)
}
