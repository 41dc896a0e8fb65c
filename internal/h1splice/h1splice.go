// Package h1splice carries a client's HTTP/1.1 connection, whose TLS the
// relay ended, to an upstream connection as bytes: no request becomes a
// Go request, no response a Go response, and the relay runs no HTTP
// server or client for it (h2splice does the same for HTTP/2).
//
// It reads just enough to keep the connection honest. Each request's head
// is parsed, strictly: a request for another of the relay's hosts is
// answered 421 (the connection was opened for one cluster), the
// X-Forwarded-* fields are the relay's own, the tunnel's Spectro-Proxy-*
// fields are dropped, and anything this parser and the upstream's could
// read differently (bare LF, obs-fold, Content-Length beside
// Transfer-Encoding, absolute-form targets) is refused with 400 rather
// than passed on, so that no request can hide inside another's body. The
// bodies' framing (Content-Length, chunked) is followed so that the next
// head is found. The upstream's answers are followed, not changed, to
// know which requests are open, when an upgrade (exec, port-forward)
// turns the connection into raw bytes, and where a streamed response (a
// watch) can end cleanly.
package h1splice

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/setcookie"
)

var (
	// ErrProtocol is the error of a client that broke HTTP/1.1's syntax
	// or framing; it was answered 400 (or 431, 501) and the connection
	// closed.
	ErrProtocol = errors.New("HTTP/1.1 protocol error")
	// ErrMisdirected: a request named a host Options.Allow refused; it
	// was answered 421 and the connection closed.
	ErrMisdirected = errors.New("misdirected request")
	// ErrUpstream is the error of an upstream whose answers could not be
	// followed.
	ErrUpstream = errors.New("upstream broke HTTP/1.1 framing")
	// ErrUpstreamHeaders: an answer's head was over
	// Options.MaxResponseHeaderBytes; the client got a 502.
	ErrUpstreamHeaders = errors.New("upstream answer too large")
	// errShut ends Write once Shut cut the connection.
	errShut = errors.New("connection shut")
)

// maxQueued bounds the requests a client may have sent ahead of their
// answers (pipelining): past it, the splice reads no more until one is
// answered.
const maxQueued = 16

// maxLine bounds a line of a head or a chunk's size: the reader's buffer.
const maxLine = 16 << 10

// Options says which requests go through and what they carry.
type Options struct {
	// Allow reports whether a request for host (lower case, no port)
	// may go on this connection.
	Allow func(host string) bool
	// MaxHeaderBytes bounds a request's head (request line and fields),
	// and a body's trailers.
	MaxHeaderBytes int
	// MaxResponseHeaderBytes bounds an answer's head.
	MaxResponseHeaderBytes int
	// ClientIP is sent as X-Forwarded-For, instead of any the client sent.
	ClientIP string
	// Refused (optional) is told, before the client is, of each request
	// the splice answers itself (err wraps ErrProtocol or
	// ErrMisdirected) and of each answer it replaces with a 502 (err
	// wraps ErrUpstream).
	Refused func(err error)
}

// request is one request sent upstream whose answer has not ended.
type request struct {
	path    string
	head    bool // HEAD: its answer has no body
	upgrade bool // asked to switch protocols
}

// Conn is the client's connection as the upstream should see it: Read
// yields the client's requests, checked; Write passes the upstream's
// answers on, following them. One goroutine may Read while another
// Writes.
type Conn struct {
	net.Conn
	opts Options
	br   *bufio.Reader

	// Read's state.
	pending  []byte // checked bytes Read has still to return
	passLeft int64  // body bytes to pass through
	body     int    // where in a request's body Read is (bodyNone...)
	raw      bool   // the connection switched protocols: bytes pass as they are
	refusal  *refusal
	hbuf     []byte // the last request head passed on

	// Shared, under smu; cond wakes a Read waiting for the answers.
	smu        sync.Mutex
	cond       *sync.Cond
	queue      []request
	upgrading  bool // an upgrade request waits for its answer
	switched   bool // the upstream answered it 101
	stopped    bool // no more requests are read (Connection: close)
	ended      bool // the connection is closing, or the upstream's side ended
	goingAway  atomic.Bool
	shutting   atomic.Bool
	closeAfter bool // the answer under way told the client Connection: close

	// Write's state, under wmu (which orders writes to the client).
	wmu       sync.Mutex
	resp      int    // where in an answer Write is (respHead...)
	head      []byte // the answer's head so far
	lineStart int    // where in head its last line starts
	rewrite   bool   // the head has a cookie whose Domain goes
	line      []byte // a chunked body's framing line so far
	status    int
	length    int64 // the answer's Content-Length, or -1
	chunked   bool
	respLeft  int64
	jsonish   bool // the answer's lines are events (JSON, text)
	lastByte  byte // of the last chunk's data
}

