package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// pipeTarget is the far end of a connPool: every dial is a net.Pipe whose
// other end reads requests and writes what answer says for the n-th
// request on that connection (counted from 0); keep false closes the
// connection after it.
type pipeTarget struct {
	t      *testing.T
	answer func(conn, n int, req *http.Request, w io.Writer) (keep bool)
	dials  atomic.Int32
	closed chan int // the connection numbers whose pool side was closed
	wg     sync.WaitGroup
}

func newPipeTarget(t *testing.T, answer func(conn, n int, req *http.Request, w io.Writer) bool) *pipeTarget {
	pt := &pipeTarget{t: t, answer: answer, closed: make(chan int, 100)}
	t.Cleanup(pt.wg.Wait)
	return pt
}

func (pt *pipeTarget) dial() io.ReadWriteCloser {
	conn := int(pt.dials.Add(1)) - 1
	ours, theirs := net.Pipe()
	pt.wg.Add(1)
	go func() {
		defer pt.wg.Done()
		defer theirs.Close()
		br := bufio.NewReader(theirs)
		for n := 0; ; n++ {
			req, err := http.ReadRequest(br)
			if err != nil {
				pt.closed <- conn // the pool's side went away
				return
			}
			if !pt.answer(conn, n, req, theirs) {
				return
			}
		}
	}()
	return ours
}

// ok answers 200 with body "conn/n".
func ok(conn, n int, _ *http.Request, w io.Writer) bool {
	body := fmt.Sprintf("%d/%d", conn, n)
	fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	return true
}

func getVia(t *testing.T, p *connPool, ctx context.Context) (*http.Response, *atomic.Int32, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://target/api", nil)
	require.NoError(t, err)
	done := &atomic.Int32{}
	resp, err := p.roundTrip(req, func() { done.Add(1) })
	return resp, done, err
}

// readAll reads and closes resp's body, and checks that the request was
// over (done called once) after, not before.
func readAll(t *testing.T, resp *http.Response, done *atomic.Int32) string {
	t.Helper()
	assert.Zero(t, done.Load(), "the request ends when its body is closed")
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.NoError(t, resp.Body.Close())
	require.NoError(t, resp.Body.Close(), "a second Close is harmless")
	assert.Equal(t, int32(1), done.Load())
	return string(b)
}

// Connections are reused, and one its target closed while it was idle is
// found out when the next request finds no answer on it: that request
// goes again on a new connection, and the user never sees the stale one.
func TestConnPoolReuse(t *testing.T) {
	tests := []struct {
		name      string
		keep      bool // the target keeps its connections open
		body      func(i int) string
		wantDials int32
	}{
		{name: "kept open", keep: true, body: func(i int) string { return fmt.Sprintf("0/%d", i) }, wantDials: 1},
		// The target closes without saying Connection: close.
		{name: "closed while idle", keep: false, body: func(i int) string { return fmt.Sprintf("%d/0", i) }, wantDials: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pt := newPipeTarget(t, func(conn, n int, req *http.Request, w io.Writer) bool {
				ok(conn, n, req, w)
				return tc.keep
			})
			p := newConnPool(pt.dial, 4, time.Minute)
			defer p.close()
			for i := range 3 {
				resp, done, err := getVia(t, p, t.Context())
				require.NoError(t, err)
				assert.Equal(t, tc.body(i), readAll(t, resp, done))
			}
			assert.Equal(t, tc.wantDials, pt.dials.Load())
			assert.Equal(t, 1, p.idleConns())
		})
	}
}

// A new connection that ends before its answer is an error, not a retry:
// nothing says the next would do better.
func TestConnPoolNewConnectionWithoutAnswer(t *testing.T) {
	pt := newPipeTarget(t, func(int, int, *http.Request, io.Writer) bool { return false })
	p := newConnPool(pt.dial, 4, time.Minute)
	defer p.close()
	_, done, err := getVia(t, p, t.Context())
	require.ErrorIs(t, err, errNothingReceived)
	assert.Equal(t, int32(1), done.Load())
	assert.Equal(t, int32(1), pt.dials.Load())
}

// A connection goes back to the pool only when its answer was read to the
// end and neither side asked to close it; otherwise the next request
// dials.
func TestConnPoolDoesNotReuse(t *testing.T) {
	tests := []struct {
		name   string
		answer string
		read   int // bytes of the body read before Close; -1 for all
		cancel bool
		close  bool // the request says Connection: close
	}{
		{name: "answer says close", answer: "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", read: -1},
		{name: "request says close", answer: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", read: -1, close: true},
		{name: "body not read to its end", answer: "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", read: 4},
		{name: "body without a length", answer: "HTTP/1.0 200 OK\r\n\r\nok", read: 0},
		{name: "bytes past the answer", answer: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n", read: -1},
		{name: "client went away during the body", answer: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", read: -1, cancel: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pt := newPipeTarget(t, func(conn, n int, req *http.Request, w io.Writer) bool {
				if conn == 0 {
					io.WriteString(w, tc.answer)
					return !strings.Contains(tc.answer, "HTTP/1.0")
				}
				return ok(conn, n, req, w)
			})
			p := newConnPool(pt.dial, 4, time.Minute)
			defer p.close()
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://target/api", nil)
			require.NoError(t, err)
			req.Close = tc.close
			var done atomic.Int32
			resp, err := p.roundTrip(req, func() { done.Add(1) })
			require.NoError(t, err)
			if tc.read < 0 {
				_, err = io.ReadAll(resp.Body)
				require.NoError(t, err)
			} else {
				_, err = io.ReadFull(resp.Body, make([]byte, tc.read))
				require.NoError(t, err)
			}
			if tc.cancel {
				cancel()
				<-pt.closed // the context's end closed the connection
			}
			require.NoError(t, resp.Body.Close())
			assert.Equal(t, int32(1), done.Load())
			assert.Zero(t, p.idleConns())

			resp, done2, err := getVia(t, p, t.Context())
			require.NoError(t, err)
			assert.Equal(t, "1/0", readAll(t, resp, done2), "the next request dials")
		})
	}
}

