package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubereq"
	"github.com/spectroproxy/spectro-proxy/internal/kubestatus"
	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// route is one hostname label the agent serves and the target behind it.
type route struct {
	label  string
	mode   tunnel.Mode
	target *url.URL
	// tlsConf is used for https targets (nil for http).
	tlsConf *tls.Config
	proxy   *httputil.ReverseProxy
	// transport is proxy's, to close its idle connections at the end.
	transport splitTransport
	dialer    *net.Dialer
}

func buildRoutes(cfg *Config) (map[string]*route, error) {
	routes := map[string]*route{}
	// Resumed sessions: each spliced connection (every kubectl command,
	// every HTTP/1.1 client's connection) is a new connection of the
	// agent's to its target, and a resumed handshake skips the
	// certificate's signature and its chain's verification.
	apiTLS := &tls.Config{MinVersion: tls.VersionTLS12, ClientSessionCache: tls.NewLRUClientSessionCache(64)}
	// The API server's CA matters where the agent speaks TLS to it itself:
	// terminate mode, which auto mode may choose (and the kubeconfig
	// skeleton of passthrough mode carries it).
	if pemCerts, err := os.ReadFile(cfg.APIServerCAFile); err == nil {
		if apiTLS.RootCAs, err = pki.Pool(pemCerts); err != nil {
			return nil, fmt.Errorf("api server CA %s: %w", cfg.APIServerCAFile, err)
		}
	} else if cfg.Mode != tunnel.Passthrough {
		return nil, fmt.Errorf("reading api server CA (needed in %s mode): %w", cfg.Mode, err)
	}
	add := func(label string, mode tunnel.Mode, target string, tlsConf *tls.Config) error {
		u, err := url.Parse(target)
		if err != nil {
			return err
		}
		if u.Port() == "" {
			port := "443"
			if u.Scheme == "http" {
				port = "80"
			}
			u.Host = net.JoinHostPort(u.Hostname(), port)
		}
		r := &route{label: label, mode: mode, target: u, dialer: &net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 30 * time.Second}}
		if u.Scheme == "https" {
			r.tlsConf = tlsConf.Clone()
			r.tlsConf.ServerName = u.Hostname()
		}
		r.proxy = newReverseProxy(r, cfg)
		routes[label] = r
		return nil
	}
	// In auto mode the route's mode is set by Run before the first connect.
	if err := add(cfg.Subdomain, cfg.Mode, cfg.APIServer, apiTLS); err != nil {
		return nil, fmt.Errorf("api server route: %w", err)
	}
	dashTLS := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: cfg.DashboardInsecureSkipVerify, ClientSessionCache: tls.NewLRUClientSessionCache(64)} //nolint:gosec // in-cluster dashboards are self-signed; opt-out flag exists
	if cfg.K8sDashboardURL != "" {
		if err := add(hostname.Dashboard(cfg.Subdomain), tunnel.Terminate, cfg.K8sDashboardURL, dashTLS); err != nil {
			return nil, fmt.Errorf("dashboard route: %w", err)
		}
	}
	if cfg.VMDashboardURL != "" {
		if err := add(hostname.VMDashboard(cfg.Subdomain), tunnel.Terminate, cfg.VMDashboardURL, dashTLS); err != nil {
			return nil, fmt.Errorf("vm dashboard route: %w", err)
		}
	}
	return routes, nil
}

