package h1splice

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

const clientIP = "192.0.2.7"

// allow keeps a connection on a.example, as the relay keeps one on its
// cluster: other hosts under example are misdirected, hosts elsewhere
// (an IP kubectl dialled with tls-server-name) are not.
func allow(host string) bool { return host == "a.example" || !strings.HasSuffix(host, ".example") }

type rig struct {
	t       *testing.T
	up      *httptest.Server
	mu      sync.Mutex
	conns   []*Conn
	refused []error // what Refused was told
	errs    chan error
}

// newRig starts an upstream (a real net/http server) and returns a rig
// whose dial gives a connection spliced onto a new connection to it.
func newRig(t *testing.T, h http.Handler) *rig {
	up := httptest.NewServer(h)
	t.Cleanup(up.Close)
	return &rig{t: t, up: up, errs: make(chan error, 64)}
}

func (r *rig) dial() net.Conn {
	client, server := net.Pipe()
	up, err := net.Dial("tcp", r.up.Listener.Addr().String())
	require.NoError(r.t, err)
	sc := New(server, Options{Allow: allow, MaxHeaderBytes: 4 << 10, MaxResponseHeaderBytes: 4 << 10, ClientIP: clientIP,
		Refused: func(err error) {
			r.mu.Lock()
			r.refused = append(r.refused, err)
			r.mu.Unlock()
		}})
	r.mu.Lock()
	r.conns = append(r.conns, sc)
	r.mu.Unlock()
	go func() {
		_, _, err := tunnel.Join(sc, up)
		r.errs <- err
	}()
	r.t.Cleanup(func() { client.Close() })
	return client
}

func (r *rig) conn(i int) *Conn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.conns[i]
}

func (r *rig) client() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:     func(context.Context, string, string) (net.Conn, error) { return r.dial(), nil },
		MaxIdleConns:    1,
		IdleConnTimeout: time.Minute,
	}, Timeout: 10 * time.Second}
}

func echo(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("X-Got", fmt.Sprintf("%s %s host=%s xff=%q xfh=%q xfp=%q internal=%q len=%d",
		r.Method, r.URL.RequestURI(), r.Host, r.Header.Values("X-Forwarded-For"), r.Header.Get("X-Forwarded-Host"),
		r.Header.Get("X-Forwarded-Proto"), r.Header.Get("Spectro-Proxy-Route"), len(body)))
	switch r.URL.Path {
	case "/cookies":
		w.Header().Add("Set-Cookie", "a=1; Domain=example; Path=/")
		w.Header().Add("Set-Cookie", "b=2; path=/; domain=.a.example; Secure")
		w.Header().Add("Set-Cookie", "c=3; Path=/domains")
	case "/huge":
		w.Header().Set("X-Huge", strings.Repeat("h", 5000))
	case "/nocontent":
		w.WriteHeader(http.StatusNoContent)
		return
	case "/notmodified":
		w.WriteHeader(http.StatusNotModified)
		return
	case "/chunked":
		w.Write(body)
		w.(http.Flusher).Flush()
		w.Write([]byte("-tail"))
		return
	}
	w.Write(body)
}