// Where Read is in a request's body.
const (
	bodyNone = iota
	bodyChunkSize
	bodyChunkEnd
	bodyTrailers
)

// Where Write is in an answer.
const (
	respHead = iota
	respBody
	respChunkSize
	respChunkData
	respChunkEnd
	respTrailers
	respToEOF
	respRaw
)

// New wraps c, the client's end, once its TLS negotiated HTTP/1.1.
func New(c net.Conn, opts Options) *Conn {
	s := &Conn{Conn: c, opts: opts, br: bufio.NewReaderSize(c, maxLine)}
	s.cond = sync.NewCond(&s.smu)
	return s
}

// Read returns the client's bytes that may go upstream. It returns what it
// holds before it would block for more.
func (c *Conn) Read(p []byte) (int, error) {
	if r := c.refusal; r != nil {
		c.refusal = nil
		return 0, c.refuse(r)
	}
	n := 0
	for n < len(p) {
		switch {
		case len(c.pending) > 0:
			k := copy(p[n:], c.pending)
			c.pending = c.pending[k:]
			n += k
		case c.raw || c.passLeft > 0:
			if n > 0 && c.br.Buffered() == 0 {
				return n, nil
			}
			want := len(p) - n
			if !c.raw {
				want = int(min(int64(want), c.passLeft))
			}
			k, err := c.br.Read(p[n : n+want])
			n += k
			if !c.raw {
				c.passLeft -= int64(k)
			}
			if err != nil {
				if c.raw && errors.Is(err, io.EOF) {
					return n, io.EOF
				}
				return n, unexpected(err)
			}
		default:
			if n > 0 && !c.lineBuffered() {
				return n, nil
			}
			if err := c.next(); err != nil {
				var r *refusal
				if !errors.As(err, &r) {
					return n, err
				}
				if n > 0 {
					// The bytes before it go first: the refusal may
					// wait for their answers.
					c.refusal = r
					return n, nil
				}
				return n, c.refuse(r)
			}
		}
	}
	return n, nil
}

// lineBuffered says whether the next step can be taken without blocking.
func (c *Conn) lineBuffered() bool {
	b, _ := c.br.Peek(c.br.Buffered())
	switch c.body {
	case bodyNone:
		return bytes.Contains(b, []byte("\r\n\r\n")) && !c.mustWait()
	case bodyTrailers:
		return bytes.HasPrefix(b, []byte("\r\n")) || bytes.Contains(b, []byte("\r\n\r\n"))
	}
	return bytes.IndexByte(b, '\n') >= 0
}

func (c *Conn) mustWait() bool {
	c.smu.Lock()
	defer c.smu.Unlock()
	return c.upgrading || c.stopped || len(c.queue) >= maxQueued
}

