//lint:file-ignore SA1019 x/net/http2 is what the tunnel itself uses (internal/tunnel/relay.go), and its server and ClientConn drive a splice over pipes
package h2splice_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/spectroproxy/spectro-proxy/internal/h2splice"
)

// upstream is a real x/net HTTP/2 server behind a splice.
type upstream struct {
	srv      *http2.Server
	handler  http.Handler
	requests atomic.Int64
	// bytewise hands the splice the upstream's bytes one at a time: every
	// frame header straddles two writes.
	bytewise bool
}

// splice serves one client connection: the client's end of a pipe, spliced
// onto a pipe to the upstream's server. It returns the client's end and
// the splice's result once both directions end.
func (u *upstream) splice(t *testing.T, opts h2splice.Options) (net.Conn, *h2splice.Conn, <-chan error) {
	t.Helper()
	cliC, cliS := net.Pipe()
	upC, upS := net.Pipe()
	go u.srv.ServeConn(upS, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.requests.Add(1)
		u.handler.ServeHTTP(w, r)
	})})
	sc := h2splice.New(cliS, opts)
	done := make(chan error, 2)
	go func() {
		_, err := io.Copy(upC, sc)
		upC.Close()
		sc.Close()
		done <- err
	}()
	go func() {
		var src io.Reader = upC
		if u.bytewise {
			src = iotest.OneByteReader(upC)
		}
		_, err := io.Copy(sc, src)
		sc.Close()
		done <- err
	}()
	t.Cleanup(func() { cliC.Close(); upC.Close() })
	return cliC, sc, done
}

func echo() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		sum := sha256.Sum256(body)
		w.Header().Set("X-Host", r.Host)
		w.Header().Set("X-Big-Len", fmt.Sprint(len(r.Header.Get("X-Big"))))
		w.Header().Set("X-Got-Forwarded", strings.Join(r.Header.Values("X-Forwarded-For"), ", "))
		w.Header().Set("X-Body-Sha", hex.EncodeToString(sum[:]))
		_, _ = w.Write(bytes.Repeat([]byte("r"), 40<<10))
	})
}

// A cookie an answer sets stays on the host that set it: its Domain is
// renamed, on literals and on the answers after that take the field from
// HPACK's dynamic table, and the client's table stays in step with the
// upstream's encoder (a mismatch fails the client's decoding).
func TestAnswersCookiesStayOnTheirHost(t *testing.T) {
	for _, bytewise := range []bool{false, true} {
		t.Run(fmt.Sprintf("bytewise=%v", bytewise), func(t *testing.T) {
			var n atomic.Int64
			u := &upstream{srv: &http2.Server{}, bytewise: bytewise, handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				i := n.Add(1)
				w.Header().Add("Set-Cookie", "session=1; Domain=relay.test; Path=/")
				w.Header().Add("Set-Cookie", fmt.Sprintf("n=%d; path=/; domain=.relay.test", i))
				w.Header().Add("Set-Cookie", "plain=1; Path=/")
				w.Header().Set("X-N", fmt.Sprint(i))
				_, _ = w.Write(bytes.Repeat([]byte("r"), int(i)*10000))
			})}
			c, _, _ := u.splice(t, allowOnly("cluster-a.relay.test"))
			cc, err := (&http2.Transport{}).NewClientConn(c)
			require.NoError(t, err)
			defer cc.Close()
			for i := 1; i <= 4; i++ {
				req, _ := http.NewRequest(http.MethodGet, "https://cluster-a.relay.test/x", nil)
				resp, err := cc.RoundTrip(req)
				require.NoError(t, err)
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				require.NoError(t, err)
				assert.Len(t, body, i*10000)
				assert.Equal(t, []string{"session=1; Xomain=relay.test; Path=/", fmt.Sprintf("n=%d; path=/; Xomain=.relay.test", i), "plain=1; Path=/"},
					resp.Header.Values("Set-Cookie"), "answer %d", i)
				assert.Equal(t, fmt.Sprint(i), resp.Header.Get("X-N"))
			}
		})
	}
}