func TestRequestsGoThrough(t *testing.T) {
	r := newRig(t, http.HandlerFunc(echo))
	hc := r.client()
	cases := []struct {
		method, path string
		body         io.Reader
		want         string
		wantBody     string
	}{
		{"GET", "/api?x=1", nil, `GET /api?x=1 host=a.example xff=["192.0.2.7"] xfh="a.example" xfp="https" internal="" len=0`, ""},
		{"POST", "/p", strings.NewReader("hello"), `POST /p host=a.example xff=["192.0.2.7"] xfh="a.example" xfp="https" internal="" len=5`, "hello"},
		// No length known: the client sends it chunked.
		{"PUT", "/chunked", io.MultiReader(strings.NewReader("abc"), strings.NewReader("def")), `PUT /chunked host=a.example xff=["192.0.2.7"] xfh="a.example" xfp="https" internal="" len=6`, "abcdef-tail"},
		{"HEAD", "/h", nil, `HEAD /h host=a.example xff=["192.0.2.7"] xfh="a.example" xfp="https" internal="" len=0`, ""},
		{"GET", "/nocontent", nil, `GET /nocontent host=a.example xff=["192.0.2.7"] xfh="a.example" xfp="https" internal="" len=0`, ""},
		{"GET", "/notmodified", nil, `GET /notmodified host=a.example xff=["192.0.2.7"] xfh="a.example" xfp="https" internal="" len=0`, ""},
	}
	for _, tc := range cases {
		t.Run(tc.method+tc.path, func(t *testing.T) {
			body := tc.body
			if body != nil && tc.path == "/chunked" {
				body = io.NopCloser(body) // hides the length
			}
			req, err := http.NewRequest(tc.method, "http://a.example"+tc.path, body)
			require.NoError(t, err)
			// The client's own forwarding fields and the tunnel's are not
			// passed on: the relay sets the first, only it speaks the second.
			req.Header.Set("X-Forwarded-For", "10.0.0.1")
			req.Header.Set("X-Forwarded-Host", "evil.example")
			req.Header.Set("Spectro-Proxy-Route", "b")
			resp, err := hc.Do(req)
			require.NoError(t, err)
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			assert.Equal(t, tc.want, resp.Header.Get("X-Got"))
			assert.Equal(t, tc.wantBody, string(got))
		})
	}
	// A cookie stays on the host that set it: the relay's certificate
	// covers every tenant's host.
	resp, err := hc.Get("http://a.example/cookies")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, []string{"a=1; Path=/", "b=2; path=/; Secure", "c=3; Path=/domains"}, resp.Header.Values("Set-Cookie"))
	// Keep-alive: every request went on the one connection.
	r.mu.Lock()
	assert.Len(t, r.conns, 1)
	r.mu.Unlock()
	plain, streamed := r.conn(0).Open(func(string) bool { return false })
	assert.Equal(t, [2]int{0, 0}, [2]int{plain, streamed}, "no request is open once all are answered")
}

// lastRefused is the last error Refused was told of.
func (r *rig) lastRefused() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.refused) == 0 {
		return nil
	}
	return r.refused[len(r.refused)-1]
}

// roundTrip writes raw bytes on a new spliced connection and returns all
// the client reads until the connection closes.
func roundTrip(t *testing.T, r *rig, raw string) string {
	t.Helper()
	c := r.dial()
	go func() { _, _ = io.WriteString(c, raw) }()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	return string(got)
}

