package tunnel

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

type batchListener struct {
	net.Listener
	writes *atomic.Int64
}

func (l batchListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return NewBatchConn(countingConn{Conn: c, writes: l.writes}), nil
}

// tlsPair returns a WebSocket over real TLS whose server end (the relay's
// side) has a BatchConn under its TLS, and the server's socket writes.
func tlsPair(t *testing.T) (client, server *Conn, writes *atomic.Int64) {
	t.Helper()
	writes = new(atomic.Int64)
	srvCh := make(chan *Conn, 1)
	up := NewUpgrader()
	hs := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		srvCh <- NewConn(ws)
	}))
	hs.Listener = batchListener{Listener: hs.Listener, writes: writes}
	hs.StartTLS()
	t.Cleanup(hs.Close)
	d := websocket.Dialer{TLSClientConfig: hs.Client().Transport.(*http.Transport).TLSClientConfig}
	ws, _, err := d.Dial("wss"+strings.TrimPrefix(hs.URL, "https"), nil)
	require.NoError(t, err)
	client, server = NewConn(ws), <-srvCh
	t.Cleanup(func() { client.Close(); server.Close() })
	require.NotNil(t, server.batch, "the BatchConn under TLS is found")
	return client, server, writes
}

func TestBatchConnOneSyscallPerMessage(t *testing.T) {
	client, server, writes := tlsPair(t)
	msg := make([]byte, maxWriteMessage) // 16 TLS records
	rand.Read(msg)
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(msg))
		io.ReadFull(client, b)
		got <- b
	}()
	before := writes.Load()
	n, err := server.Write(msg)
	require.NoError(t, err)
	assert.Equal(t, len(msg), n)
	assert.Equal(t, msg, <-got)
	assert.Equal(t, int64(1), writes.Load()-before, "one message, one write to the socket")
}

// TestBatchConnKeepsOrderWithControlFrames writes data while pings go out
// from another goroutine (as AwaitData's timer and pong replies do): every
// byte must arrive, in order, and TLS must not see records out of sequence.
func TestBatchConnKeepsOrderWithControlFrames(t *testing.T) {
	client, server, _ := tlsPair(t)
	want := make([]byte, 8<<20)
	rand.Read(want)
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(want))
		n, err := io.ReadFull(client, b)
		if err != nil {
			t.Logf("read: %v", err)
		}
		got <- b[:n]
	}()
	// The server reads too, as every tunnel end does, so pongs are consumed.
	go io.Copy(io.Discard, server)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for i := 0; i < 10000; i++ { // bounded; usually stopped far sooner
			select {
			case <-stop:
				return
			default:
			}
			if server.ws.WriteControl(websocket.PingMessage, []byte("p"), time.Now().Add(time.Second)) != nil {
				return
			}
		}
	})
	for rest := want; len(rest) > 0; {
		n := min(len(rest), 100<<10+len(rest)%7919) // uneven sizes, some over one message
		_, err := server.Write(rest[:n])
		require.NoError(t, err)
		rest = rest[n:]
	}
	close(stop)
	wg.Wait()
	b := <-got
	require.Equal(t, len(want), len(b))
	assert.True(t, bytes.Equal(want, b), "bytes arrived intact and in order")
}

// TestBatchConnReportsFailedFlush: writes are queued (Conn.Write), so a
// send that fails is reported by a later Write, and every one after it.
func TestBatchConnReportsFailedFlush(t *testing.T) {
	_, server, _ := tlsPair(t)
	server.batch.Conn.Close() // the socket goes away under TLS
	var err error
	for i := 0; i < 1000 && err == nil; i++ { // bounded; the second write usually fails
		_, err = server.Write(make([]byte, 64<<10))
		if err == nil {
			time.Sleep(time.Millisecond) // let the flusher meet the closed socket
		}
	}
	require.Error(t, err, "a failed send is reported")
	_, err = server.Write([]byte("x"))
	require.Error(t, err, "and the connection stays broken")
}

// TestQueueWrites: once QueueWrites has switched a TLS connection's
// BatchConn, concurrent writers' bytes all arrive, each writer's in order,
// Close still sends what was queued (the last records and close_notify),
// and writes after Close fail.
func TestQueueWrites(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	hs := httptest.NewUnstartedServer(nil)
	defer hs.Close()
	hs.StartTLS() // only for its certificate and the client config that trusts it
	srvConf := hs.TLS.Clone()
	cliConf := hs.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
	cliConf.ServerName = "example.com"

	writes := new(atomic.Int64)
	srvCh := make(chan *tls.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(srvCh)
			return
		}
		tc := tls.Server(NewBatchConn(countingConn{Conn: c, writes: writes}), srvConf)
		if tc.Handshake() != nil {
			close(srvCh)
			return
		}
		srvCh <- tc
	}()
	cli, err := tls.Dial("tcp", ln.Addr().String(), cliConf)
	require.NoError(t, err)
	defer cli.Close()
	srv := <-srvCh
	require.NotNil(t, srv, "server handshake")
	require.True(t, QueueWrites(srv), "a BatchConn is under the TLS connection")
	assert.False(t, QueueWrites(cli), "none under the client's")

	const writers, each = 8, 500
	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(cli); got <- b }()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				_, err := fmt.Fprintf(srv, "w%d:%04d;", w, i)
				if err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	require.NoError(t, srv.Close())
	b := <-got
	next := make([]int, writers)
	for _, rec := range strings.Split(strings.TrimSuffix(string(b), ";"), ";") {
		var w, i int
		_, err := fmt.Sscanf(rec, "w%d:%d", &w, &i)
		require.NoError(t, err, "record %q", rec)
		require.Equal(t, next[w], i, "writer %d's records in order", w)
		next[w]++
	}
	for w := range writers {
		assert.Equal(t, each, next[w], "every record of writer %d arrived", w)
	}
	t.Logf("%d writes, %d socket writes", writers*each, writes.Load())
	_, err = srv.Write([]byte("late"))
	assert.Error(t, err, "writes after Close fail")
}