// unexpected turns an EOF inside a request into io.ErrUnexpectedEOF: only
// a client that ends between requests ended cleanly.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// next takes the next piece of the client's bytes: a request's head, or
// a chunk's size line, its end, or a body's trailers.
func (c *Conn) next() error {
	switch c.body {
	case bodyChunkSize:
		line, err := c.readLine()
		if err != nil {
			return c.bad(err)
		}
		size, err := chunkSize(line)
		if err != nil {
			return c.bad(err)
		}
		c.pending = append(c.pending[:0], line...)
		if size == 0 {
			c.body = bodyTrailers
		} else {
			c.passLeft, c.body = size, bodyChunkEnd
		}
		return nil
	case bodyChunkEnd:
		crlf, err := c.br.Peek(2)
		if err != nil {
			return unexpected(err)
		}
		if crlf[0] != '\r' || crlf[1] != '\n' {
			return c.bad(fmt.Errorf("%w: a chunk's data does not end with CRLF", ErrProtocol))
		}
		_, _ = c.br.Discard(2)
		c.pending = append(c.pending[:0], "\r\n"...)
		c.body = bodyChunkSize
		return nil
	case bodyTrailers:
		c.pending = c.pending[:0]
		for total := 0; ; {
			line, err := c.readLine()
			if err != nil {
				return c.bad(err)
			}
			if total += len(line); total > c.opts.MaxHeaderBytes {
				return refused(431, "Request Header Fields Too Large", fmt.Errorf("%w: trailers over %d bytes", ErrProtocol, c.opts.MaxHeaderBytes))
			}
			c.pending = append(c.pending, line...)
			if len(line) == 2 {
				c.body = bodyNone
				return nil
			}
			if _, _, err := field(line); err != nil {
				return c.bad(err)
			}
		}
	}
	return c.readHead()
}

// wait holds Read until the answers allow another request: the upgrade's
// (which may have switched the connection to raw bytes), or room in the
// queue. It reports false once no more requests will be read.
func (c *Conn) wait() bool {
	c.smu.Lock()
	defer c.smu.Unlock()
	for !c.ended && (c.upgrading || c.stopped || len(c.queue) >= maxQueued) {
		c.cond.Wait()
	}
	if c.switched {
		c.raw = true
	}
	return !c.ended
}

// readHead reads and checks a request's head and queues it.
func (c *Conn) readHead() error {
	if !c.wait() {
		return io.EOF
	}
	if c.raw {
		return nil
	}
	if _, err := c.br.Peek(1); err != nil {
		return err // EOF between requests is a clean end
	}
	// The head's bytes as they go upstream, in a buffer of the
	// connection's: Read has passed on all of the last head's already.
	out := c.hbuf[:0]
	total := 0
	line, err := c.readLine()
	if err != nil {
		return c.bad(err)
	}
	total += len(line)
	method, target, minor, err := requestLine(line)
	if err != nil {
		return c.bad(err)
	}
	if method == "CONNECT" {
		return refused(405, "Method Not Allowed", fmt.Errorf("%w: CONNECT", ErrProtocol))
	}
	out = append(out, line...)
	var (
		hosts         int
		host          []byte
		length        = int64(-1)
		chunked, te   bool
		closing       = minor == 0
		conn, upgrade bool
	)
	for {
		line, err := c.readLine()
		if err != nil {
			return c.bad(err)
		}
		if total += len(line); total > c.opts.MaxHeaderBytes {
			return refused(431, "Request Header Fields Too Large", fmt.Errorf("%w: request head over %d bytes", ErrProtocol, c.opts.MaxHeaderBytes))
		}
		if len(line) == 2 {
			break
		}
		name, value, err := field(line)
		if err != nil {
			return c.bad(err)
		}
		keep := true
		switch {
		case equalFold(name, "host"):
			hosts++
			host = value
		case equalFold(name, "content-length"):
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil || n < 0 || !digits(value) || (length >= 0 && n != length) {
				return c.bad(fmt.Errorf("%w: bad Content-Length %q", ErrProtocol, value))
			}
			length = n
		case equalFold(name, "transfer-encoding"):
			if te || !equalFold(value, "chunked") {
				return refused(501, "Not Implemented", fmt.Errorf("%w: Transfer-Encoding %q (only one, chunked, is served)", ErrProtocol, value))
			}
			te, chunked = true, true
		case equalFold(name, "connection"):
			for _, tok := range bytes.Split(value, []byte(",")) {
				switch t := bytes.TrimSpace(tok); {
				case equalFold(t, "close"):
					closing = true
				case equalFold(t, "keep-alive") && minor == 0:
					closing = false
				case equalFold(t, "upgrade"):
					conn = true
				}
			}
		case equalFold(name, "upgrade"):
			upgrade = true
		case equalFold(name, "x-forwarded-for"), equalFold(name, "x-forwarded-host"), equalFold(name, "x-forwarded-proto"),
			equalFold(name, "forwarded"), len(name) > len(internalPrefix) && equalFold(name[:len(internalPrefix)], internalPrefix):
			keep = false // the relay's to set, as on the request-by-request path
		case equalFold(name, "proxy-authorization"), equalFold(name, "proxy-connection"):
			keep = false // meant for a proxy on the client's side, not the API server
		}
		if keep {
			out = append(out, line...)
		}
	}
	switch {
	case chunked && length >= 0:
		return c.bad(fmt.Errorf("%w: both Content-Length and Transfer-Encoding", ErrProtocol))
	case chunked && minor == 0:
		return c.bad(fmt.Errorf("%w: Transfer-Encoding in an HTTP/1.0 request", ErrProtocol))
	case hosts > 1 || (hosts == 0 && minor == 1):
		return c.bad(fmt.Errorf("%w: %d Host fields (HTTP/1.1 needs one)", ErrProtocol, hosts))
	}
	if h := hostname.OfAuthority(string(host)); hosts == 1 && !c.opts.Allow(h) {
		return refused(421, "Misdirected Request", fmt.Errorf("%w: for %s", ErrMisdirected, h))
	}
	out = append(out, "X-Forwarded-For: "...)
	out = append(out, c.opts.ClientIP...)
	if hosts == 1 {
		out = append(out, "\r\nX-Forwarded-Host: "...)
		out = append(out, host...)
	}
	out = append(out, "\r\nX-Forwarded-Proto: https\r\n\r\n"...)
	c.pending, c.hbuf = out, out
	if chunked {
		c.body = bodyChunkSize
	} else {
		c.passLeft = max(length, 0)
	}
	c.smu.Lock()
	c.queue = append(c.queue, request{path: target, head: method == "HEAD", upgrade: conn && upgrade})
	c.upgrading = conn && upgrade
	c.stopped = closing
	c.smu.Unlock()
	c.cond.Broadcast()
	return nil
}