func newReverseProxy(r *route, cfg *Config) *httputil.ReverseProxy {
	long := &http.Transport{
		// Queued writes under TLS: net/http's HTTP/2 client writes each
		// request's headers with a syscall of its own, holding the
		// connection's write lock, while many requests are in flight
		// (11-17% of the agent's CPU in terminate-mode small GETs at 64
		// concurrent; see docs/performance.md). Queued, the headers of
		// concurrent requests leave together.
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := r.dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return tunnel.NewQueuedConn(c), nil
		},
		TLSClientConfig:        r.tlsConf,
		ForceAttemptHTTP2:      true,
		MaxIdleConnsPerHost:    64,
		IdleConnTimeout:        90 * time.Second,
		TLSHandshakeTimeout:    cfg.DialTimeout,
		ResponseHeaderTimeout:  0, // watches answer headers at once, but long polls may not
		MaxResponseHeaderBytes: tunnel.MaxResponseHeaderBytes,
	}
	// The same settings over HTTP/1.1 keep-alive connections, written to
	// directly (no queue): one write per request already, and no HTTP/2
	// stream (handler goroutine, serve loop handoffs, HPACK) on the API
	// server or here. Terminate-mode
	// small GETs at 1 concurrent: p50 921-951 -> 656-696 µs (HTTP/1.1
	// clients), 919-992 -> 731-754 µs (HTTP/2); see docs/performance.md.
	short := long.Clone()
	short.DialContext = r.dialer.DialContext
	short.ForceAttemptHTTP2 = false
	short.TLSClientConfig = http1Only(r.tlsConf)
	short.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	r.transport = splitTransport{short: short, long: long}
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(r.target)
			// Keep the public host name: dashboards build redirects and
			// cookies from it, and the API server does not care.
			pr.Out.Host = pr.In.Host
			tunnel.StripInternal(pr.Out.Header)
			// SetXForwarded is not called: the relay already set the
			// X-Forwarded-* headers for the real client, and Rewrite
			// starts without them. X-Forwarded-Proto matters most: a
			// dashboard on plain HTTP (useInsecurePort) builds its login
			// redirect from it, and without it sends the browser to
			// http://, where the relay does not listen.
			for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
				pr.Out.Header[h] = pr.In.Header[h]
			}
		},
		Transport:  r.transport,
		BufferPool: tunnel.ProxyBuffers, // serveStream sizes them per response
		// Zero, not -1: ReverseProxy flushes every write anyway when the
		// length is unknown (watches, logs -f, event streams), and a
		// response of known length then leaves as one write instead of
		// a flush each for headers, body and end of stream (make bench,
		// terminate mode: see the commit that set it).
		FlushInterval: 0,
		ErrorHandler: func(w http.ResponseWriter, req *http.Request, err error) {
			cfg.Logger.Warn("forwarding request", "host", r.label, "target", r.target.String(), "error", err)
			kubestatus.Write(w, http.StatusBadGateway, "BadGateway",
				fmt.Sprintf("spectro-proxy agent could not reach %s: %v", r.target.Host, err))
		},
	}
}

// splitTransport sends requests without a body that end soon (gets,
// lists, deletes) over HTTP/1.1 keep-alive connections, which answer
// sooner, and the rest over HTTP/2 as before: watches and followed logs,
// any number of which share one connection to the API server, and
// requests with a body, whose response may stream back while the body
// still arrives (an HTTP/1.1 server may cut such a body). Telling watches
// apart is only about cost: on HTTP/1.1 one would hold a connection.
type splitTransport struct{ short, long http.RoundTripper }

func (t splitTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if kubereq.Short(req) {
		return t.short.RoundTrip(req)
	}
	return t.long.RoundTrip(req)
}

// CloseIdleConnections closes both transports' idle connections (when
// the agent stops: their reader goroutines end with them).
func (t splitTransport) CloseIdleConnections() {
	for _, rt := range []http.RoundTripper{t.short, t.long} {
		if c, ok := rt.(interface{ CloseIdleConnections() }); ok {
			c.CloseIdleConnections()
		}
	}
}

// http1Only returns c (nil for plain http) offering only HTTP/1.1.
func http1Only(c *tls.Config) *tls.Config {
	if c == nil {
		return nil
	}
	c = c.Clone()
	c.NextProtos = []string{"http/1.1"}
	return c
}

