package server

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// serveShort takes the requests that end soon, carry no body and may be
// sent twice, whatever the protocol made of their Body, and leaves every
// other untouched for ReverseProxy. With no agent connected, one it takes
// is answered 503 naming the route.
func TestServeShortTakes(t *testing.T) {
	s, err := New(Config{Domain: "proxy.test", StateDir: t.TempDir()})
	require.NoError(t, err)
	h2Body := io.NopCloser(strings.NewReader("")) // what HTTP/2 gives a request without one
	tests := []struct {
		name   string
		method string
		target string
		body   io.ReadCloser
		length int64
		header http.Header
		taken  bool
	}{
		{name: "GET", method: http.MethodGet, target: "/api/v1/pods", taken: true},
		{name: "GET over HTTP/2", method: http.MethodGet, target: "/api/v1/pods", body: h2Body, taken: true},
		{name: "HEAD", method: http.MethodHead, target: "/", taken: true},
		{name: "OPTIONS", method: http.MethodOptions, target: "/", taken: true},
		{name: "watch=false is a list", method: http.MethodGet, target: "/api/v1/pods?watch=false", taken: true},
		{name: "GET with a body", method: http.MethodGet, target: "/", body: io.NopCloser(strings.NewReader("x")), length: 1},
		{name: "GET, body of unknown length", method: http.MethodGet, target: "/", body: h2Body, length: -1},
		{name: "watch", method: http.MethodGet, target: "/api/v1/pods?watch=true"},
		{name: "legacy watch path", method: http.MethodGet, target: "/api/v1/watch/pods"},
		{name: "logs -f", method: http.MethodGet, target: "/api/v1/namespaces/a/pods/b/log?follow=1"},
		{name: "DELETE without a body", method: http.MethodDelete, target: "/api/v1/namespaces/a/pods/b"},
		{name: "POST", method: http.MethodPost, target: "/", body: io.NopCloser(strings.NewReader("{}")), length: 2},
		{name: "upgrade", method: http.MethodGet, target: "/exec", header: http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}}},
		{name: "semicolon in the query", method: http.MethodGet, target: "/?a=1;b=2"},
		{name: "broken escape in the query", method: http.MethodGet, target: "/?a=%zz"},
		{name: "escape cut short", method: http.MethodGet, target: "/?a=%2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, "https://cluster-x.proxy.test"+tc.target, nil)
			if tc.body != nil {
				r.Body = tc.body
			}
			r.ContentLength = tc.length
			for k, vv := range tc.header {
				r.Header[k] = vv
			}
			rec := httptest.NewRecorder()
			taken := s.serveShort(rec, r, "cluster-x", func(*http.Response) {})
			assert.Equal(t, tc.taken, taken)
			if tc.taken {
				assert.Equal(t, http.StatusServiceUnavailable, rec.Code)
				assert.Contains(t, rec.Body.String(), "no agent connected for cluster-x")
			} else {
				assert.Zero(t, rec.Body.Len(), "nothing written")
				assert.Empty(t, rec.Header(), "nothing written")
			}
		})
	}
}

func TestCleanQuery(t *testing.T) {
	for q, want := range map[string]bool{
		"": true, "a=1&b=2": true, "labelSelector=app%3Dweb": true, "a=%2F%2f": true,
		"a=1;b=2": false, "a=%": false, "a=%2": false, "a=%g0": false, "a=%0g": false,
	} {
		assert.Equal(t, want, cleanQuery(q), "%q", q)
	}
}

// An event stream is flushed at every write whatever its length, as
// ReverseProxy flushes one: its media type, case folded, parameters
// dropped.
func TestIsEventStream(t *testing.T) {
	for ct, want := range map[string]bool{
		"text/event-stream": true, "text/event-stream; charset=utf-8": true, "Text/Event-Stream": true,
		"text/event-streams": false, "text/plain": false, "": false,
	} {
		assert.Equal(t, want, isEventStream(http.Header{"Content-Type": {ct}}), "%q", ct)
	}
}