const internalPrefix = "spectro-proxy-"

// readLine returns the next line, CRLF included, which must be its only
// CR or LF.
func (c *Conn) readLine() ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	switch {
	case errors.Is(err, bufio.ErrBufferFull):
		return nil, fmt.Errorf("%w: a line over %d bytes", ErrProtocol, maxLine)
	case err != nil:
		return nil, unexpected(err)
	case len(line) < 2 || line[len(line)-2] != '\r' || bytes.IndexByte(line[:len(line)-2], '\r') >= 0:
		return nil, fmt.Errorf("%w: a line not ended by CRLF", ErrProtocol)
	}
	return line, nil
}

// requestLine checks "method SP origin-form SP HTTP/1.x CRLF".
func requestLine(line []byte) (method, target string, minor int, err error) {
	s := string(line[:len(line)-2])
	m, rest, ok1 := cut(s, ' ')
	t, v, ok2 := cut(rest, ' ')
	switch {
	case !ok1 || !ok2 || !isToken(m):
		return "", "", 0, fmt.Errorf("%w: malformed request line %q", ErrProtocol, truncate(s))
	case v != "HTTP/1.1" && v != "HTTP/1.0":
		return "", "", 0, fmt.Errorf("%w: version %q", ErrProtocol, truncate(v))
	case m == "CONNECT":
		return m, t, 1, nil
	case !(len(t) > 0 && t[0] == '/') && !(t == "*" && m == "OPTIONS"):
		// An absolute-form target names a host of its own, which the
		// upstream would take over the Host field.
		return "", "", 0, fmt.Errorf("%w: request target %q is not a path", ErrProtocol, truncate(t))
	}
	inPath := true
	for i := 0; i < len(t); i++ {
		switch b := t[i]; {
		case b <= ' ' || b == 0x7f:
			return "", "", 0, fmt.Errorf("%w: request target with a control character", ErrProtocol)
		case b == '?':
			inPath = false
		case b == '%' && inPath && (i+2 >= len(t) || !isHex(t[i+1]) || !isHex(t[i+2])):
			// Go's parser (the API server's) refuses it too.
			return "", "", 0, fmt.Errorf("%w: request target %q with a bad %%-escape", ErrProtocol, truncate(t))
		}
	}
	return m, t, int(v[7] - '0'), nil
}