// An answer whose head is over the bound never reaches the client: it
// gets a 502 that says why.
func TestUpstreamHeadTooLarge(t *testing.T) {
	r := newRig(t, http.HandlerFunc(echo))
	got := roundTrip(t, r, "GET /huge HTTP/1.1\r\nHost: a.example\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(got)), nil)
	require.NoError(t, err, got)
	body, _ := io.ReadAll(resp.Body)
	assert.Equal(t, http.StatusBadGateway, resp.StatusCode)
	assert.Contains(t, string(body), "header section too large (limit 4096 bytes)")
	assert.NotContains(t, got, "hhhh")
	assert.ErrorIs(t, r.lastRefused(), ErrUpstreamHeaders)
	err = <-r.errs
	assert.ErrorIs(t, err, ErrUpstreamHeaders)
}

func TestPipelinedRequestsAnsweredInOrder(t *testing.T) {
	r := newRig(t, http.HandlerFunc(echo))
	got := roundTrip(t, r, "POST /1 HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n\r\none"+
		"GET /2 HTTP/1.1\r\nHost: a.example\r\n\r\n"+
		"POST /3 HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nthr\r\n2;x=y\r\nee\r\n0\r\nTrailer-Field: 1\r\n\r\n"+
		"GET /4 HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
	br := bufio.NewReader(strings.NewReader(got))
	for i, want := range []string{"one", "", "three", ""} {
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err, "answer %d", i+1)
		body, _ := io.ReadAll(resp.Body)
		assert.Equal(t, want, string(body), "answer %d", i+1)
		assert.Contains(t, resp.Header.Get("X-Got"), fmt.Sprintf("/%d host=a.example", i+1))
	}
	_, err := br.ReadByte()
	assert.ErrorIs(t, err, io.EOF, "the connection ends after the request that asked for it")
}

func TestRefusedRequests(t *testing.T) {
	var seen sync.Map
	r := newRig(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		seen.Store(req.URL.Path, true)
		echo(w, req)
	}))
	cases := []struct {
		name, raw string
		status    int
		says      string
	}{
		{"misdirected", "GET /x HTTP/1.1\r\nHost: b.example\r\n\r\n", 421, "misdirected request: for b.example"},
		{"misdirected with port and case", "GET /x HTTP/1.1\r\nHost: B.Example.:443\r\n\r\n", 421, "for b.example"},
		{"two hosts", "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", 400, "2 Host fields"},
		{"no host", "GET /x HTTP/1.1\r\n\r\n", 400, "0 Host fields"},
		{"absolute form", "GET http://b.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n", 400, "is not a path"},
		{"bare LF", "GET /x HTTP/1.1\nHost: a.example\n\n", 400, "not ended by CRLF"},
		{"obs-fold", "GET /x HTTP/1.1\r\nHost: a.example\r\nX-A: 1\r\n 2\r\n\r\n", 400, "malformed header field"},
		{"space before colon", "GET /x HTTP/1.1\r\nHost : b.example\r\n\r\n", 400, "malformed header field"},
		{"CL and TE", "POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "both Content-Length and Transfer-Encoding"},
		{"two lengths", "POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400, "bad Content-Length"},
		{"signed length", "POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: +5\r\n\r\nhello", 400, "bad Content-Length"},
		{"gzip coding", "POST /x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "only one, chunked"},
		{"TE in 1.0", "POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "HTTP/1.0"},
		// A body's framing breaks after its head went upstream.
		{"bad chunk size", "POST /body HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", 400, "bad chunk size"},
		{"chunk without CRLF", "POST /body HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400, "does not end with CRLF"},
		{"CONNECT", "CONNECT b.example:443 HTTP/1.1\r\nHost: b.example\r\n\r\n", 405, "CONNECT"},
		{"version", "GET /x HTTP/2.0\r\nHost: a.example\r\n\r\n", 400, "version"},
		{"bad escape", "GET /x%zz HTTP/1.1\r\nHost: a.example\r\n\r\n", 400, "bad %-escape"},
		{"control in value", "GET /x HTTP/1.1\r\nHost: a.example\r\nX-A: a\x00b\r\n\r\n", 400, "control character"},
		{"head too large", "GET /x HTTP/1.1\r\nHost: a.example\r\nX-A: " + strings.Repeat("a", 5000) + "\r\n\r\n", 431, "over 4096 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := roundTrip(t, r, tc.raw)
			resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(got)), nil)
			require.NoError(t, err, got)
			body, _ := io.ReadAll(resp.Body)
			assert.Equal(t, tc.status, resp.StatusCode)
			assert.Contains(t, string(body), tc.says)
			assert.True(t, resp.Close, "the connection closes after the refusal")
			// Told before the client was: the relay's count is there
			// when the user reads the answer.
			require.Error(t, r.lastRefused())
			assert.Contains(t, r.lastRefused().Error(), tc.says)
		})
	}
	_, reached := seen.Load("/x")
	assert.False(t, reached, "no refused request reached the upstream")

	// A refusal waits for the answers to the requests before it.
	got := roundTrip(t, r, "GET /first HTTP/1.1\r\nHost: a.example\r\n\r\nGET /x HTTP/1.1\r\nHost: b.example\r\n\r\n")
	br := bufio.NewReader(strings.NewReader(got))
	first, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	io.Copy(io.Discard, first.Body)
	assert.Equal(t, 200, first.StatusCode)
	second, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	assert.Equal(t, 421, second.StatusCode)
}

func TestUpgrade(t *testing.T) {
	r := newRig(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Header.Get("Upgrade") != "echo" || req.URL.Path == "/refuse" {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		brw.Flush()
		io.Copy(c, brw)
	}))
	c := r.dial()
	br := bufio.NewReader(c)
	// Refused first: the connection stays HTTP, and the next request is
	// checked as any other.
	io.WriteString(c, "GET /refuse HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	io.Copy(io.Discard, resp.Body)
	assert.Equal(t, 403, resp.StatusCode)

	io.WriteString(c, "GET /up HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	assert.Equal(t, 101, resp.StatusCode)
	// Raw bytes now, including ones that look like a misdirected request.
	msg := "GET /x HTTP/1.1\r\nHost: b.example\r\n\r\n"
	io.WriteString(c, msg)
	got := make([]byte, len(msg))
	_, err = io.ReadFull(br, got)
	require.NoError(t, err)
	assert.Equal(t, msg, string(got))
	plain, streamed := r.conn(0).Open(func(string) bool { return true })
	assert.Equal(t, [2]int{0, 0}, [2]int{plain, streamed}, "an upgraded connection is no request")
}

// watch streams JSON lines, one chunk each, until the client goes.
func watch(events chan<- int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/watch" {
			echo(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		for i := 0; ; i++ {
			if _, err := fmt.Fprintf(w, "{\"n\":%d}\n", i); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case events <- i:
			case <-r.Context().Done():
				return
			}
		}
	}
}

func TestShutEndsAWatchCleanly(t *testing.T) {
	events := make(chan int)
	r := newRig(t, watch(events))
	hc := r.client()
	resp, err := hc.Get("http://a.example/watch")
	require.NoError(t, err)
	defer resp.Body.Close()
	<-events
	<-events
	staysOpen := func(p string) bool { return p == "/watch" }
	plain, streamed := r.conn(0).Open(staysOpen)
	assert.Equal(t, [2]int{0, 1}, [2]int{plain, streamed})
	r.conn(0).Shut()
	go func() {
		for range events {
		}
	}()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err, "the watch ends with its last chunk, not a cut")
	lines := strings.Split(strings.TrimSuffix(string(body), "\n"), "\n")
	for _, l := range lines {
		assert.Regexp(t, `^\{"n":\d+\}$`, l, "whole events only")
	}
}

