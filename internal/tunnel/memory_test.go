package tunnel

import (
	"io"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// An open stream that carries nothing (an idle passthrough connection, an
// exec session waiting for input) holds little on relay and agent
// together: every one a kubectl user leaves open costs this on a shared
// relay. At the agent's old 256 KiB frame size, x/net's client held a
// scratch buffer of that size per open request body, about 300 KiB per
// stream in all.
func TestOpenStreamsHoldLittle(t *testing.T) {
	const streams = 64
	const perStreamBound = 128 << 10
	srv := NewAgentServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st, err := AcceptStream(w, r)
		if err != nil {
			return
		}
		// Answer each byte with one, with a buffer of one: what the test
		// weighs is the tunnel's part, not a copy buffer of the target.
		var b [1]byte
		for {
			if _, err := st.Read(b[:]); err != nil {
				return
			}
			if _, err := st.Write(b[:]); err != nil {
				return
			}
		}
	}), streams+1, DefaultLiveness)
	ctx, cc := pipeTunnel(t, srv)

	open := func() *Stream {
		st, err := OpenStream(ctx, cc, "x", StreamTCP, 5*time.Second)
		require.NoError(t, err)
		_, err = st.Write([]byte{'a'})
		require.NoError(t, err)
		var b [1]byte
		_, err = io.ReadFull(st, b[:])
		require.NoError(t, err)
		return st
	}
	// One stream first, so that what every connection holds once (framer
	// buffers, pools) is in the base.
	first := open()
	defer first.Close()
	before := liveHeap()
	var held []*Stream
	for range streams {
		held = append(held, open())
	}
	perStream := (liveHeap() - before) / streams
	for _, st := range held {
		st.Close()
	}
	t.Logf("%d open idle streams: %d KiB each, relay and agent together", streams, perStream>>10)
	assert.LessOrEqual(t, perStream, int64(perStreamBound), "bytes held per open idle stream")
}

// liveHeap is the heap in use right after a collection, goroutine stacks
// included.
func liveHeap() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc + ms.StackInuse)
}