// field splits a header field line. Whitespace before the colon and
// folded lines are refused, as RFC 9112 5.1 and 5.2 say a server must.
func field(line []byte) (name, value []byte, err error) {
	s := line[:len(line)-2]
	i := bytes.IndexByte(s, ':')
	if i <= 0 || !isToken(s[:i]) {
		return nil, nil, fmt.Errorf("%w: malformed header field %q", ErrProtocol, truncate(string(s)))
	}
	v := bytes.Trim(s[i+1:], " \t")
	for _, b := range v {
		if (b < ' ' && b != '\t') || b == 0x7f {
			return nil, nil, fmt.Errorf("%w: header field %s with a control character", ErrProtocol, s[:i])
		}
	}
	return s[:i], v, nil
}

// chunkSize parses a chunk's size line (extensions ignored).
func chunkSize(line []byte) (int64, error) {
	s := line[:len(line)-2]
	if i := bytes.IndexByte(s, ';'); i >= 0 {
		for _, b := range s[i:] {
			if b < ' ' && b != '\t' || b == 0x7f {
				return 0, fmt.Errorf("%w: chunk extension with a control character", ErrProtocol)
			}
		}
		s = s[:i]
	}
	if len(s) == 0 || len(s) > 15 {
		return 0, fmt.Errorf("%w: bad chunk size %q", ErrProtocol, truncate(string(s)))
	}
	n, err := strconv.ParseInt(string(s), 16, 64)
	if err != nil || s[0] == '+' || s[0] == '-' {
		return 0, fmt.Errorf("%w: bad chunk size %q", ErrProtocol, truncate(string(s)))
	}
	return n, nil
}

func cut(s string, sep byte) (string, string, bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == sep {
			return s[:i], s[i+1:], true
		}
	}
	return s, "", false
}

func isHex(b byte) bool {
	return '0' <= b && b <= '9' || 'a' <= b && b <= 'f' || 'A' <= b && b <= 'F'
}

func digits[T string | []byte](s T) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return len(s) > 0
}

// isToken reports whether s is an RFC 9110 token.
func isToken[T string | []byte](s T) bool {
	if len(s) == 0 {
		return false
	}
	for i := 0; i < len(s); i++ {
		b := s[i]
		if b <= ' ' || b >= 0x7f || bytes.IndexByte([]byte(`"(),/:;<=>?@[\]{}`), b) >= 0 {
			return false
		}
	}
	return true
}