func allowOnly(host string) h2splice.Options {
	return h2splice.Options{Allow: func(h string) bool { return h == host }, MaxHeaderBlock: 64 << 10}
}

func TestRequestsGoThrough(t *testing.T) {
	u := &upstream{srv: &http2.Server{}, handler: echo()}
	opts := allowOnly("cluster-a.relay.test")
	opts.Extra = h2splice.Fields(hpack.HeaderField{Name: "x-forwarded-for", Value: "192.0.2.7"})
	c, _, _ := u.splice(t, opts)
	cc, err := (&http2.Transport{}).NewClientConn(c)
	require.NoError(t, err)
	defer cc.Close()
	tests := []struct {
		name string
		big  int // an X-Big header this long: over 16 KiB the client sends CONTINUATION frames
		body int
		xff  string // the client's own X-Forwarded-For
	}{
		{name: "small GET"},
		{name: "same headers again (HPACK's dynamic table)"},
		{name: "the client's own X-Forwarded-For comes first", xff: "6.6.6.6"},
		{name: "and again, from the dynamic table", xff: "6.6.6.6"},
		{name: "header block in CONTINUATION frames", big: 40 << 10},
		{name: "request body", body: 300 << 10},
		{name: "both", big: 20 << 10, body: 70 << 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			payload := bytes.Repeat([]byte("b"), tt.body)
			req, _ := http.NewRequest(http.MethodPost, "https://cluster-a.relay.test:443/x", bytes.NewReader(payload))
			req.Header.Set("X-Big", strings.Repeat("x", tt.big))
			want := "192.0.2.7"
			if tt.xff != "" {
				req.Header.Set("X-Forwarded-For", tt.xff)
				want = tt.xff + ", " + want
			}
			resp, err := cc.RoundTrip(req)
			require.NoError(t, err)
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			sum := sha256.Sum256(payload)
			assert.Equal(t, 40<<10, len(got))
			assert.Equal(t, "cluster-a.relay.test:443", resp.Header.Get("X-Host"))
			assert.Equal(t, fmt.Sprint(tt.big), resp.Header.Get("X-Big-Len"))
			assert.Equal(t, hex.EncodeToString(sum[:]), resp.Header.Get("X-Body-Sha"))
			assert.Equal(t, want, resp.Header.Get("X-Got-Forwarded"), "the splice's field is added last")
		})
	}
}

