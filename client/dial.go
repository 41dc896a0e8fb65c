package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"golang.org/x/net/http/httpproxy"
)

// relayDialer opens the TCP connection to the relay: directly, or through
// an HTTP proxy with CONNECT when the proxy configuration says so (private
// networks often reach the internet only that way). Only the relay
// connection uses it; in-cluster dials (API server, dashboards, the
// ConfigMap writer) never go through a proxy.
type relayDialer struct {
	// addr is the relay's host:port, and the CONNECT target through a
	// proxy: Server:Port, or RelayAddress when set (so runs without DNS
	// work through a proxy too).
	addr  string
	proxy *url.URL // nil: dial directly
	nd    *net.Dialer
}

// newRelayDialer picks the proxy for the relay once. NO_PROXY is matched
// against the relay's domain and port (wss:// is https:// to a proxy, so
// HTTPS_PROXY applies and HTTP_PROXY does not, as in Go and curl).
func newRelayDialer(cfg *Config, nd *net.Dialer) (*relayDialer, error) {
	d := &relayDialer{addr: cfg.relayAddr(), nd: nd}
	pc := cfg.Proxy
	if pc == nil {
		pc = httpproxy.FromEnvironment()
		if pc.HTTPSProxy == "" && pc.HTTPProxy != "" {
			cfg.Logger.Warn("HTTP_PROXY is set but HTTPS_PROXY is not: the relay connection is HTTPS, so it does not use HTTP_PROXY; set HTTPS_PROXY to reach the relay through a proxy")
		}
	}
	target := &url.URL{Scheme: "https", Host: net.JoinHostPort(cfg.Server, strconv.Itoa(cfg.Port))}
	p, err := pc.ProxyFunc()(target)
	if err != nil {
		return nil, fmt.Errorf("proxy for the relay (HTTPS_PROXY): %w", err)
	}
	if p == nil {
		return d, nil
	}
	if p.Scheme != "http" && p.Scheme != "https" {
		return nil, fmt.Errorf("proxy %s: scheme %q is not supported (want http:// or https://)", p.Redacted(), p.Scheme)
	}
	d.proxy = p
	return d, nil
}

// DialContext returns a connection on which the relay's TLS handshake can
// start.
func (d *relayDialer) DialContext(ctx context.Context) (net.Conn, error) {
	if d.proxy == nil {
		return d.nd.DialContext(ctx, "tcp", d.addr)
	}
	return d.dialProxy(ctx)
}

// proxyName names the proxy in logs and errors, without its password.
func (d *relayDialer) proxyName() string {
	if d.proxy == nil {
		return ""
	}
	return d.proxy.Redacted()
}

// dialProxy asks the proxy for a tunnel to the relay (HTTP CONNECT), with
// Basic credentials from the proxy URL's user info. Every error names the
// proxy (never its password), so a refusal is told apart from a relay
// problem at a glance.
func (d *relayDialer) dialProxy(ctx context.Context) (net.Conn, error) {
	name := d.proxyName()
	host := d.proxy.Host
	if d.proxy.Port() == "" {
		port := "80"
		if d.proxy.Scheme == "https" {
			port = "443"
		}
		host = net.JoinHostPort(d.proxy.Hostname(), port)
	}
	conn, err := d.nd.DialContext(ctx, "tcp", host)
	if err != nil {
		return nil, fmt.Errorf("dialing proxy %s: %w", name, err)
	}
	// The exchange below has no context of its own: a cancelled or
	// expired ctx ends it through the connection's deadline.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if d.proxy.Scheme == "https" {
		tc := tls.Client(conn, &tls.Config{ServerName: d.proxy.Hostname(), MinVersion: tls.VersionTLS12})
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("TLS handshake with proxy %s: %w", name, err)
		}
		conn = tc
	}
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: d.addr},
		Host:   d.addr,
		Header: http.Header{},
	}
	if u := d.proxy.User; u != nil {
		pw, _ := u.Password()
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)))
	}
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, fmt.Errorf("sending CONNECT %s to proxy %s: %w", d.addr, name, errors.Join(err, ctx.Err()))
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading proxy %s's answer to CONNECT %s: %w", name, d.addr, errors.Join(err, ctx.Err()))
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		conn.Close()
		hint := ""
		switch resp.StatusCode {
		case http.StatusProxyAuthRequired, http.StatusUnauthorized: // tinyproxy answers 401 to wrong credentials
			if d.proxy.User == nil {
				hint = " (the proxy wants credentials: put them in the proxy URL, http://user:password@host:port)"
			} else {
				hint = " (the proxy did not accept the credentials in the proxy URL)"
			}
		case http.StatusForbidden:
			hint = " (the proxy does not allow CONNECT to the relay's address and port)"
		}
		return nil, fmt.Errorf("proxy %s refused CONNECT %s: %s%s", name, d.addr, resp.Status, hint)
	}
	if !stop() {
		// ctx ended just now, and the deadline may already be set.
		conn.Close()
		return nil, fmt.Errorf("CONNECT %s through proxy %s: %w", d.addr, name, ctx.Err())
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, err
	}
	if br.Buffered() > 0 {
		// The relay speaks only after the agent's ClientHello, but a proxy
		// could send early bytes; keep them.
		return &bufferedConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

// bufferedConn replays what a bufio.Reader read past the proxy's answer.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