func equalFold[T string | []byte](s T, t string) bool {
	if len(s) != len(t) {
		return false
	}
	for i := 0; i < len(s); i++ {
		a, b := s[i], t[i]
		if 'A' <= a && a <= 'Z' {
			a += 'a' - 'A'
		}
		if 'A' <= b && b <= 'Z' {
			b += 'a' - 'A'
		}
		if a != b {
			return false
		}
	}
	return true
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// refusal is a request the splice answers itself, and why.
type refusal struct {
	code int
	text string
	err  error
}

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

func refused(code int, text string, err error) error {
	return &refusal{code: code, text: text, err: err}
}

// bad refuses with 400 a request the splice cannot pass on.
func (c *Conn) bad(err error) error {
	if !errors.Is(err, ErrProtocol) {
		return err // the client went away mid-request
	}
	return refused(400, "Bad Request", err)
}

// refuse answers the client itself and closes the connection, once the
// answers to the requests before this one are through (HTTP/1.1 answers
// in order). A request whose body broke its framing was passed on
// already: its own answer is not waited for (it would wait for the rest
// of the body), and the refusal goes out only if that answer has not
// begun.
func (c *Conn) refuse(r *refusal) error {
	before := 0
	if c.body != bodyNone || c.passLeft > 0 {
		before = 1 // the request is in the queue
	}
	c.smu.Lock()
	c.stopped = true
	for !c.ended && len(c.queue) > before {
		c.cond.Wait()
	}
	ended := c.ended
	c.smu.Unlock()
	if c.opts.Refused != nil {
		c.opts.Refused(r.err)
	}
	c.wmu.Lock()
	if !ended && c.resp == respHead { // nothing of an answer went out
		msg := "spectro-proxy: " + r.err.Error() + "\n"
		_, _ = fmt.Fprintf(c.Conn, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", r.code, r.text, len(msg), msg)
	}
	c.wmu.Unlock()
	c.Close()
	return r.err
}

// end marks the connection as ending and wakes whoever waits on it.
func (c *Conn) end() {
	c.smu.Lock()
	c.ended = true
	c.smu.Unlock()
	c.cond.Broadcast()
}

// Close closes the client's connection.
func (c *Conn) Close() error {
	c.end()
	return c.Conn.Close()
}

// CloseWrite half-closes the client's connection when it can: the
// upstream's side ended, so no request is read after it.
func (c *Conn) CloseWrite() error {
	c.end()
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// GoAway tells the client to send no more requests on this connection:
// the next final answer carries Connection: close, and the connection is
// closed once that answer is through. Calls after the first do nothing;
// only the first returns true.
func (c *Conn) GoAway() bool { return !c.goingAway.Swap(true) }

// Shut closes the connection at the next point where no answer is cut: at
// once between answers, at the next chunk boundary of a streamed one
// (which then ends with its last chunk, a clean end its client re-watches
// from). A connection switched to raw bytes is left alone: an exec or
// port-forward session has no such point. It does not wait.
func (c *Conn) Shut() {
	c.shutting.Store(true)
	go func() {
		c.wmu.Lock()
		defer c.wmu.Unlock()
		switch {
		case c.resp == respRaw:
		case c.resp == respHead: // a head under way is held, not sent
			c.Close()
		case c.atBoundary():
			_, _ = c.Conn.Write(lastChunk)
			c.Close()
		}
	}()
}

var lastChunk = []byte("0\r\n\r\n")

// atBoundary says whether a streamed answer can end here: between chunks,
// and for line-framed events after a line.
func (c *Conn) atBoundary() bool {
	return c.resp == respChunkSize && len(c.line) == 0 && (!c.jsonish || c.lastByte == '\n')
}

// Open counts the requests open on the connection: those whose path
// staysOpen says never end by themselves (a watch, logs -f), and the
// rest. A connection switched to raw bytes counts as neither.
func (c *Conn) Open(staysOpen func(path string) bool) (plain, streamed int) {
	c.smu.Lock()
	defer c.smu.Unlock()
	if c.switched {
		return 0, 0
	}
	for _, r := range c.queue {
		if staysOpen(r.path) {
			streamed++
		} else {
			plain++
		}
	}
	return plain, streamed
}

// Write passes the upstream's bytes to the client, following its answers.
// An answer's head is held until it is whole, and then passed on with
// every Set-Cookie's Domain taken out (see setcookie), and with
// Connection: close after GoAway.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	total := len(p)
	// A head goes out in one write with what follows it in p (its body,
	// the next answers), as the upstream wrote them together: one TLS
	// record and one system call, not one per head.
	var buf *[]byte
	defer func() {
		if buf != nil {
			*buf = (*buf)[:0]
			writeBufs.Put(buf)
		}
	}()
	for len(p) > 0 {
		var (
			out  []byte
			act  int
			err  error
			head = c.resp == respHead
		)
		if head {
			var k int
			k, out, act, err = c.takeHead(p)
			p = p[k:]
		} else {
			var k int
			k, act, err = c.scan(p)
			out, p = p[:k], p[k:]
		}
		if (head && out != nil) || (buf != nil && len(*buf) > 0) {
			if buf == nil {
				buf = writeBufs.Get().(*[]byte)
			}
			*buf = append(*buf, out...)
			if act == actNone && err == nil && len(p) > 0 {
				continue
			}
			out = *buf
		}
		if len(out) > 0 {
			if _, err := c.Conn.Write(out); err != nil {
				return total - len(p), err
			}
		}
		if buf != nil {
			*buf = (*buf)[:0]
		}
		if err != nil {
			return total - len(p), c.upstreamFailed(err)
		}
		switch act {
		case actCut:
			_, _ = c.Conn.Write(lastChunk)
			c.Close()
			return total - len(p), errShut
		case actClose:
			c.Close()
			return total - len(p), errShut
		}
	}
	return total, nil
}

var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 32<<10); return &b }}

