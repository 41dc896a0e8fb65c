package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"slices"
	"sync"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// connPool is an HTTP/1.1 client over kept-alive connections to one
// target (for the relay, HTTP connection streams of one route): it writes
// each request and reads its answer in the caller's goroutine.
//
// net/http's client gives every connection a write loop and a read loop,
// which cost four goroutine hand-offs per request and their bookkeeping:
// a tenth of the relay's CPU per small request (docs/performance.md,
// seventh pass). What its read loop also does is see at once that an idle
// connection was closed by its target. Here that shows when the
// connection is next used, as an answer that ends before its first byte,
// and the request is sent again on a new connection. So only requests
// that may be sent twice may come this way (kubereq.Replayable).
type connPool struct {
	dial    func() io.ReadWriteCloser
	maxIdle int
	idleFor time.Duration // an idle connection is closed after that

	mu     sync.Mutex
	idle   []*httpConn // the most recently used last: the others age out
	closed bool
}

func newConnPool(dial func() io.ReadWriteCloser, maxIdle int, idleFor time.Duration) *connPool {
	return &connPool{dial: dial, maxIdle: maxIdle, idleFor: idleFor}
}

// httpConn is one kept-alive connection and the reader of its answers.
type httpConn struct {
	rw    io.ReadWriteCloser
	lim   tunnel.HeaderLimitReader
	br    *bufio.Reader
	timer *time.Timer // closes it once idle for idleFor; set under the pool's lock
	// unwatch stops the current request's context from closing rw; it
	// reports whether it had not closed it yet.
	unwatch func() bool
}

// errNothingReceived: the connection ended before the answer's first
// byte.
var errNothingReceived = errors.New("connection ended before the answer")

// roundTrip sends req on an idle connection or a new one, and returns the
// answer, whose body gives the connection back when read to its end and
// closed. done is called once the request is over: with the error, or
// when the body is closed.
func (p *connPool) roundTrip(req *http.Request, done func()) (*http.Response, error) {
	for {
		c, reused := p.get()
		resp, err := c.roundTrip(req)
		if err == nil {
			resp.Body = &connBody{body: resp.Body, c: c, p: p, done: done,
				keep: !resp.Close && !req.Close, eof: resp.Body == http.NoBody}
			return resp, nil
		}
		c.rw.Close()
		if reused && errors.Is(err, errNothingReceived) && req.Context().Err() == nil {
			continue // its target had closed it while it was idle
		}
		done()
		return nil, err
	}
}

// get returns an idle connection (reused) or a new one.
func (p *connPool) get() (c *httpConn, reused bool) {
	p.mu.Lock()
	if n := len(p.idle); n > 0 {
		c = p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		c.timer.Stop() // if it fires anyway, expire finds c gone from idle
		p.mu.Unlock()
		return c, true
	}
	p.mu.Unlock()
	rw := p.dial()
	c = &httpConn{rw: rw, lim: tunnel.HeaderLimitReader{R: rw}}
	c.br = bufio.NewReader(&c.lim)
	return c, false
}

// put keeps c for the next request, unless the pool is closed or full.
func (p *connPool) put(c *httpConn) {
	p.mu.Lock()
	if p.closed || len(p.idle) >= p.maxIdle {
		p.mu.Unlock()
		c.rw.Close()
		return
	}
	p.idle = append(p.idle, c)
	if c.timer == nil {
		c.timer = time.AfterFunc(p.idleFor, func() { p.expire(c) })
	} else {
		c.timer.Reset(p.idleFor)
	}
	p.mu.Unlock()
}

// expire closes c if it is still idle.
func (p *connPool) expire(c *httpConn) {
	p.mu.Lock()
	i := slices.Index(p.idle, c)
	if i >= 0 {
		p.idle = slices.Delete(p.idle, i, i+1)
	}
	p.mu.Unlock()
	if i >= 0 {
		c.rw.Close()
	}
}

// idleConns is how many connections wait for a request.
func (p *connPool) idleConns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// close closes the idle connections, and the busy ones as their requests
// end.
func (p *connPool) close() {
	p.mu.Lock()
	idle := p.idle
	p.idle, p.closed = nil, true
	for _, c := range idle {
		c.timer.Stop()
	}
	p.mu.Unlock()
	for _, c := range idle {
		c.rw.Close()
	}
}

