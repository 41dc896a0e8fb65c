package tunnel

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tcpPair is a real loopback TCP connection: the client end queued.
func tcpPair(t *testing.T) (*QueuedConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(acc)
			return
		}
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	srv, ok := <-acc
	require.True(t, ok, "accepted")
	q := NewQueuedConn(c)
	t.Cleanup(func() { q.Close(); srv.Close() })
	return q, srv
}

func TestQueuedConn(t *testing.T) {
	tests := []struct {
		name    string
		writers int
		each    int // bytes per write
		writes  int // per writer
	}{
		{name: "one writer, small writes", writers: 1, each: 100, writes: 1000},
		{name: "many writers, small writes", writers: 16, each: 37, writes: 200},
		{name: "writes over the queue's size", writers: 2, each: maxPending + 4096, writes: 4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q, srv := tcpPair(t)
			total := tc.writers * tc.each * tc.writes
			got := make(chan []byte, 1)
			go func() {
				b, _ := io.ReadAll(io.LimitReader(srv, int64(total)))
				got <- b
			}()
			// Each writer writes its own byte value, so order within a
			// writer's bytes and the total can be checked.
			var wg sync.WaitGroup
			for w := range tc.writers {
				wg.Go(func() {
					p := bytes.Repeat([]byte{byte('a' + w)}, tc.each)
					for range tc.writes {
						n, err := q.Write(p)
						assert.NoError(t, err)
						assert.Equal(t, len(p), n)
					}
				})
			}
			wg.Wait()
			b := <-got
			require.Len(t, b, total, "every queued byte arrives")
			for w := range tc.writers {
				assert.Equal(t, tc.each*tc.writes, bytes.Count(b, []byte{byte('a' + w)}), "writer %d", w)
			}
		})
	}
}

// TestQueuedConnCloseSendsQueued: what was written before Close leaves
// before the connection closes.
func TestQueuedConnCloseSendsQueued(t *testing.T) {
	q, srv := tcpPair(t)
	want := make([]byte, 1<<20)
	rand.Read(want)
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(srv) // until the close
		got <- b
	}()
	_, err := q.Write(want)
	require.NoError(t, err)
	require.NoError(t, q.Close())
	assert.True(t, bytes.Equal(want, <-got), "all bytes, then EOF")
	_, err = q.Write([]byte("x"))
	assert.ErrorIs(t, err, net.ErrClosed)
}

// TestQueuedConnReportsFailedSend: a send that fails is returned by a later
// Write, and every one after it.
func TestQueuedConnReportsFailedSend(t *testing.T) {
	q, _ := tcpPair(t)
	q.Conn.Close() // the socket goes away under the queue
	var err error
	for i := 0; i < 1000 && err == nil; i++ { // bounded; the second write usually fails
		_, err = q.Write(make([]byte, 1024))
		if err == nil {
			time.Sleep(time.Millisecond) // let the flusher meet the closed socket
		}
	}
	require.Error(t, err, "a failed send is reported")
	_, err = q.Write([]byte("x"))
	require.Error(t, err, "and the connection stays broken")
}

// heldSender is a queue's send that records each send's bytes and deadline
// and waits for the test to release it.
type heldSender struct {
	q       *writeQueue
	release chan struct{}
	mu      sync.Mutex
	sent    []string
	by      []time.Time
	in      []string // the goroutine each send ran in (see goroutine)
}

func (h *heldSender) flush() { h.q.run(h.send) }

func (h *heldSender) send(p []byte, deadline time.Time) error {
	<-h.release
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sent = append(h.sent, string(p))
	h.by = append(h.by, deadline)
	h.in = append(h.in, goroutine())
	return nil
}

// waitQueue waits until cond, called with q's lock held, holds.
func waitQueue(t *testing.T, q *writeQueue, cond func() bool) {
	t.Helper()
	require.Eventually(t, func() bool {
		q.mu.Lock()
		defer q.mu.Unlock()
		return cond()
	}, 5*time.Second, time.Millisecond)
}