// upstreamFailed ends a connection whose upstream's answers cannot be
// followed; when nothing of the answer went out yet, the client is told
// why with a 502.
func (c *Conn) upstreamFailed(err error) error {
	if c.opts.Refused != nil {
		c.opts.Refused(err)
	}
	if c.resp == respHead {
		msg := "spectro-proxy: " + err.Error() + "\n"
		_, _ = fmt.Fprintf(c.Conn, "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(msg), msg)
	}
	c.Close()
	return err
}

// What Write does after the bytes scan or takeHead returned.
const (
	actNone = iota
	actCut
	actClose
)

// takeHead holds p's bytes of an answer's head; once it is whole it
// returns it, as it goes to the client, and what to do next.
func (c *Conn) takeHead(p []byte) (int, []byte, int, error) {
	i := 0
	for i < len(p) {
		j := bytes.IndexByte(p[i:], '\n')
		end := len(p)
		if j >= 0 {
			end = i + j + 1
		}
		if len(c.head)+end-i > c.opts.MaxResponseHeaderBytes {
			return end, nil, actNone, fmt.Errorf("%w: the cluster's answer has a header section too large (limit %d bytes)", ErrUpstreamHeaders, c.opts.MaxResponseHeaderBytes)
		}
		c.head = append(c.head, p[i:end]...)
		i = end
		if j < 0 {
			break
		}
		done, err := c.headLine(c.head[c.lineStart:])
		c.lineStart = len(c.head)
		if err != nil {
			return i, nil, actNone, err
		}
		if done {
			out, act, err := c.headDone()
			return i, out, act, err
		}
	}
	return i, nil, actNone, nil
}

// headLine takes a whole line of an answer's head; true at its end.
func (c *Conn) headLine(line []byte) (bool, error) {
	if c.status == 0 {
		if len(line) < 14 || string(line[:7]) != "HTTP/1." || line[8] != ' ' || !digits(line[9:12]) || (line[12] != ' ' && line[12] != '\r') {
			return false, fmt.Errorf("%w: malformed status line %q", ErrUpstream, truncate(string(line)))
		}
		c.status = int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
		c.length, c.chunked, c.jsonish, c.rewrite = -1, false, false, false
		return false, nil
	}
	if len(line) == 2 && line[0] == '\r' {
		return true, nil
	}
	name, value, err := field(line)
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrUpstream, err)
	}
	switch {
	case equalFold(name, "content-length"):
		c.length, err = strconv.ParseInt(string(value), 10, 64)
		if err != nil || c.length < 0 {
			return false, fmt.Errorf("%w: bad Content-Length %q", ErrUpstream, value)
		}
	case equalFold(name, "transfer-encoding"):
		c.chunked = len(value) >= 7 && equalFold(value[len(value)-7:], "chunked")
	case equalFold(name, "content-type"):
		c.jsonish = bytes.Contains(value, []byte("json")) || (len(value) >= 5 && equalFold(value[:5], "text/"))
	case equalFold(name, "set-cookie"):
		if setcookie.HasDomain(value) {
			c.rewrite = true
		}
	}
	return false, nil
}

// headDone ends an answer's head: returns it as it goes to the client,
// and says how its body is framed.
func (c *Conn) headDone() ([]byte, int, error) {
	status := c.status
	head := c.head
	c.status, c.head, c.lineStart = 0, c.head[:0], 0
	c.smu.Lock()
	if len(c.queue) == 0 {
		c.smu.Unlock()
		return nil, actNone, fmt.Errorf("%w: an answer with no request", ErrUpstream)
	}
	req := c.queue[0]
	c.smu.Unlock()
	if status >= 200 && c.goingAway.Load() {
		c.closeAfter = true
	}
	out := head
	if c.rewrite || c.closeAfter && status >= 200 {
		out = c.rewriteHead(head)
	}
	switch {
	case status == 101:
		if !req.upgrade {
			return nil, actNone, fmt.Errorf("%w: 101 to a request that asked for no upgrade", ErrUpstream)
		}
		c.smu.Lock()
		c.switched, c.upgrading = true, false
		c.queue = c.queue[1:]
		c.smu.Unlock()
		c.cond.Broadcast()
		c.resp = respRaw
		return out, actNone, nil
	case status < 200:
		return out, actNone, nil // informational: the final answer follows
	}
	if req.upgrade {
		c.smu.Lock()
		c.upgrading = false
		c.smu.Unlock()
		c.cond.Broadcast()
	}
	switch {
	case req.head || status == 204 || status == 304:
		return out, c.answered(), nil
	case c.chunked:
		c.resp = respChunkSize
	case c.length >= 0:
		c.resp, c.respLeft = respBody, c.length
		if c.length == 0 {
			return out, c.answered(), nil
		}
	default:
		c.resp = respToEOF
	}
	return out, actNone, nil
}

