package server

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStallConn: a write the peer does not take is cut after d to 1.5 d,
// also after a deadline was set and cleared from outside (as net/http does
// around the TLS handshake), and writes the peer takes go through however
// long the connection lives.
func TestStallConn(t *testing.T) {
	const d = 100 * time.Millisecond
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	c := &stallConn{Conn: a, d: d}

	// Taken writes, spread over more than 1.5 d: the deadline moves along.
	go func() {
		buf := make([]byte, 1)
		for range 4 {
			if _, err := b.Read(buf); err != nil {
				return
			}
		}
	}()
	for range 4 {
		_, err := c.Write([]byte("x"))
		require.NoError(t, err)
		time.Sleep(d / 2) // the connection idles between writes; no readiness is awaited
	}

	stalled := func(what string) {
		t.Helper()
		start := time.Now()
		_, err := c.Write([]byte("y")) // nobody reads b now
		took := time.Since(start)
		require.Error(t, err, what)
		assert.True(t, errors.Is(err, os.ErrDeadlineExceeded), "%s: %v", what, err)
		assert.GreaterOrEqual(t, took, d, "%s: the write had at least d", what)
		assert.Less(t, took, 1500*time.Millisecond, "%s: cut, not left hanging", what)
	}
	stalled("a stalled write")
	require.NoError(t, c.SetWriteDeadline(time.Time{}))
	stalled("after the deadline was cleared from outside")
}