func (c *httpConn) roundTrip(req *http.Request) (*http.Response, error) {
	// The client going away closes the connection, which ends a read or
	// write waiting on it; unwatch ends that once the request is over.
	c.unwatch = context.AfterFunc(req.Context(), func() { c.rw.Close() })
	if err := writeRequest(c.rw, req); err != nil {
		c.unwatch()
		if errors.Is(err, io.ErrClosedPipe) {
			err = fmt.Errorf("%w: %w", errNothingReceived, err)
		}
		return nil, fmt.Errorf("writing request to tunnel: %w", err)
	}
	resp, err := readBoundedResponse(c.br, &c.lim, tunnel.MaxResponseHeaderBytes, req)
	if err != nil {
		c.unwatch()
		// The bound unspent: not a byte of the answer was read.
		if c.lim.N == tunnel.MaxResponseHeaderBytes && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
			err = fmt.Errorf("%w: %w", errNothingReceived, err)
		}
		return nil, fmt.Errorf("reading response from tunnel: %w", err)
	}
	return resp, nil
}

// readBoundedResponse reads the answer to req from br, whose source lim
// fails past limit bytes until the header section is in: the answer is a
// target's bytes (a tenant's dashboard, say), and net/http's reader would
// hold a header line of any length.
func readBoundedResponse(br *bufio.Reader, lim *tunnel.HeaderLimitReader, limit int64, req *http.Request) (*http.Response, error) {
	lim.N = limit
	resp, err := readResponse(br, req)
	if err != nil {
		if tunnel.IsHeaderTooLarge(err) {
			return nil, fmt.Errorf("%w (limit %d bytes)", tunnel.ErrHeaderTooLarge, limit)
		}
		return nil, err
	}
	lim.Lift()
	return resp, nil
}

// requestWriters buffer requests on their way out: Request.Write makes a
// 4 KiB buffer per call otherwise, and a connection keeps none between
// requests.
var requestWriters = sync.Pool{New: func() any { return bufio.NewWriter(nil) }}

// writeRequest writes req to w in one write.
func writeRequest(w io.Writer, req *http.Request) error {
	bw := requestWriters.Get().(*bufio.Writer)
	bw.Reset(w)
	err := req.Write(bw)
	if err == nil {
		err = bw.Flush()
	}
	bw.Reset(nil)
	requestWriters.Put(bw)
	return err
}

// max1xx bounds the informational answers before a final one, as
// net/http's client does.
const max1xx = 5

// readResponse reads the answer to req from br, handing informational
// (1xx) answers to the request's trace as net/http's client does:
// ReverseProxy passes them on to the user. An upgrade's first answer is
// its answer (101 or a refusal).
func readResponse(br *bufio.Reader, req *http.Request) (*http.Response, error) {
	for range max1xx + 1 {
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode < 100 || resp.StatusCode > 199 || isUpgrade(req) {
			return resp, nil
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			return nil, errors.New("target switched protocols (101) on a request that asked for no upgrade")
		}
		if trace := httptrace.ContextClientTrace(req.Context()); trace != nil && trace.Got1xxResponse != nil {
			if err := trace.Got1xxResponse(resp.StatusCode, textproto.MIMEHeader(resp.Header)); err != nil {
				return nil, err
			}
		}
	}
	return nil, fmt.Errorf("more than %d informational (1xx) answers", max1xx)
}

// connBody is an answer's body on a pooled connection: the connection
// goes back to the pool when the body was read to its end and neither
// side asked to close, and is closed otherwise.
type connBody struct {
	body   io.ReadCloser
	c      *httpConn
	p      *connPool
	done   func()
	keep   bool // neither request nor answer said Connection: close
	eof    bool
	closed bool
}

func (b *connBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *connBody) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	defer b.done()
	// unwatch is false when the client's going away closed the
	// connection. Bytes buffered past the answer mean the target is out
	// of step with its requests.
	if b.c.unwatch() && b.eof && b.keep && b.c.br.Buffered() == 0 {
		b.p.put(b.c)
		return nil
	}
	// Closing the connection, not the body, which would read the rest.
	b.c.rw.Close()
	return nil
}
