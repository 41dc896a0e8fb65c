package tunnel

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
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