// An idle connection is closed after idleFor, and all of them when the
// pool closes; a connection given back after that is closed too.
func TestConnPoolClosesIdleConnections(t *testing.T) {
	pt := newPipeTarget(t, ok)
	p := newConnPool(pt.dial, 4, 20*time.Millisecond)
	resp, done, err := getVia(t, p, t.Context())
	require.NoError(t, err)
	readAll(t, resp, done)
	select {
	case conn := <-pt.closed:
		assert.Equal(t, 0, conn)
	case <-time.After(5 * time.Second):
		t.Fatal("the idle connection is still open after 5 s")
	}
	assert.Zero(t, p.idleConns())

	p = newConnPool(pt.dial, 4, time.Minute)
	resp1, done1, err := getVia(t, p, t.Context())
	require.NoError(t, err)
	resp2, done2, err := getVia(t, p, t.Context())
	require.NoError(t, err)
	readAll(t, resp1, done1)
	require.Equal(t, 1, p.idleConns())
	p.close()
	assert.Equal(t, 1, <-pt.closed, "closing the pool closes its idle connection")
	readAll(t, resp2, done2)
	assert.Equal(t, 2, <-pt.closed, "a connection given back to a closed pool is closed")
	assert.Zero(t, p.idleConns())
}

// The pool keeps at most maxIdle connections.
func TestConnPoolBoundsIdleConnections(t *testing.T) {
	pt := newPipeTarget(t, ok)
	p := newConnPool(pt.dial, 2, time.Minute)
	defer p.close()
	var resps []*http.Response
	var dones []*atomic.Int32
	for range 3 {
		resp, done, err := getVia(t, p, t.Context())
		require.NoError(t, err)
		resps, dones = append(resps, resp), append(dones, done)
	}
	for i := range resps {
		readAll(t, resps[i], dones[i])
	}
	assert.Equal(t, 2, p.idleConns())
	assert.Equal(t, 2, <-pt.closed, "the third is closed")
}

// What a target answers that is not an ordinary answer.
func TestConnPoolUnusualAnswers(t *testing.T) {
	tests := []struct {
		name    string
		answer  string
		wantErr string
		errIs   error
		want1xx []int
	}{
		{name: "header section without end", answer: "HTTP/1.1 200 OK\r\nX-Huge: " + strings.Repeat("a", 2*tunnel.MaxResponseHeaderBytes),
			wantErr: "header section too large (limit 1048576 bytes)", errIs: tunnel.ErrHeaderTooLarge},
		{name: "early hints", answer: "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
			want1xx: []int{103}},
		{name: "switching protocols unasked", answer: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
			wantErr: "target switched protocols (101) on a request that asked for no upgrade"},
		{name: "endless informational answers", answer: strings.Repeat("HTTP/1.1 103 Early Hints\r\n\r\n", 10),
			wantErr: "more than 5 informational (1xx) answers"},
		{name: "not HTTP", answer: "SSH-2.0-OpenSSH\r\n\r\n", wantErr: "malformed HTTP response"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pt := newPipeTarget(t, func(_, _ int, _ *http.Request, w io.Writer) bool {
				io.WriteString(w, tc.answer) // fails once the pool closed the connection
				return false
			})
			p := newConnPool(pt.dial, 4, time.Minute)
			defer p.close()
			var got1xx []int
			ctx := httptrace.WithClientTrace(t.Context(), &httptrace.ClientTrace{
				Got1xxResponse: func(code int, _ textproto.MIMEHeader) error { got1xx = append(got1xx, code); return nil },
			})
			resp, done, err := getVia(t, p, ctx)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				if tc.errIs != nil {
					assert.ErrorIs(t, err, tc.errIs)
				}
				assert.Equal(t, int32(1), done.Load())
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "ok", readAll(t, resp, done))
			assert.Equal(t, tc.want1xx, got1xx)
		})
	}
}

// A client that goes away while the target has not answered ends the
// request at once, and the connection with it.
func TestConnPoolClientGoesAway(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	pt := newPipeTarget(t, func(int, int, *http.Request, io.Writer) bool {
		cancel()
		return true // and wait for the pool to close the connection
	})
	p := newConnPool(pt.dial, 4, time.Minute)
	defer p.close()
	_, done, err := getVia(t, p, ctx)
	require.Error(t, err)
	// The pool's close of the connection, or the target's end seeing it
	// first (which one wins is the scheduler's).
	assert.True(t, errors.Is(err, io.ErrClosedPipe) || errors.Is(err, io.ErrUnexpectedEOF), "%v", err)
	assert.Equal(t, 0, <-pt.closed)
	assert.Equal(t, int32(1), done.Load())
	assert.Equal(t, int32(1), pt.dials.Load(), "a request whose client went away is not sent again")
	assert.Zero(t, p.idleConns())
}