// goroutine names the calling goroutine ("goroutine 42").
func goroutine() string {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	return string(buf[:bytes.Index(buf, []byte(" ["))])
}

// TestWriteThroughWhenQuiet: a write to a quiet connection is sent by the
// writer, in its goroutine; one right after another write is queued for a
// flusher goroutine, and the writer does not wait for its send.
func TestWriteThroughWhenQuiet(t *testing.T) {
	tests := []struct {
		name      string
		lastWrite time.Duration // before the write
		byWriter  bool
	}{
		{name: "quiet", lastWrite: time.Hour, byWriter: true},
		{name: "never written", byWriter: true},
		{name: "just written", lastWrite: -time.Hour, byWriter: false}, // "now" reads as before it
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := &writeQueue{}
			if tc.lastWrite != 0 {
				q.lastWrite = time.Since(clockStart) - tc.lastWrite
			}
			h := &heldSender{q: q, release: make(chan struct{})}
			if !tc.byWriter {
				n, err := q.writeAll([]byte("x"), h) // returns while the send is held
				require.NoError(t, err)
				require.Equal(t, 1, n)
				close(h.release)
			} else {
				close(h.release)
				n, err := q.writeAll([]byte("x"), h)
				require.NoError(t, err)
				require.Equal(t, 1, n)
			}
			waitQueue(t, q, func() bool { return !q.flushing })
			h.mu.Lock()
			defer h.mu.Unlock()
			require.Equal(t, []string{"x"}, h.sent)
			assert.Equal(t, tc.byWriter, h.in[0] == goroutine(), "sent by the writer's goroutine (%s, writer %s)", h.in[0], goroutine())
		})
	}
}

// TestWriteQueueDeadlines: queued bytes leave under the deadline in force
// when they were written, so a deadline set after (crypto/tls's Close sets
// one in the past once its close_notify is queued) does not lose them; a
// write while a past deadline is in force fails as on a socket.
func TestWriteQueueDeadlines(t *testing.T) {
	soon, later := time.Now().Add(time.Minute), time.Now().Add(time.Hour)
	type write struct {
		deadline time.Time
		text     string
	}
	tests := []struct {
		name   string
		writes []write // queued while the flusher is held
		wantBy time.Time
	}{
		{name: "no deadline", writes: []write{{text: "a"}, {text: "b"}}},
		{name: "one deadline", writes: []write{{soon, "a"}}, wantBy: soon},
		{name: "the latest bounds all", writes: []write{{later, "a"}, {soon, "b"}}, wantBy: later},
		{name: "a write without one", writes: []write{{soon, "a"}, {text: "b"}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := &writeQueue{}
			h := &heldSender{q: q, release: make(chan struct{})}
			first := make(chan error, 1)
			go func() { // a quiet connection: sent by this writer, held in send
				_, err := q.writeAll([]byte("first;"), h)
				first <- err
			}()
			waitQueue(t, q, func() bool { return q.flushing && q.pending == nil }) // "first;" is being sent
			want := "first;"
			for _, w := range tc.writes {
				q.setDeadline(w.deadline)
				_, err := q.writeAll([]byte(w.text), h)
				require.NoError(t, err)
				want += w.text
			}
			q.setDeadline(time.Now().Add(-time.Second)) // as tls.Conn.Close does
			n, err := q.writeAll([]byte("late"), h)
			assert.ErrorIs(t, err, os.ErrDeadlineExceeded, "a write past the deadline fails")
			assert.Zero(t, n)

			close(h.release)
			require.NoError(t, <-first)
			waitQueue(t, q, func() bool { return !q.flushing }) // the flusher sent all and ended
			h.mu.Lock()
			defer h.mu.Unlock()
			assert.Equal(t, want, strings.Join(h.sent, ""), "what was written before the past deadline left")
			require.Len(t, h.by, 2, "the held send, then the rest together")
			assert.True(t, h.by[0].IsZero(), "first; had no deadline")
			assert.True(t, tc.wantBy.Equal(h.by[1]), "second send's deadline: got %v, want %v", h.by[1], tc.wantBy)
		})
	}
}