// serveStream handles one stream the relay opened.
func (c *Client) serveStream(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect {
		rt, ok := c.routes[r.Host]
		if !ok {
			tunnel.RefuseStream(w, http.StatusNotFound, "no route "+r.Host)
			return
		}
		switch r.Header.Get(tunnel.HeaderStream) {
		case tunnel.StreamTCP:
			if rt.mode != tunnel.Passthrough {
				tunnel.RefuseStream(w, http.StatusForbidden, "route "+rt.label+" is not passthrough")
				return
			}
			c.serveTCP(w, r, rt)
		case tunnel.StreamUpgrade:
			// Upgrades are HTTP: only a route whose TLS the relay
			// terminates sends them.
			if rt.mode != tunnel.Terminate {
				tunnel.RefuseStream(w, http.StatusForbidden, "route "+rt.label+" is not terminate")
				return
			}
			c.serveUpgrade(w, r, rt)
		case tunnel.StreamHTTP:
			if rt.mode != tunnel.Terminate {
				tunnel.RefuseStream(w, http.StatusForbidden, "route "+rt.label+" is not terminate")
				return
			}
			c.serveHTTPConn(w, r, rt)
		case tunnel.StreamH2:
			// The relay reads nothing of a spliced connection's answers,
			// so a dashboard's (whose cookies it must rewrite) never is.
			if rt.mode != tunnel.Terminate || rt.label != c.cfg.Subdomain || rt.tlsConf == nil {
				tunnel.RefuseStream(w, http.StatusForbidden, "route "+rt.label+" does not take HTTP/2 connections")
				return
			}
			c.serveH2Conn(w, r, rt)
		default:
			tunnel.RefuseStream(w, http.StatusBadRequest, "unknown stream kind")
		}
		return
	}
	rt, ok := c.routes[r.Header.Get(tunnel.HeaderRoute)]
	if !ok {
		kubestatus.Write(w, http.StatusNotFound, "NotFound", "spectro-proxy agent has no route "+r.Header.Get(tunnel.HeaderRoute))
		return
	}
	if rt.mode != tunnel.Terminate {
		kubestatus.Write(w, http.StatusForbidden, "Forbidden", "spectro-proxy agent: route "+rt.label+" is not terminate")
		return
	}
	// The route's proxy, with copy buffers sized for this response (see
	// tunnel.ResponseBuffers): a shallow copy per request.
	rp := *rt.proxy
	bufs := &tunnel.ResponseBuffers{}
	rp.BufferPool = bufs
	rp.ModifyResponse = func(resp *http.Response) error { bufs.Size(resp); return nil }
	rp.ServeHTTP(w, r)
}

func (c *Client) serveTCP(w http.ResponseWriter, r *http.Request, rt *route) {
	c.joinTarget(w, r, rt, "stream", func(ctx context.Context) (net.Conn, error) {
		return rt.dialer.DialContext(ctx, "tcp", rt.target.Host)
	})
}

// serveHTTPConn joins an HTTP/1.1 connection the relay writes requests on
// to a connection of the agent's own to the target. The agent reads none
// of it: the relay has done each request's work (X-Forwarded-*, the
// tunnel's own headers dropped, the public host kept), and the target
// answers in the same bytes. That spares every small request an HTTP/2
// stream, a handler and a second proxy on the agent (docs/performance.md).
func (c *Client) serveHTTPConn(w http.ResponseWriter, r *http.Request, rt *route) {
	c.joinTarget(w, r, rt, "http connection", func(ctx context.Context) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout) // the TLS handshake too
		defer cancel()
		return c.dialTarget(ctx, rt)
	})
}

// serveH2Conn joins a client's HTTP/2 connection, spliced by the relay,
// to an HTTP/2 connection of the agent's own to the target.
func (c *Client) serveH2Conn(w http.ResponseWriter, r *http.Request, rt *route) {
	c.joinTarget(w, r, rt, "http/2 connection", func(ctx context.Context) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
		defer cancel()
		return c.dialTLS(ctx, rt, "h2")
	})
}

// noH2Error: the target's TLS did not negotiate HTTP/2.
type noH2Error struct{ target, got string }

func (e *noH2Error) Error() string {
	return fmt.Sprintf("%s does not speak HTTP/2 (negotiated %q)", e.target, e.got)
}

