// Package sni reads the server name of a TLS connection from its ClientHello
// without consuming it, so the connection can then be terminated locally or
// handed on untouched.
package sni

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// maxHello bounds the bytes buffered while peeking: a TLS record carries at
// most 16 KiB of plaintext, and a ClientHello must fit in the first record
// for us (every mainstream client does; post-quantum key shares included).
const maxHello = 5 + 16384

// ErrNotTLS is returned when the first bytes are not a TLS handshake record.
var ErrNotTLS = errors.New("not a TLS handshake")

// Conn is a net.Conn that replays the peeked bytes before reading on.
type Conn struct {
	net.Conn
	pending []byte
}

func (c *Conn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		if len(c.pending) == 0 {
			// An empty tail still pins the ClientHello's array for as
			// long as the connection lives (a tunnel: days).
			c.pending = nil
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

// readers are reused across connections: a 16 KiB buffer per connection for
// its whole life would dominate the relay's memory under many idle clients.
var readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, maxHello) }}

// CloseWrite half-closes the underlying connection when it supports it.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// Peek reads conn's ClientHello, waiting at most timeout for it, and returns
// the server name it asks for ("" when it names none) and a Conn that still
// yields every byte read. The deadline is cleared before returning.
func Peek(conn net.Conn, timeout time.Duration) (string, *Conn, error) {
	br := readers.Get().(*bufio.Reader)
	br.Reset(conn)
	defer func() { br.Reset(nil); readers.Put(br) }()
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return "", &Conn{Conn: conn}, fmt.Errorf("setting hello deadline: %w", err)
	}
	name, err := ServerName(br)
	conn.SetReadDeadline(time.Time{})
	buffered, _ := br.Peek(br.Buffered())
	return name, &Conn{Conn: conn, pending: bytes.Clone(buffered)}, err
}

// ServerName parses a ClientHello from the front of r without consuming it.
func ServerName(r *bufio.Reader) (string, error) {
	hdr, err := r.Peek(5)
	if err != nil {
		return "", fmt.Errorf("reading record header: %w", err)
	}
	if hdr[0] != 0x16 { // handshake
		return "", ErrNotTLS
	}
	n := int(hdr[3])<<8 | int(hdr[4])
	if n == 0 || n > maxHello-5 {
		return "", fmt.Errorf("%w: record length %d", ErrNotTLS, n)
	}
	rec, err := r.Peek(5 + n)
	if err != nil {
		return "", fmt.Errorf("reading client hello: %w", err)
	}
	return parseHello(rec)
}

// errDone stops crypto/tls once it has handed us the ClientHello.
var errDone = errors.New("client hello read")

// parseHello lets crypto/tls parse rec: a hand-written parser would be one
// more place for the bugs the fuzzer hunts.
func parseHello(rec []byte) (string, error) {
	var name string
	var seen bool
	err := tls.Server(readOnlyConn{r: bytes.NewReader(rec)}, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			name, seen = h.ServerName, true
			return nil, errDone
		},
	}).Handshake()
	if seen {
		return name, nil
	}
	if err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "", fmt.Errorf("%w: truncated client hello", ErrNotTLS)
	}
	return "", fmt.Errorf("%w: %v", ErrNotTLS, err)
}

// readOnlyConn feeds crypto/tls the recorded hello and swallows its answers.
type readOnlyConn struct {
	r io.Reader
	net.Conn
}

func (c readOnlyConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c readOnlyConn) Write(p []byte) (int, error)      { return 0, io.EOF }
func (readOnlyConn) Close() error                       { return nil }
func (readOnlyConn) LocalAddr() net.Addr                { return nil }
func (readOnlyConn) RemoteAddr() net.Addr               { return nil }
func (readOnlyConn) SetDeadline(t time.Time) error      { return nil }
func (readOnlyConn) SetReadDeadline(t time.Time) error  { return nil }
func (readOnlyConn) SetWriteDeadline(t time.Time) error { return nil }

// Alert values for WriteAlert.
const (
	AlertUnrecognizedName = 112
	AlertInternalError    = 80
)

// WriteAlert sends a fatal TLS alert record, so a refused client sees
// "tls: unrecognized name" instead of a bare reset.
func WriteAlert(w io.Writer, desc byte) error {
	_, err := w.Write([]byte{0x15, 0x03, 0x03, 0x00, 0x02, 0x02, desc})
	return err
}