// Many requests at once on one connection: their frames interleave.
func TestConcurrentRequests(t *testing.T) {
	u := &upstream{srv: &http2.Server{}, handler: echo()}
	c, _, _ := u.splice(t, allowOnly("cluster-a.relay.test"))
	cc, err := (&http2.Transport{}).NewClientConn(c)
	require.NoError(t, err)
	defer cc.Close()
	const n = 64
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest(http.MethodPost, "https://cluster-a.relay.test/x", strings.NewReader(strings.Repeat("p", i*1000)))
			req.Header.Set(fmt.Sprintf("X-Req-%d", i), fmt.Sprint(i))
			resp, err := cc.RoundTrip(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err == nil && len(b) != 40<<10 {
				err = fmt.Errorf("request %d: %d bytes back", i, len(b))
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.NoError(t, err)
	}
	assert.Equal(t, int64(n), u.requests.Load())
}

// An upstream that lets the client's encoder use a larger header table
// than HPACK's default: the splice's decoder must follow its SETTINGS.
func TestUpstreamHeaderTableSize(t *testing.T) {
	const table = 64 << 10
	u := &upstream{srv: &http2.Server{MaxDecoderHeaderTableSize: table}, handler: echo()}
	c, _, _ := u.splice(t, allowOnly("cluster-a.relay.test"))
	cc, err := (&http2.Transport{MaxEncoderHeaderTableSize: table}).NewClientConn(c)
	require.NoError(t, err)
	defer cc.Close()
	for i := range 20 {
		req, _ := http.NewRequest(http.MethodGet, "https://cluster-a.relay.test/x", nil)
		// 20 distinct 1 KiB values: the table outgrows 4 KiB.
		req.Header.Set(fmt.Sprintf("X-V%d", i), strings.Repeat(fmt.Sprint(i%10), 1000))
		resp, err := cc.RoundTrip(req)
		require.NoError(t, err, "request %d", i)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// A request for another host on the connection is held back and answered
// 421, the requests before it served, and the client told to go away; a
// browser (here the transport) then asks on a connection of its own.
func TestMisdirectedRequest(t *testing.T) {
	u := &upstream{srv: &http2.Server{}, handler: echo()}
	var mu sync.Mutex
	var misdirected []string
	var dials []string
	tr := &http2.Transport{
		DialTLSContext: func(_ context.Context, _, addr string, _ *tls.Config) (net.Conn, error) {
			host, _, _ := net.SplitHostPort(addr)
			mu.Lock()
			dials = append(dials, host)
			mu.Unlock()
			// The connection's SNI is the host it was dialed for.
			opts := allowOnly(host)
			opts.Misdirected = func(h string) { mu.Lock(); misdirected = append(misdirected, h); mu.Unlock() }
			c, _, _ := u.splice(t, opts)
			return c, nil
		},
	}
	defer tr.CloseIdleConnections()
	get := func(host string) string {
		req, _ := http.NewRequest(http.MethodGet, "https://"+host+"/x", nil)
		resp, err := tr.RoundTrip(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.Header.Get("X-Host")
	}
	assert.Equal(t, "cluster-a.relay.test", get("cluster-a.relay.test"))

	// The transport would open a connection per host; a browser coalesces
	// hosts its certificate covers. Send one on A's connection by hand.
	opts := allowOnly("cluster-a.relay.test")
	opts.Misdirected = func(h string) { mu.Lock(); misdirected = append(misdirected, h); mu.Unlock() }
	c, _, done := u.splice(t, opts)
	cc, err := tr.NewClientConn(c)
	require.NoError(t, err)
	first, _ := http.NewRequest(http.MethodGet, "https://cluster-a.relay.test/x", nil)
	resp, err := cc.RoundTrip(first)
	require.NoError(t, err)
	resp.Body.Close()
	before := u.requests.Load()
	other, _ := http.NewRequest(http.MethodGet, "https://cluster-b.relay.test/x", nil)
	resp, err = cc.RoundTrip(other)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusMisdirectedRequest, resp.StatusCode)
	assert.Equal(t, before, u.requests.Load(), "the upstream never saw it")
	require.Eventually(t, func() bool { return !cc.CanTakeNewRequest() }, 5*time.Second, 5*time.Millisecond, "the client was told to go away")
	mu.Lock()
	assert.Equal(t, []string{"cluster-b.relay.test"}, misdirected)
	mu.Unlock()
	cc.Close()
	<-done

	// Through the transport's own retry: B gets its own connection.
	assert.Equal(t, "cluster-b.relay.test", get("cluster-b.relay.test"))
}

// GoAway lets the streams open finish and turns new requests away.
func TestGoAway(t *testing.T) {
	release := make(chan struct{})
	u := &upstream{srv: &http2.Server{}, handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/watch" {
			_, _ = w.Write([]byte("event-1\n"))
			w.(http.Flusher).Flush()
			<-release
			_, _ = w.Write([]byte("event-2\n"))
		}
	})}
	c, sc, _ := u.splice(t, allowOnly("cluster-a.relay.test"))
	cc, err := (&http2.Transport{}).NewClientConn(c)
	require.NoError(t, err)
	defer cc.Close()
	req, _ := http.NewRequest(http.MethodGet, "https://cluster-a.relay.test/watch", nil)
	resp, err := cc.RoundTrip(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	buf := make([]byte, 8)
	_, err = io.ReadFull(resp.Body, buf)
	require.NoError(t, err)

	sc.GoAway()
	require.Eventually(t, func() bool { return !cc.CanTakeNewRequest() }, 5*time.Second, 5*time.Millisecond)
	close(release)
	rest, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, "event-2\n", string(rest), "the open stream finishes")
}

