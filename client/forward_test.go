package client

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// countingReader yields 'a' forever, counting what was read.
type countingReader struct{ n int64 }

func (c *countingReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'a'
	}
	c.n += int64(len(p))
	return len(p), nil
}

func newStreamClient(t *testing.T, mode tunnel.Mode) *Client {
	t.Helper()
	c, err := New(Config{Server: "proxy.test", ClusterUID: "abc", APIServer: "http://127.0.0.1:1", APIServerCAFile: "/nonexistent",
		K8sDashboardURL: "http://127.0.0.1:1", AgentID: "test", DialTimeout: time.Second, Mode: mode})
	require.NoError(t, err)
	return c
}

// An upgrade stream whose request line never ends is cut at the bound,
// however much the peer has to send.
func TestServeUpgradeBoundsRequestHeaders(t *testing.T) {
	c := newStreamClient(t, tunnel.Passthrough)
	src := &countingReader{}
	body := io.MultiReader(strings.NewReader("GET /"), io.LimitReader(src, 400<<20))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := (&http.Request{Method: http.MethodConnect, URL: &url.URL{}, Host: "cluster-abc-dashboard", ProtoMajor: 2,
		Header: http.Header{tunnel.HeaderStream: {tunnel.StreamUpgrade}}, Body: io.NopCloser(body)}).WithContext(ctx)
	c.serveStream(httptest.NewRecorder(), r)
	assert.LessOrEqual(t, src.n, int64(tunnel.MaxUpgradeRequestHeaderBytes), "read no more than the bound")
}

// The agent takes a raw or upgrade stream only where the route's mode
// calls for one, and plain requests only for terminate routes.
func TestServeStreamKindByMode(t *testing.T) {
	c := newStreamClient(t, tunnel.Passthrough)
	tests := []struct {
		name, method, host, kind, route string
		want                            int
	}{
		{"upgrade on a passthrough route", http.MethodConnect, "cluster-abc", tunnel.StreamUpgrade, "", http.StatusForbidden},
		{"raw stream on a terminate route", http.MethodConnect, "cluster-abc-dashboard", tunnel.StreamTCP, "", http.StatusForbidden},
		{"request for a passthrough route", http.MethodGet, "cluster-abc.proxy.test", "", "cluster-abc", http.StatusForbidden},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &http.Request{Method: tc.method, URL: &url.URL{Path: "/"}, Host: tc.host, ProtoMajor: 2,
				Header: http.Header{tunnel.HeaderStream: {tc.kind}, tunnel.HeaderRoute: {tc.route}}, Body: http.NoBody}
			w := httptest.NewRecorder()
			c.serveStream(w, r)
			assert.Equal(t, tc.want, w.Code)
		})
	}
}