func TestGoAway(t *testing.T) {
	r := newRig(t, http.HandlerFunc(echo))
	c := r.dial()
	br := bufio.NewReader(c)
	io.WriteString(c, "GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	io.Copy(io.Discard, resp.Body)
	assert.False(t, resp.Close)

	assert.True(t, r.conn(0).GoAway())
	assert.False(t, r.conn(0).GoAway(), "only the first call says it did it")
	io.WriteString(c, "GET /2 HTTP/1.1\r\nHost: a.example\r\n\r\n")
	resp, err = http.ReadResponse(br, nil)
	require.NoError(t, err)
	io.Copy(io.Discard, resp.Body)
	assert.Equal(t, 200, resp.StatusCode)
	assert.True(t, resp.Close, "the answer after GoAway tells the client to close")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = br.ReadByte()
	assert.ErrorIs(t, err, io.EOF, "and the connection closes after it")
}

func TestShutIdle(t *testing.T) {
	r := newRig(t, http.HandlerFunc(echo))
	c := r.dial()
	io.WriteString(c, "GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	io.Copy(io.Discard, resp.Body)
	r.conn(0).Shut()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF, "an idle connection closes at once")
}

func TestParsers(t *testing.T) {
	for _, tc := range []struct {
		line string
		n    int64
		ok   bool
	}{
		{"0\r\n", 0, true}, {"1a\r\n", 26, true}, {"A;ext=1\r\n", 10, true},
		{"\r\n", 0, false}, {"-1\r\n", 0, false}, {"+1\r\n", 0, false}, {"1 \r\n", 0, false},
		{"fffffffffffffffff\r\n", 0, false}, {"1;\x01\r\n", 0, false}, {"0x1\r\n", 0, false},
	} {
		n, err := chunkSize([]byte(tc.line))
		if tc.ok {
			assert.NoError(t, err, "%q", tc.line)
			assert.Equal(t, tc.n, n, "%q", tc.line)
		} else {
			assert.ErrorIs(t, err, ErrProtocol, "%q", tc.line)
		}
	}
}

// FuzzRead holds the splice to its purpose against arbitrary client
// bytes: whatever it passes on, Go's own request parser (the upstream's)
// reads as exactly the requests the splice counted, each for an allowed
// host and carrying the relay's X-Forwarded-For alone, so no request can
// hide in another's bytes.
func FuzzRead(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
		"POST /p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\n\r\nGET /",
		"POST /p HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: b.example\r\n\r\n",
		"GET /u HTTP/1.1\r\nHost: a.example\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nraw",
		"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		sc := New(&inputConn{r: bytes.NewReader(in)}, Options{Allow: allow, MaxHeaderBytes: 4 << 10, MaxResponseHeaderBytes: 4 << 10, ClientIP: clientIP})
		// The upstream: answers each request the splice queued, in order.
		answered := make(chan int)
		go func() {
			n := 0
			defer func() { answered <- n }()
			for {
				sc.smu.Lock()
				for !sc.ended && len(sc.queue) == 0 {
					sc.cond.Wait()
				}
				if sc.ended {
					sc.smu.Unlock()
					return
				}
				r := sc.queue[0]
				sc.smu.Unlock()
				answer := "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
				if r.upgrade {
					answer = "HTTP/1.1 101 Switching Protocols\r\n\r\n"
				}
				if _, err := sc.Write([]byte(answer)); err != nil {
					t.Errorf("answering: %v", err)
					return
				}
				n++
			}
		}()
		var out bytes.Buffer
		buf := make([]byte, 4096)
		for {
			sc.smu.Lock()
			stopped := sc.stopped
			sc.smu.Unlock()
			if stopped && len(sc.pending) == 0 && sc.passLeft == 0 {
				break // what is left would wait for the upstream to close
			}
			n, err := sc.Read(buf)
			out.Write(buf[:n])
			if err != nil {
				break
			}
		}
		sc.smu.Lock()
		for !sc.ended && len(sc.queue) > 0 {
			sc.cond.Wait()
		}
		sc.smu.Unlock()
		sc.Close()
		queued := <-answered
		br := bufio.NewReader(&out)
		for i := 0; i < queued; i++ {
			req, err := http.ReadRequest(br)
			if err != nil {
				t.Fatalf("request %d of %d passed on is not one to Go: %v\n%q", i+1, queued, err, out.String())
			}
			if req.Host != "" && !allow(hostname.OfAuthority(req.Host)) {
				t.Fatalf("request for %q passed on", req.Host)
			}
			if xff := req.Header.Values("X-Forwarded-For"); len(xff) != 1 || xff[0] != clientIP {
				t.Fatalf("X-Forwarded-For %q passed on", xff)
			}
			if _, err := io.Copy(io.Discard, req.Body); err != nil && i < queued-1 {
				t.Fatalf("body of request %d: %v", i+1, err)
			}
			if req.Header.Get("Upgrade") != "" && strings.Contains(strings.ToLower(req.Header.Get("Connection")), "upgrade") {
				return // raw bytes follow
			}
		}
	})
}

// inputConn is a client that sends its bytes and then half-closes; what
// it is sent is dropped.
type inputConn struct {
	net.Conn
	r *bytes.Reader
}

func (c *inputConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *inputConn) Write(p []byte) (int, error) { return len(p), nil }
func (c *inputConn) Close() error                { return nil }
