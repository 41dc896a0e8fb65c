//lint:file-ignore SA1019 x/net/http2 is deprecated in favour of net/http's own HTTP/2 (Go 1.26: http.Transport.NewClientConn, http.Server.Protocols); moving the tunnel's both ends to it changes the wire code and wants its own make bench run, so it is a change of its own.

package tunnel

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
)

// fastLiveness pings often, so that several rounds happen within a test.
var fastLiveness = Liveness{ReadIdle: 20 * time.Millisecond, Ping: 500 * time.Millisecond}

func TestAwaitDataKeepsAnsweringTunnelUp(t *testing.T) {
	agent, relay := wsPair(t)
	errs := make(chan error, 2)
	go func() { errs <- agent.AwaitData(context.Background(), fastLiveness) }()
	go func() { errs <- relay.AwaitData(context.Background(), fastLiveness) }()

	// Each side's pings are answered by the other side's waiting reader.
	require.Eventually(t, func() bool { return agent.pongs.Load() >= 3 && relay.pongs.Load() >= 3 },
		5*time.Second, 5*time.Millisecond, "pongs: agent %d, relay %d", agent.pongs.Load(), relay.pongs.Load())

	_, err := relay.Write([]byte("PRI * HTTP/2.0"))
	require.NoError(t, err)
	require.NoError(t, <-errs, "the first data message ends the wait")
	buf := make([]byte, 64)
	n, err := agent.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "PRI * HTTP/2.0", string(buf[:n]), "the message that ended the wait is read first")

	relay.Close()
	require.Error(t, <-errs)
}

func TestAwaitDataClosesSilentPeer(t *testing.T) {
	_, relay := wsPair(t) // the agent end never reads, so never answers a ping
	start := time.Now()
	err := relay.AwaitData(context.Background(), Liveness{ReadIdle: 20 * time.Millisecond, Ping: 50 * time.Millisecond})
	require.ErrorIs(t, err, errPingTimeout)
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.ErrorIs(t, relay.ReadErr(), errPingTimeout, "the tunnel's end is explained")
	select {
	case <-relay.Done():
	default:
		t.Fatal("a silent tunnel must be closed")
	}
}

func TestAwaitDataStopsWithContext(t *testing.T) {
	_, relay := wsPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- relay.AwaitData(ctx, DefaultLiveness) }()
	cancel()
	select {
	case err := <-done:
		require.Error(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("AwaitData ignored its context")
	}
}

// echoServer is an agent whose streams echo their bytes.
func echoServer() *AgentServer {
	return NewAgentServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st, err := AcceptStream(w, r)
		if err != nil {
			return
		}
		io.Copy(st, st)
	}), 10, fastLiveness)
}

func echoOnce(t *testing.T, cc http.RoundTripper) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := OpenStream(ctx, cc, "x", StreamTCP, 5*time.Second)
	require.NoError(t, err)
	defer st.Close()
	_, err = st.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(st, buf)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(buf))
}

func (l *LazyClientConn) started() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cc != nil
}

func TestLazyClientConnStartsOnFirstUse(t *testing.T) {
	agent, relay := wsPair(t)
	srv := echoServer()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { srv.ServeConn(ctx, agent); close(served) }()
	l := relayTransport(t, fastLiveness).StartLazyClientConn(relay)

	// Idle through several ping rounds: no HTTP/2 on either side yet.
	require.Eventually(t, func() bool { return relay.pongs.Load() >= 3 }, 5*time.Second, 5*time.Millisecond)
	assert.False(t, l.started(), "HTTP/2 must wait for the first request")
	assert.True(t, l.CanTakeNewRequest())

	echoOnce(t, l)
	assert.True(t, l.started())
	echoOnce(t, l) // and keeps serving

	require.NoError(t, l.Close())
	cancel()
	<-served
	assert.False(t, l.CanTakeNewRequest())
	_, err := l.RoundTrip(&http.Request{})
	require.Error(t, err)
}

// TestLazyClientConnWithEagerAgent: an agent that serves HTTP/2 at once
// (as earlier builds did) sends its SETTINGS first; the relay's client must
// start then, or the agent's pings would go unanswered.
func TestLazyClientConnWithEagerAgent(t *testing.T) {
	agent, relay := wsPair(t)
	h2s := &http2.Server{ReadIdleTimeout: 20 * time.Millisecond, PingTimeout: 500 * time.Millisecond}
	served := make(chan struct{})
	go func() {
		h2s.ServeConn(agent, &http2.ServeConnOpts{Handler: echoServer().hs.Handler})
		close(served)
	}()
	l := relayTransport(t, fastLiveness).StartLazyClientConn(relay)
	require.Eventually(t, l.started, 5*time.Second, 5*time.Millisecond)
	echoOnce(t, l)
	l.Close()
	<-served
}

// TestEagerRelayWithNewAgent: a relay that starts HTTP/2 at once (earlier
// builds) is served at once.
func TestEagerRelayWithNewAgent(t *testing.T) {
	agent, relay := wsPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() { echoServer().ServeConn(ctx, agent); close(served) }()
	cc, err := relayTransport(t, fastLiveness).NewClientConn(relay)
	require.NoError(t, err)
	echoOnce(t, cc)
	cc.Close()
	cancel()
	<-served
}

func TestShutdownClosesUnusedTunnels(t *testing.T) {
	agent, relay := wsPair(t)
	srv := echoServer()
	served := make(chan struct{})
	go func() { srv.ServeConn(context.Background(), agent); close(served) }()
	l := relayTransport(t, fastLiveness).StartLazyClientConn(relay)
	require.Eventually(t, func() bool { return relay.pongs.Load() >= 1 }, 5*time.Second, 5*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, srv.Shutdown(ctx))
	select {
	case <-served:
	case <-ctx.Done():
		t.Fatal("ServeConn kept an unused tunnel through Shutdown")
	}
	select {
	case <-relay.Done():
	case <-ctx.Done():
		t.Fatal("the relay did not see the unused tunnel close")
	}
	assert.False(t, l.CanTakeNewRequest(), "the relay sends new streams elsewhere")
}
