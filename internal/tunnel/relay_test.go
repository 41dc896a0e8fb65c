package tunnel

import (
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStreamOverPipe runs the agent's HTTP/2 server and the relay's client
// over net.Pipe: a raw stream echoes through a target with half-close.
func TestStreamOverPipe(t *testing.T) {
	// A TCP target: half-close must travel (net.Pipe cannot half-close).
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer echo.Close()
	go func() {
		c, err := echo.Accept()
		if err != nil {
			return
		}
		io.Copy(c, c)
		c.Close()
	}()
	target, err := net.Dial("tcp", echo.Addr().String())
	require.NoError(t, err)

	srv := NewAgentServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(HeaderStream) != StreamTCP {
			RefuseStream(w, http.StatusBadRequest, "want tcp")
			return
		}
		st, err := AcceptStream(w, r)
		if err != nil {
			return
		}
		st.Join(target, nil)
	}), 10, DefaultLiveness)
	ctx, cc := pipeTunnel(t, srv)

	_, err = OpenStream(ctx, cc, "x", "bogus", time.Second)
	require.ErrorIs(t, err, ErrRefused)
	require.ErrorContains(t, err, "want tcp")

	st, err := OpenStream(ctx, cc, "x", StreamTCP, time.Second)
	require.NoError(t, err)
	want := make([]byte, 1<<20)
	rand.Read(want)
	go func() { st.Write(want); st.CloseWrite() }()
	got, err := io.ReadAll(st)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	st.Close()
}

// pipeTunnel serves srv over net.Pipe and returns the relay's side of it,
// with a context that ends when the test does; both are closed, and the
// server waited for, at the test's end.
func pipeTunnel(t *testing.T, srv *AgentServer) (context.Context, http.RoundTripper) {
	t.Helper()
	relayEnd, agentEnd := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { srv.ServeConn(ctx, agentEnd); close(served) }()
	cc, err := relayTransport(t, DefaultLiveness).NewClientConn(relayEnd)
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close(); cancel(); <-served })
	return ctx, cc
}

// relayTransport is a relay's transport, made for one test.
func relayTransport(t *testing.T, live Liveness) *RelayTransport {
	t.Helper()
	rt, err := NewRelayTransport(live)
	require.NoError(t, err)
	return rt
}

// Two relays in one process (tests, scale-out) share no transport.
func TestRelayTransportsShareNothing(t *testing.T) {
	a, b := relayTransport(t, DefaultLiveness), relayTransport(t, DefaultLiveness)
	assert.NotSame(t, a.t, b.t)
}

// OpenStreamEarly returns before the agent answers: bytes written at once
// arrive once it accepts, and a refusal or silence is the first Read's
// error, and a refusal every Write's after it.
func TestOpenStreamEarly(t *testing.T) {
	accept := make(chan struct{})
	srv := NewAgentServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Header.Get(HeaderStream) {
		case "echo":
			<-accept // the relay has written already
			st, err := AcceptStream(w, r)
			if err != nil {
				return
			}
			buf := make([]byte, 5)
			if _, err := io.ReadFull(st, buf); err == nil {
				st.Write(buf)
			}
		case "silent":
			<-r.Context().Done()
		default:
			RefuseStream(w, http.StatusBadGateway, "target unreachable")
		}
	}), 10, DefaultLiveness)
	ctx, cc := pipeTunnel(t, srv)

	st := OpenStreamEarly(ctx, cc, "x", "echo", 5*time.Second)
	wrote := make(chan error, 1)
	go func() { _, err := st.Write([]byte("hello")); wrote <- err }()
	select {
	case err := <-wrote:
		require.NoError(t, err, "the write goes out before the agent answered")
	case <-time.After(5 * time.Second):
		t.Fatal("the write waited for the agent's answer")
	}
	close(accept)
	got := make([]byte, 5)
	_, err := io.ReadFull(st, got)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(got))
	st.Close()

	st = OpenStreamEarly(ctx, cc, "x", "refused", 5*time.Second)
	_, err = st.Read(got)
	require.ErrorIs(t, err, ErrRefused)
	assert.ErrorContains(t, err, "target unreachable")
	// A write after the refusal says why too, not that the pipe is
	// closed (an HTTP client that writes first reports the write's error).
	_, err = st.Write([]byte("late"))
	require.ErrorIs(t, err, ErrRefused)
	assert.ErrorContains(t, err, "target unreachable")
	st.Close()

	st = OpenStreamEarly(ctx, cc, "x", "silent", 200*time.Millisecond)
	_, err = st.Read(got)
	assert.ErrorContains(t, err, "no answer from agent within 200ms")
	st.Close()
}