// joinTarget connects to rt's target with dial and joins the stream to
// it; when the target cannot be reached it refuses the stream with the
// reason, which the relay reports (505 for a target without HTTP/2, which
// the relay then stops asking for it).
func (c *Client) joinTarget(w http.ResponseWriter, r *http.Request, rt *route, what string, dial func(context.Context) (net.Conn, error)) {
	target, err := dial(r.Context())
	var noH2 *noH2Error
	if errors.As(err, &noH2) {
		c.log.Info("target does not speak HTTP/2; the relay will send its requests one by one", "host", rt.label, "target", rt.target.Host, "negotiated", noH2.got)
		tunnel.RefuseStream(w, http.StatusHTTPVersionNotSupported, err.Error())
		return
	}
	if err != nil {
		c.log.Warn("dialing target", "host", rt.label, "target", rt.target.Host, "error", err)
		tunnel.RefuseStream(w, http.StatusBadGateway, fmt.Sprintf("spectro-proxy agent could not reach %s: %v", rt.target.Host, err))
		return
	}
	st, err := tunnel.AcceptStream(w, r)
	if err != nil {
		target.Close()
		return
	}
	up, down, err := st.Join(target, nil)
	c.log.Debug(what+" closed", "host", rt.label, "to_target", up, "from_target", down, "error", err)
}

// serveUpgrade forwards an HTTP/1.1 Upgrade request (exec, attach,
// port-forward, dashboard WebSockets) and then carries raw bytes.
func (c *Client) serveUpgrade(w http.ResponseWriter, r *http.Request, rt *route) {
	st, err := tunnel.AcceptStream(w, r)
	if err != nil {
		return
	}
	// Bounded: the request line and headers are a user's bytes.
	lim := &tunnel.HeaderLimitReader{R: r.Body, N: tunnel.MaxUpgradeRequestHeaderBytes}
	br := bufio.NewReader(lim)
	req, err := http.ReadRequest(br)
	if err != nil {
		reason := "bad_request"
		if tunnel.IsHeaderTooLarge(err) {
			reason = "headers_too_large"
		}
		c.log.Warn("reading upgrade request", "host", rt.label, "reason", reason, "limit_bytes", tunnel.MaxUpgradeRequestHeaderBytes, "error", err)
		return
	}
	lim.Lift()
	ctx, cancel := context.WithTimeout(r.Context(), c.cfg.DialTimeout)
	target, err := c.dialTarget(ctx, rt)
	cancel()
	if err != nil {
		c.log.Warn("dialing target", "host", rt.label, "target", rt.target.Host, "error", err)
		resp := &http.Response{StatusCode: http.StatusBadGateway, ProtoMajor: 1, ProtoMinor: 1, Close: true,
			Header: http.Header{"Content-Type": {"text/plain"}}}
		msg := fmt.Sprintf("spectro-proxy agent could not reach %s: %v\n", rt.target.Host, err)
		resp.ContentLength = int64(len(msg))
		resp.Body = http.NoBody
		_ = resp.Write(st)
		_, _ = st.Write([]byte(msg))
		return
	}
	tunnel.StripInternal(req.Header)
	if err := req.Write(target); err != nil {
		target.Close()
		return
	}
	up, down, err := st.Join(target, br)
	c.log.Debug("upgrade closed", "host", rt.label, "to_target", up, "from_target", down, "error", err)
}

func (c *Client) dialTarget(ctx context.Context, rt *route) (net.Conn, error) {
	if rt.tlsConf == nil {
		return rt.dialer.DialContext(ctx, "tcp", rt.target.Host)
	}
	// Upgrade does not exist in HTTP/2; the relay's connections speak HTTP/1.1.
	return c.dialTLS(ctx, rt, "http/1.1")
}

// dialTLS connects to rt's https target and negotiates proto.
func (c *Client) dialTLS(ctx context.Context, rt *route, proto string) (net.Conn, error) {
	conn, err := rt.dialer.DialContext(ctx, "tcp", rt.target.Host)
	if err != nil {
		return nil, err
	}
	conf := rt.tlsConf.Clone()
	conf.NextProtos = []string{proto}
	if proto == "h2" {
		// Offered too, so that a server without HTTP/2 completes the
		// handshake (Go's refuses one with no protocol in common) and
		// the refusal can say what it speaks.
		conf.NextProtos = append(conf.NextProtos, "http/1.1")
	}
	tc := tls.Client(conn, conf)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("TLS handshake with %s: %w", rt.target.Host, err)
	}
	if got := tc.ConnectionState().NegotiatedProtocol; got != proto && proto == "h2" {
		tc.Close()
		return nil, &noH2Error{target: rt.target.Host, got: got}
	}
	return tc, nil
}