func TestBadClients(t *testing.T) {
	frame := func(typ, flags byte, sid uint32, payload []byte) []byte {
		f := []byte{byte(len(payload) >> 16), byte(len(payload) >> 8), byte(len(payload)), typ, flags,
			byte(sid >> 24), byte(sid >> 16), byte(sid >> 8), byte(sid)}
		return append(f, payload...)
	}
	preface := []byte(http2.ClientPreface)
	var enc bytes.Buffer
	e := hpack.NewEncoder(&enc)
	_ = e.WriteField(hpack.HeaderField{Name: ":authority", Value: "cluster-a.relay.test"})
	block := enc.Bytes()
	tests := []struct {
		name, want string
		in         []byte
	}{
		{"not HTTP/2", "does not start with HTTP/2's client preface", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
		{"continuation alone", "CONTINUATION on stream 1 outside a header block", append(preface, frame(0x9, 0x4, 1, block)...)},
		{"push promise", "PUSH_PROMISE from a client", append(preface, frame(0x5, 0x4, 1, block)...)},
		{"block interrupted", "interrupted by a frame of type 0", append(append(preface, frame(0x1, 0, 1, block)...), frame(0x0, 0, 1, []byte("x"))...)},
		{"block too large", "over 1024 bytes", append(preface, frame(0x1, 0x4, 1, make([]byte, 2000))...)},
		{"bad HPACK", "decoding the header block of stream 1", append(preface, frame(0x1, 0x4, 1, []byte{0xff, 0xff, 0xff, 0xff, 0xff})...)},
		{"padding past the end", "padding longer than the payload", append(preface, frame(0x1, 0x4|0x8, 1, append([]byte{200}, block...))...)},
		{"cut inside a frame", "unexpected EOF", append(preface, frame(0x0, 0, 1, []byte("abc"))[:11]...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			go func() { _, _ = a.Write(tt.in); a.Close() }()
			sc := h2splice.New(b, h2splice.Options{Allow: func(string) bool { return true }, MaxHeaderBlock: 1024})
			_, err := io.Copy(io.Discard, sc)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
			if tt.name != "cut inside a frame" && tt.name != "not HTTP/2" {
				assert.True(t, errors.Is(err, h2splice.ErrProtocol), "%v is ErrProtocol", err)
			}
		})
	}
}

// What a client sends comes out unchanged, or the splice stops with an
// error: it never makes up bytes.
func FuzzRead(f *testing.F) {
	preface := []byte(http2.ClientPreface)
	f.Add(append(append([]byte{}, preface...), 0, 0, 0, 4, 0, 0, 0, 0, 0))
	f.Add(append(append([]byte{}, preface...), 0, 0, 5, 1, 4, 0, 0, 0, 1, 0x82, 0x86, 0x84, 0x41, 0x0))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		go func() { _, _ = a.Write(in); a.Close() }()
		sc := h2splice.New(b, h2splice.Options{Allow: func(string) bool { return true }, MaxHeaderBlock: 4096})
		out, _ := io.ReadAll(sc)
		if !bytes.HasPrefix(in, out) {
			t.Fatalf("output is not a prefix of the input")
		}
	})
}

// Open follows each request until both sides ended it, or either reset it.
func TestOpen(t *testing.T) {
	release := make(chan struct{})
	u := &upstream{srv: &http2.Server{}, handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.(http.Flusher).Flush() // headers out, no END_STREAM
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})}
	c, sc, _ := u.splice(t, allowOnly("cluster-a.relay.test"))
	cc, err := (&http2.Transport{}).NewClientConn(c)
	require.NoError(t, err)
	defer cc.Close()
	staysOpen := func(path string) bool { return strings.Contains(path, "watch=true") }
	open := func() [2]int { p, s := sc.Open(staysOpen); return [2]int{p, s} }

	watchCtx, cancelWatch := context.WithCancel(context.Background())
	defer cancelWatch()
	start := func(ctx context.Context, path string) *http.Response {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://cluster-a.relay.test"+path, nil)
		resp, err := cc.RoundTrip(req)
		require.NoError(t, err)
		return resp
	}
	watch := start(watchCtx, "/api/v1/pods?watch=true")
	defer watch.Body.Close()
	plain := start(context.Background(), "/api/v1/pods")
	assert.Equal(t, [2]int{1, 1}, open(), "a list and a watch")

	close(release) // both answers end
	_, _ = io.ReadAll(plain.Body)
	plain.Body.Close()
	_, _ = io.ReadAll(watch.Body)
	require.Eventually(t, func() bool { return open() == [2]int{0, 0} }, 5*time.Second, 5*time.Millisecond, "ended: %v", open())

	// A request the client gives up on is reset: gone at once.
	release = make(chan struct{})
	watch2 := start(watchCtx, "/api/v1/pods?watch=true")
	assert.Equal(t, [2]int{0, 1}, open())
	cancelWatch()
	watch2.Body.Close()
	require.Eventually(t, func() bool { return open() == [2]int{0, 0} }, 5*time.Second, 5*time.Millisecond, "reset: %v", open())
	close(release)
}

