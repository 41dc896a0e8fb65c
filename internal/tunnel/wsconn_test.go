package tunnel

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// wsPair returns the client and server ends of a real WebSocket over
// loopback, each adapted to net.Conn.
func wsPair(t *testing.T) (client, server *Conn) {
	t.Helper()
	srvCh := make(chan *Conn, 1)
	up := NewUpgrader() // the relay's buffer sizes: a 512-byte reader under 3 MiB writes

	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		srvCh <- NewConn(ws)
	}))
	t.Cleanup(hs.Close)
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(hs.URL, "http"), nil)
	require.NoError(t, err)
	client, server = NewConn(ws), <-srvCh
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestConnBasicIO(t *testing.T) {
	c, s := wsPair(t)
	want := make([]byte, 3<<20) // larger than one write message: split and rejoined
	rand.Read(want)
	go func() {
		c.Write(want)
		c.Close()
	}()
	got, err := io.ReadAll(s)
	require.NoError(t, err, "a normal close reads as EOF")
	assert.Equal(t, want, got)
}

func TestConnConcurrentWriters(t *testing.T) {
	c, s := wsPair(t)
	const writers, per = 8, 200
	var wg sync.WaitGroup
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := bytes.Repeat([]byte{byte('a' + i)}, 100)
			for range per {
				_, err := c.Write(msg)
				assert.NoError(t, err)
			}
		}()
	}
	go func() { wg.Wait(); c.Close() }()
	got, err := io.ReadAll(s)
	require.NoError(t, err)
	require.Len(t, got, writers*per*100)
	// Writes are atomic: every 100-byte run is one writer's.
	for i := 0; i < len(got); i += 100 {
		assert.Equal(t, bytes.Repeat(got[i:i+1], 100), got[i:i+100])
	}
}

func TestConnRejectsTextAndOversized(t *testing.T) {
	t.Run("text message", func(t *testing.T) {
		c, s := wsPair(t)
		require.NoError(t, c.ws.WriteMessage(websocket.TextMessage, []byte("hi")))
		_, err := s.Read(make([]byte, 10))
		require.ErrorContains(t, err, "non-binary")
	})
	t.Run("oversized message", func(t *testing.T) {
		c, s := wsPair(t)
		go c.ws.WriteMessage(websocket.BinaryMessage, make([]byte, MaxMessageSize+1))
		_, err := io.ReadAll(s)
		require.ErrorContains(t, err, "read limit")
	})
}

func TestConnDeadline(t *testing.T) {
	_, s := wsPair(t)
	require.NoError(t, s.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
	_, err := s.Read(make([]byte, 1))
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	assert.True(t, ne.Timeout())
}

func TestCloseIsIdempotent(t *testing.T) {
	c, _ := wsPair(t)
	require.NoError(t, c.Close())
	c.Close()
	select {
	case <-c.Done():
	default:
		t.Fatal("Done not closed")
	}
}

func TestAfterClose(t *testing.T) {
	c, _ := wsPair(t)
	ran := make(chan string, 2)
	c.AfterClose(func() { ran <- "before" })
	done := c.Done() // asked for before Close: Close closes it
	select {
	case <-ran:
		t.Fatal("ran before Close")
	default:
	}
	c.Close()
	require.Equal(t, "before", <-ran)
	<-done
	c.AfterClose(func() { ran <- "after" })
	require.Equal(t, "after", <-ran, "registered on a closed Conn, it runs at once")
}