// rewriteHead copies an answer's head with its cookies' Domain taken
// out, and Connection: close after the status line once going away.
func (c *Conn) rewriteHead(head []byte) []byte {
	out := make([]byte, 0, len(head)+len(connectionClose))
	first := true
	for len(head) > 0 {
		j := bytes.IndexByte(head, '\n') + 1
		line := head[:j]
		head = head[j:]
		if name, value, err := field(line); err == nil && equalFold(name, "set-cookie") && setcookie.HasDomain(value) {
			out = append(out, name...)
			out = append(out, ": "...)
			out = append(out, setcookie.StripDomain(value)...)
			out = append(out, "\r\n"...)
		} else {
			out = append(out, line...)
		}
		if first && c.closeAfter {
			out = append(out, connectionClose...)
		}
		first = false
	}
	return out
}

var connectionClose = []byte("Connection: close\r\n")

// scan follows an answer's body in p and returns how many bytes of p to
// write before the action it names.
func (c *Conn) scan(p []byte) (int, int, error) {
	i := 0
	for i < len(p) {
		switch c.resp {
		case respRaw, respToEOF:
			return len(p), actNone, nil
		case respHead:
			return i, actNone, nil
		case respBody, respChunkData:
			k := int(min(int64(len(p)-i), c.respLeft))
			c.respLeft -= int64(k)
			i += k
			if k > 0 {
				c.lastByte = p[i-1]
			}
			if c.respLeft == 0 {
				if c.resp == respBody {
					if act := c.answered(); act != actNone {
						return i, act, nil
					}
				} else {
					c.resp = respChunkEnd
				}
			}
		default:
			if c.resp == respChunkSize && len(c.line) == 0 && c.shutting.Load() && c.atBoundary() {
				return i, actCut, nil
			}
			j := bytes.IndexByte(p[i:], '\n')
			end := len(p)
			if j >= 0 {
				end = i + j + 1
			}
			if len(c.line)+end-i > maxLine {
				return i, actNone, fmt.Errorf("%w: a line over %d bytes", ErrUpstream, maxLine)
			}
			c.line = append(c.line, p[i:end]...)
			i = end
			if j < 0 {
				continue
			}
			act, err := c.bodyLine()
			c.line = c.line[:0]
			if err != nil || act != actNone {
				return i, act, err
			}
		}
	}
	return i, actNone, nil
}

// bodyLine takes a whole line of a chunked body's framing.
func (c *Conn) bodyLine() (int, error) {
	line := c.line
	switch c.resp {
	case respChunkSize:
		n, err := chunkSize(line)
		if err != nil {
			return actNone, fmt.Errorf("%w: %w", ErrUpstream, err)
		}
		if n == 0 {
			c.resp = respTrailers
		} else {
			c.resp, c.respLeft = respChunkData, n
		}
	case respChunkEnd:
		if !bytes.Equal(line, []byte("\r\n")) {
			return actNone, fmt.Errorf("%w: a chunk's data does not end with CRLF", ErrUpstream)
		}
		c.resp = respChunkSize
	case respTrailers:
		if bytes.Equal(line, []byte("\r\n")) {
			return c.answered(), nil
		}
	}
	return actNone, nil
}

// answered ends the answer to the oldest request.
func (c *Conn) answered() int {
	c.resp = respHead
	c.smu.Lock()
	c.queue = c.queue[1:]
	c.smu.Unlock()
	c.cond.Broadcast()
	if c.closeAfter || c.shutting.Load() {
		return actClose
	}
	return actNone
}
