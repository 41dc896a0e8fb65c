package server

import (
	"errors"
	"io"
	"mime"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"

	"golang.org/x/net/http/httpguts"

	"github.com/spectroproxy/spectro-proxy/internal/kubereq"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// serveShort proxies a short terminate-mode request (kubereq.Short and
// Replayable: the gets and lists that are most of what kubectl and
// dashboards send) without httputil.ReverseProxy, and reports false,
// having done nothing, for every other request.
//
// It sends what ReverseProxy with the relay's Rewrite sends and answers
// as it answers (TestShortPathMatchesReverseProxy holds the two side by
// side), but builds the outgoing header in one map instead of cloning
// the request and deleting from it, and hands the answer's header
// fields over instead of adding them one value at a time. ReverseProxy's
// own work was about 6% of the relay's CPU per small request and 11 of
// its 80-100 allocations (docs/performance.md, tenth pass).
func (s *Server) serveShort(w http.ResponseWriter, r *http.Request, label string, streamed func(*http.Response)) bool {
	// A request without a body has ContentLength 0 but, over HTTP/2, a
	// Body all the same; the request that goes out has none, as
	// ReverseProxy sends it.
	if r.ContentLength != 0 || isUpgrade(r) || kubereq.StaysOpen(r.URL) || !cleanQuery(r.URL.RawQuery) {
		return false
	}
	u := *r.URL
	u.Scheme, u.Host = "https", label
	out := &http.Request{
		Method:     r.Method,
		URL:        &u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Host:       r.Host,
	}
	// Short(out) holds already (no body, not StaysOpen).
	if !kubereq.Replayable(out) {
		return false
	}
	out.Header = outHeader(r)
	// A target's informational answers (103 Early Hints, say) go to the
	// user as they come, as ReverseProxy passes them; none once the
	// final answer is in.
	var mu sync.Mutex
	final := false
	out = out.WithContext(httptrace.WithClientTrace(r.Context(), &httptrace.ClientTrace{
		Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			mu.Lock()
			defer mu.Unlock()
			if final {
				return nil
			}
			wh := w.Header()
			for k, vv := range h {
				wh[k] = vv
			}
			w.WriteHeader(code)
			clear(wh)
			return nil
		},
	}))
	resp, err := routeTransport{s: s, label: label}.RoundTrip(out)
	mu.Lock()
	final = true
	mu.Unlock()
	if err != nil {
		s.proxyError(w, r, err)
		return true
	}
	defer resp.Body.Close()
	dropHopHeaders(resp.Header)
	stripCookieDomains(resp.Header)
	streamed(resp)
	wh := w.Header()
	for k, vv := range resp.Header {
		wh[k] = vv // resp's own slices, never touched again
	}
	announced := len(resp.Trailer)
	if announced > 0 {
		names := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			names = append(names, k)
		}
		wh.Add("Trailer", strings.Join(names, ", "))
	}
	w.WriteHeader(resp.StatusCode)
	if err := copyBody(w, resp); err != nil {
		// The user must see a cut answer as cut, not as a complete
		// one: net/http closes the connection (HTTP/1.1) or resets the
		// stream (HTTP/2).
		panic(http.ErrAbortHandler)
	}
	resp.Body.Close() // now, for resp.Trailer
	if len(resp.Trailer) > 0 {
		_ = http.NewResponseController(w).Flush()
	}
	// Trailers announced in the header go under their names; any the
	// body added since, under net/http's prefix for unannounced ones.
	prefix := ""
	if len(resp.Trailer) != announced {
		prefix = http.TrailerPrefix
	}
	for k, vv := range resp.Trailer {
		wh[prefix+k] = vv
	}
	return true
}

// copyBody copies resp's body to w. A body of unknown length (a watch
// the relay cannot tell from its URL, say) or an event stream goes out
// at every write, and its header at once, before the first byte that
// may be long in coming, as ReverseProxy does; one of known length goes
// out when the handler ends or net/http's buffer fills. Flushing is best
// effort, as there: a writer that cannot flush still gets every byte.
func copyBody(w http.ResponseWriter, resp *http.Response) error {
	bufs := &tunnel.ResponseBuffers{}
	bufs.Size(resp)
	buf := bufs.Get()
	defer bufs.Put(buf)
	flush := func() {}
	if resp.ContentLength == -1 || isEventStream(resp.Header) {
		rc := http.NewResponseController(w)
		flush = func() { _ = rc.Flush() }
		flush()
	}
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			flush()
		}
		if errors.Is(rerr, io.EOF) {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// isEventStream reads the media type as ReverseProxy does (case folded,
// parameters dropped).
func isEventStream(h http.Header) bool {
	mt, _, _ := mime.ParseMediaType(h.Get("Content-Type"))
	return mt == "text/event-stream"
}

// hopHeaders are the fields that describe one connection, not the
// request or answer (RFC 9110, 7.6.1), as ReverseProxy drops them.
var hopHeaders = map[string]bool{
	"Connection": true, "Proxy-Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
}

// forwardedHeaders are what a user says about who forwarded the request:
// the relay's own X-Forwarded-* replace them.
var forwardedHeaders = map[string]bool{
	"Forwarded": true, "X-Forwarded-For": true, "X-Forwarded-Host": true, "X-Forwarded-Proto": true,
}

// outHeader is the header a short request leaves the relay with: r's,
// without hop-by-hop fields (also those its Connection names), without
// what the user said about forwarding, and without the tunnel's own
// Spectro-Proxy-* fields; with the relay's X-Forwarded-For, -Host and
// -Proto. The values are r's own slices, which nothing below changes.
func outHeader(r *http.Request) http.Header {
	in := r.Header
	h := make(http.Header, len(in)+3)
	for k, vv := range in {
		if !hopHeaders[k] && !forwardedHeaders[k] && !tunnel.IsInternal(k) {
			h[k] = vv
		}
	}
	dropConnectionNamed(h, in)
	if httpguts.HeaderValuesContainsToken(in["Te"], "trailers") {
		h["Te"] = []string{"trailers"}
	}
	if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		h["X-Forwarded-For"] = []string{ip}
	}
	h["X-Forwarded-Host"] = []string{r.Host}
	proto := "https"
	if r.TLS == nil {
		proto = "http"
	}
	h["X-Forwarded-Proto"] = []string{proto}
	if _, ok := in["User-Agent"]; !ok {
		h["User-Agent"] = []string{""} // none, rather than Go's
	}
	return h
}

// dropHopHeaders removes an answer's hop-by-hop fields and those its
// Connection names.
func dropHopHeaders(h http.Header) {
	dropConnectionNamed(h, h)
	for k := range hopHeaders {
		delete(h, k)
	}
}

// dropConnectionNamed removes from h the fields that from's Connection
// names.
func dropConnectionNamed(h, from http.Header) {
	for _, f := range from["Connection"] {
		for sf := range strings.SplitSeq(f, ",") {
			if sf = textproto.TrimString(sf); sf != "" {
				h.Del(sf)
			}
		}
	}
}

// cleanQuery reports whether ReverseProxy would send query as it is: it
// rewrites one with a semicolon or a broken %-escape, which net/http's
// server no longer splits on and which two servers may read differently.
// Such requests take ReverseProxy's path.
func cleanQuery(q string) bool {
	for i := 0; i < len(q); i++ {
		switch q[i] {
		case ';':
			return false
		case '%':
			if i+2 >= len(q) || !isHex(q[i+1]) || !isHex(q[i+2]) {
				return false
			}
			i += 2
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}
