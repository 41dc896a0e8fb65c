package tunnel

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// wireConn is a server-side socket whose peer already sent in: the raw
// bytes a (possibly hostile) agent or relay put on the wire after the
// WebSocket handshake. Writes are dropped.
type wireConn struct {
	net.Conn
	in io.Reader
}

func (c *wireConn) Read(p []byte) (int, error)       { return c.in.Read(p) }
func (c *wireConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *wireConn) Close() error                     { return nil }
func (c *wireConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *wireConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *wireConn) SetDeadline(time.Time) error      { return nil }
func (c *wireConn) SetReadDeadline(time.Time) error  { return nil }
func (c *wireConn) SetWriteDeadline(time.Time) error { return nil }

// hijacker lets gorilla's Upgrader take over a wireConn.
type hijacker struct {
	*httptest.ResponseRecorder
	conn net.Conn
}

func (h hijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return h.conn, bufio.NewReadWriter(bufio.NewReader(h.conn), bufio.NewWriter(h.conn)), nil
}

// serverConnOn upgrades a synthetic request on a socket that yields wire,
// and adapts it exactly as the relay does.
func serverConnOn(t *testing.T, wire []byte) *Conn {
	r := httptest.NewRequest(http.MethodGet, "/v1/tunnel", nil)
	r.Header.Set("Connection", "Upgrade")
	r.Header.Set("Upgrade", "websocket")
	r.Header.Set("Sec-WebSocket-Version", "13")
	r.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	ws, err := (&websocket.Upgrader{}).Upgrade(hijacker{httptest.NewRecorder(), &wireConn{in: bytes.NewReader(wire)}}, r, nil)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	return NewConn(ws)
}

// frame builds one masked client frame (the form a peer must send).
func frame(fin bool, op byte, payload []byte) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	out := []byte{b0}
	switch n := len(payload); {
	case n < 126:
		out = append(out, 0x80|byte(n))
	case n < 1<<16:
		out = append(out, 0x80|126, byte(n>>8), byte(n))
	default:
		out = append(out, 0x80|127)
		out = binary.BigEndian.AppendUint64(out, uint64(n))
	}
	mask := []byte{1, 2, 3, 4}
	out = append(out, mask...)
	for i, c := range payload {
		out = append(out, c^mask[i%4])
	}
	return out
}

// FuzzConnRead feeds arbitrary bytes, as the peer's side of the wire, to
// the WebSocket adapter. Whatever arrives, Read must not panic, must not
// return more payload than was sent, and must end with an error rather
// than block or buffer without bound (the message limit holds).
func FuzzConnRead(f *testing.F) {
	f.Add(frame(true, websocket.BinaryMessage, []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")))
	f.Add(append(frame(false, websocket.BinaryMessage, []byte("ab")), frame(true, 0, []byte("cd"))...))
	f.Add(frame(true, websocket.TextMessage, []byte("text")))
	f.Add(append(frame(true, websocket.PingMessage, nil), frame(true, websocket.BinaryMessage, []byte{0})...))
	f.Add(frame(true, websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")))
	f.Add([]byte{0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4}) // 2^63 length
	f.Add([]byte{0x82, 0xff, 0, 0, 0, 0, 0, 0x10, 0, 1, 1, 2, 3, 4})                      // MaxMessageSize+1
	f.Add([]byte{0x82, 0x05, 'h', 'e', 'l', 'l', 'o'})                                    // unmasked
	f.Fuzz(func(t *testing.T, wire []byte) {
		c := serverConnOn(t, wire)
		defer c.Close()
		var got int
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			got += n
			if got > len(wire) {
				t.Fatalf("read %d payload bytes from %d wire bytes", got, len(wire))
			}
			if err != nil {
				return // every input ends in an error (EOF at the latest)
			}
			if n == 0 {
				t.Fatal("Read returned 0 bytes and no error")
			}
		}
	})
}