// Shut names the last stream that went upstream before it closes: a
// client whose request crossed the close knows it was not served, and one
// still open reads the GOAWAY's end (what client-go's watch takes for an
// end of the stream).
func TestShut(t *testing.T) {
	release := make(chan struct{})
	u := &upstream{srv: &http2.Server{}, handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})}
	defer close(release)
	c, sc, _ := u.splice(t, allowOnly("cluster-a.relay.test"))
	cc, err := (&http2.Transport{}).NewClientConn(c)
	require.NoError(t, err)
	defer cc.Close()
	var open []*http.Response
	for range 2 { // streams 1 and 3
		req, _ := http.NewRequest(http.MethodGet, "https://cluster-a.relay.test/watch", nil)
		resp, err := cc.RoundTrip(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		open = append(open, resp)
	}
	assert.True(t, sc.GoAway())
	assert.False(t, sc.GoAway(), "only once")
	require.Eventually(t, func() bool { return !cc.CanTakeNewRequest() }, 5*time.Second, 5*time.Millisecond)
	sc.Shut()
	_, err = io.ReadAll(open[1].Body)
	var ga http2.GoAwayError
	require.ErrorAs(t, err, &ga)
	assert.Equal(t, uint32(3), ga.LastStreamID, "the last GOAWAY names the last stream that went upstream")
	assert.Equal(t, http2.ErrCodeNo, ga.ErrCode)
}

// sink is a client connection that keeps what it is sent.
type sink struct {
	net.Conn
	got bytes.Buffer
}

func (s *sink) Write(p []byte) (int, error) { return s.got.Write(p) }
func (s *sink) Close() error                { return nil }

// FuzzWrite holds the upstream's side to the byte: however its bytes are
// cut into writes, what reaches the client is them unchanged, as long as
// no header block needed a cookie hidden; the splice never panics on
// what an upstream (a tenant's API server) sends.
func FuzzWrite(f *testing.F) {
	settings := []byte{0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x10, 0}
	data := append([]byte{0, 0, 3, 0, 1, 0, 0, 0, 1}, "abc"...)
	headers := append([]byte{0, 0, 5, 1, 4, 0, 0, 0, 1}, 0x88, 0x0f, 0x10, 1, 'x') // :status 200, content-length x
	f.Add(append(append(settings, headers...), data...), 4)
	f.Add(append(settings, data...), 13)
	f.Fuzz(func(t *testing.T, in []byte, cut int) {
		s := &sink{}
		sc := h2splice.New(s, allowOnly("a"))
		cut = min(max(cut, 0), len(in))
		_, err1 := sc.Write(in[:cut])
		_, err2 := sc.Write(in[cut:])
		if err1 != nil || err2 != nil {
			return
		}
		for b := in; len(b) >= 9; {
			n := 9 + (int(b[0])<<16 | int(b[1])<<8 | int(b[2]))
			if b[3] == 1 || b[3] == 9 {
				return // a header block: held whole, maybe rewritten
			}
			if n > len(b) {
				break
			}
			b = b[n:]
		}
		if !bytes.Equal(s.got.Bytes(), in) && !bytes.HasPrefix(in, s.got.Bytes()) {
			t.Fatalf("the client got %q for %q", s.got.Bytes(), in)
		}
	})
}
