package server_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	fleet "github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

// mirror answers with what reached it (method, path, Host and every
// header field but the query, which the two paths of
// TestShortPathMatchesReverseProxy differ in), and with the fields a
// proxy must drop or rewrite: hop-by-hop ones, one its Connection names,
// a cookie for the whole domain, a repeated field, an announced trailer
// and, asked for, an Early Hints answer first and a body of unknown
// length.
func mirror(w http.ResponseWriter, r *http.Request) {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s host=%s\n", r.Method, r.URL.Path, r.Host)
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range r.Header {
			if !yield(k) {
				return
			}
		}
	}) {
		fmt.Fprintf(&b, "%s: %q\n", k, r.Header[k])
	}
	h := w.Header()
	if r.URL.Query().Get("hints") != "" {
		h.Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
	}
	h.Set("Connection", "X-Hop")
	h.Set("X-Hop", "dropped")
	h.Set("Keep-Alive", "timeout=5")
	h.Add("Set-Cookie", "session=1; Domain=proxy.test; Path=/")
	h.Add("X-Multi", "a")
	h.Add("X-Multi", "b")
	h.Set("Trailer", "X-Trail")
	if r.URL.Query().Get("chunked") == "" {
		h.Set("Content-Length", fmt.Sprint(b.Len()))
	}
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		io.WriteString(w, b.String())
	}
	h.Set("X-Trail", "end")
}

// answer is what a user got, minus the Date.
type answer struct {
	proto   int
	status  int
	early   []string // Link fields of 1xx answers
	header  http.Header
	body    string
	trailer http.Header
}

// TestShortPathMatchesReverseProxy sends the same requests through the
// relay's short-request path (serveShort) and through ReverseProxy (a
// semicolon in the query sends a request that way, to the same pooled
// connections), over HTTP/1.1 and HTTP/2, and compares what the target
// received and what the user got.
func TestShortPathMatchesReverseProxy(t *testing.T) {
	const uid = "sp"
	host := hostname.Host(hostname.DefaultSubdomain(uid), fleetDomain)
	stateDir := t.TempDir()
	f := newFakeFleet()
	// Request by request: an HTTP/1.1 connection would be spliced.
	a := startRelayWith(t, "relay-a", peerListener(t), stateDir, func(c *server.Config) {
		c.Registry = f.member(fleet.Replica{ID: "relay-a", PeerAddr: c.PeerAdvertise})
		c.NoSplice = true
	})
	be := newAPIBackend(t)
	startFleetAgent(t, a, stateDir, uid, tunnel.Terminate, be)
	roots := relayRoots(t, stateDir)
	dial := func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, a.addr)
	}
	h1 := userClient(a, host, roots)
	h2 := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		DialContext:       dial,
		TLSClientConfig:   &tls.Config{ServerName: host, RootCAs: roots},
		ForceAttemptHTTP2: true,
	}}
	defer h1.CloseIdleConnections()

	do := func(t *testing.T, c *http.Client, method, query string, header http.Header) answer {
		t.Helper()
		var early []string
		trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
			early = append(early, fmt.Sprintf("%d %s", code, h.Get("Link")))
			return nil
		}}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), method, "https://"+host+"/mirror?"+query, nil)
		require.NoError(t, err)
		for k, vv := range header {
			req.Header[k] = vv
		}
		resp, err := c.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		resp.Header.Del("Date")
		return answer{proto: resp.ProtoMajor, status: resp.StatusCode, early: early, header: resp.Header, body: string(body), trailer: resp.Trailer}
	}
	both := http.Header{
		"Te":                   {"trailers, deflate"},
		"Spectro-Proxy-Route":  {"cluster-other"},
		"spectro-proxy-stream": {"http"},
		"X-Forwarded-For":      {"6.6.6.6"},
		"X-Forwarded-Host":     {"evil.test"},
		"X-Forwarded-Proto":    {"http"},
		"Forwarded":            {"for=6.6.6.6"},
		"Accept":               {"application/json", "application/yaml"},
		"Authorization":        {"Bearer t"},
	}
	hop := http.Header{
		"Connection":                {"X-Secret, keep-alive"},
		"X-Secret":                  {"dropped"},
		"Keep-Alive":                {"timeout=9"},
		"Proxy-Authorization":       {"Basic eA=="},
		"Proxy-Connection":          {"keep-alive"},
		"Upgrade-Insecure-Requests": {"1"},
	}
	// HTTP/2 allows no TE but "trailers".
	both2 := both.Clone()
	both2["Te"] = []string{"trailers"}
	withHop := hop.Clone()
	for k, vv := range both {
		withHop[k] = vv
	}
	tests := []struct {
		name   string
		c      *http.Client
		method string
		query  string
		header http.Header
	}{
		{"HTTP/1.1 GET, hop-by-hop fields", h1, http.MethodGet, "a=1", withHop},
		{"HTTP/1.1 GET, no user agent", h1, http.MethodGet, "a=1", http.Header{"User-Agent": nil}},
		{"HTTP/1.1 GET, empty user agent", h1, http.MethodGet, "a=1", http.Header{"User-Agent": {""}}},
		{"HTTP/1.1 GET, body of unknown length", h1, http.MethodGet, "chunked=1", both},
		{"HTTP/1.1 GET, early hints", h1, http.MethodGet, "hints=1", both},
		{"HTTP/1.1 HEAD", h1, http.MethodHead, "a=1", both},
		{"HTTP/1.1 OPTIONS", h1, http.MethodOptions, "a=1", both},
		{"HTTP/2 GET", h2, http.MethodGet, "a=1", both2},
		{"HTTP/2 GET, body of unknown length", h2, http.MethodGet, "chunked=1", both2},
		{"HTTP/2 GET, early hints", h2, http.MethodGet, "hints=1", both2},
		{"HTTP/2 HEAD", h2, http.MethodHead, "a=1", both2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			short := do(t, tc.c, tc.method, tc.query, tc.header)
			viaRP := do(t, tc.c, tc.method, tc.query+"&b=;", tc.header)
			assert.Equal(t, viaRP, short)
			wantProto := 1
			if tc.c == h2 {
				wantProto = 2
			}
			assert.Equal(t, wantProto, short.proto)
			// And what both must be, so that two equal mistakes fail too.
			assert.Equal(t, http.StatusOK, short.status, short.body)
			if tc.method != http.MethodHead {
				assert.Contains(t, short.body, tc.method+" /mirror host="+host+"\n")
				assert.Contains(t, short.body, "X-Forwarded-For: [\"127.0.0.1\"]\n")
				assert.Contains(t, short.body, "X-Forwarded-Host: [\""+host+"\"]\n")
				assert.Contains(t, short.body, "X-Forwarded-Proto: [\"https\"]\n")
				for _, gone := range []string{"Spectro-Proxy", "Forwarded: ", "X-Secret", "Keep-Alive", "Proxy-", "Connection", "6.6.6.6", "evil.test"} {
					assert.NotContains(t, short.body, gone)
				}
				if tc.header.Get("Te") != "" {
					assert.Contains(t, short.body, "Te: [\"trailers\"]\n")
				}
				if strings.Contains(tc.query, "chunked") {
					assert.Equal(t, "end", short.trailer.Get("X-Trail"))
				}
			}
			assert.Equal(t, []string{"a", "b"}, short.header["X-Multi"])
			assert.Equal(t, []string{"session=1; Path=/"}, short.header["Set-Cookie"], "no Domain: the cookie stays on its host")
			for _, gone := range []string{"X-Hop", "Keep-Alive"} {
				assert.Empty(t, short.header[gone])
			}
		})
	}
}
