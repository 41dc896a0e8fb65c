package client

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// FuzzServeStream hands the agent's stream handler what a relay (or
// whoever holds a tunnel) can put in a stream's setup: method, :authority,
// the stream kind and route headers, and the first bytes of the body (for
// an upgrade stream, the HTTP/1.1 request the agent parses). The agent must
// answer every one with a status, never panic, and never reach a target
// for a label it does not serve.
func FuzzServeStream(f *testing.F) {
	// A target that hangs up at once: the fuzzer exercises parsing and
	// routing, not the target.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	})
	f.Cleanup(func() { ln.Close(); wg.Wait() })
	target := "http://" + ln.Addr().String()
	c, err := New(Config{Server: "proxy.test", ClusterUID: "abc", Mode: tunnel.Passthrough, APIServer: target, APIServerCAFile: "/nonexistent",
		K8sDashboardURL: target, AgentID: "fuzz", DialTimeout: time.Second})
	if err != nil {
		f.Fatal(err)
	}

	f.Add("CONNECT", "cluster-abc", tunnel.StreamTCP, "", []byte("\x16\x03\x01"))
	f.Add("CONNECT", "cluster-abc-dashboard", tunnel.StreamUpgrade, "", []byte("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"))
	f.Add("CONNECT", "cluster-abc-dashboard", tunnel.StreamTCP, "", []byte{})
	f.Add("CONNECT", "cluster-other", tunnel.StreamTCP, "", []byte{})
	f.Add("CONNECT", "cluster-abc", "udp", "", []byte{})
	f.Add("GET", "cluster-abc-dashboard.proxy.test", "", "cluster-abc-dashboard", []byte{})
	f.Add("POST", "x", "", "cluster-nope", []byte("body"))
	f.Add("CONNECT", "cluster-abc-dashboard", tunnel.StreamUpgrade, "", []byte("GARBAGE\r\n\r\n"))
	f.Fuzz(func(t *testing.T, method, host, kind, route string, body []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r := (&http.Request{
			Method: method, URL: &url.URL{Path: "/"}, Host: host, Proto: "HTTP/2.0", ProtoMajor: 2,
			Header: http.Header{tunnel.HeaderStream: {kind}, tunnel.HeaderRoute: {route}},
			Body:   io.NopCloser(bytes.NewReader(body)),
		}).WithContext(ctx)
		w := httptest.NewRecorder()
		c.serveStream(w, r)
		allowed := []int{http.StatusOK, http.StatusBadRequest, http.StatusForbidden, http.StatusNotFound, http.StatusBadGateway}
		if !slices.Contains(allowed, w.Code) {
			t.Fatalf("status %d for %s %q kind %q route %q", w.Code, method, host, kind, route)
		}
		label := host
		if method != http.MethodConnect {
			label = route
		}
		if _, served := c.routes[label]; !served && w.Code != http.StatusNotFound {
			t.Fatalf("label %q is not served but got %d", label, w.Code)
		}
	})
}
