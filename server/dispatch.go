package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	fleet "github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/sni"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Where each public connection goes. The SNI router (handleConn) reads a
// connection's server name and sends it to the relay's own API, down a
// tunnel as raw TLS (passthrough.go), or to the HTTPS server for a
// terminate-mode route (terminate.go); serveHTTPS sorts what the HTTPS
// server reads the same way.

// handleConn routes one public connection by its server name.
func (s *Server) handleConn(ctx context.Context, conn net.Conn) {
	conn = &stallConn{Conn: conn, d: s.cfg.WriteStallTimeout}
	remote := conn.RemoteAddr().String()
	src := sourceOf(remote)
	entry, evicted, ok := s.hellos.enter(src, conn)
	if !ok {
		s.refuse(reasonTooManyHellos, "remote", remote)
		conn.Close()
		return
	}
	if evicted != "" {
		s.refuse(reasonHelloEvicted, "source", evicted, "for", remote)
	}
	name, pc, err := sni.Peek(conn, s.cfg.HelloTimeout)
	if s.hellos.leave(entry) {
		conn.Close() // evicted: counted above
		return
	}
	if err != nil {
		reason := reasonNotTLS
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			reason = reasonHelloTimeout
		}
		s.refuse(reason, "remote", conn.RemoteAddr().String(), "error", err.Error())
		conn.Close()
		return
	}
	name = hostname.Canonical(name)
	if name == s.cfg.Domain {
		s.handOff(pc)
		return
	}
	label, ok := s.labelOf(name)
	if !ok {
		reason := reasonUnknownHost
		if name == "" {
			reason = reasonNoServerName
		}
		s.refuse(reason, "host", name, "remote", conn.RemoteAddr().String())
		_ = sni.WriteAlert(conn, sni.AlertUnrecognizedName)
		conn.Close()
		return
	}
	cands, mode, known := s.reg.candidates(label)
	var holders []fleet.Holder
	if len(cands) == 0 {
		// No local tunnel: another replica's, with its mode, if any.
		if holders = s.holders(label); len(holders) > 0 {
			mode, known = tunnel.Mode(holders[0].Mode), true
			s.reg.remember(label, mode)
		}
	}
	if !known {
		s.refuse(reasonUnknownHost, "host", name, "remote", conn.RemoteAddr().String())
		_ = sni.WriteAlert(conn, sni.AlertUnrecognizedName)
		conn.Close()
		return
	}
	if mode == "terminate" {
		// TLS ends here; HTTP requests then go down the tunnel one stream
		// each (and "agent not connected" can be said in HTTP), or the
		// whole connection in one (splice.go).
		s.terminate(ctx, pc, name, label, cands)
		return
	}
	if len(holders) > 0 {
		s.forwardConn(ctx, pc, name, label, holders)
		return
	}
	s.passthrough(ctx, pc, label, cands)
}

// handOff terminates TLS and gives the connection to the HTTPS server.
func (s *Server) handOff(c net.Conn) {
	s.pushHTTPS(s.serverTLS(c))
}

// serverTLS is the relay's TLS server side of c, over a watchedConn.
func (s *Server) serverTLS(c net.Conn) (*tls.Conn, *watchedConn) {
	wc := &watchedConn{Conn: c}
	// Tunnels batch their TLS records into one write per message; other
	// connections write through.
	return tls.Server(tunnel.NewBatchConn(wc), s.tlsConf), wc
}

// pushHTTPS gives tc, over wc, to the HTTPS server.
func (s *Server) pushHTTPS(tc *tls.Conn, wc *watchedConn) {
	s.watched.Store(tc, wc)
	if !s.httpLn.push(tc) {
		s.watched.Delete(tc)
		tc.Close()
	}
}

// connState explains connections the HTTPS server closed before a single
// request reached serveHTTPS, which net/http does silently: a slow handshake or slow
// headers (slowloris), headers over MaxHeaderBytes (answered 431), or
// nothing usable at all (a failed TLS handshake, a bad request, a client
// that only connected).
func (s *Server) connState(c net.Conn, state http.ConnState) {
	switch state {
	case http.StateNew:
		// Until its first request a new connection is in flight: its TLS
		// handshake is the costliest part of it, and a wave of agents
		// reconnecting (a relay restart) is all handshakes.
		if s.idle.add(c, sourceOf(c.RemoteAddr().String())) {
			s.inFlight.Add(1)
		}
	case http.StateIdle:
		if !s.idle.enter(c, func() string { return sourceOf(c.RemoteAddr().String()) }) {
			s.refuse(reasonTooManyIdleConns, "remote", c.RemoteAddr().String(), "max", s.cfg.MaxIdleConnsPerSource)
			c.Close()
		}
	case http.StateActive:
		if s.idle.leave(c) {
			s.inFlight.Add(-1)
		}
		s.queueHTTP2Writes(c)
	case http.StateHijacked:
		if s.idle.remove(c) {
			s.inFlight.Add(-1)
		}
		s.watched.Delete(c)
	case http.StateClosed:
		if s.idle.remove(c) {
			s.inFlight.Add(-1)
		}
		v, ok := s.watched.LoadAndDelete(c)
		if !ok {
			return
		}
		wc := v.(*watchedConn)
		remote := wc.RemoteAddr().String()
		switch {
		case wc.timedOut.Load():
			s.refuse(reasonRequestTimeout, "remote", remote, "timeout", s.cfg.RequestHeaderTimeout.String())
		case wc.read.Load() > int64(s.cfg.MaxHeaderBytes):
			s.refuse(reasonHeadersTooLarge, "remote", remote, "read_bytes", wc.read.Load(), "max_header_bytes", s.cfg.MaxHeaderBytes)
		default:
			s.noRequest(remote)
		}
	}
}

// noRequest counts a connection that ended before any request: common
// and harmless (probes, clients that gave up), so logged only at debug
// level.
func (s *Server) noRequest(remote string, args ...any) {
	s.m.refusals.WithLabelValues(reasonNoRequest).Inc()
	s.log.Debug("refused", append([]any{"reason", reasonNoRequest, "remote", remote}, args...)...)
}

// misdirected says whether a request for host (lower case, no port) on a
// connection for name is for another of the relay's names. A host outside
// the domain (kubectl with tls-server-name dialing 127.0.0.1) is not: the
// connection's name alone says where it goes then.
func (s *Server) misdirected(host, name string) bool {
	return host != name && hostname.InDomain(host, s.cfg.Domain)
}

// labelOf returns the label of a name one level under the relay's domain.
func (s *Server) labelOf(name string) (string, bool) {
	return hostname.LabelOf(name, s.cfg.Domain)
}

// connKey is the context key of a request's connection.
type connKey struct{}

// serveHTTPS serves connections whose TLS the relay terminated.
func (s *Server) serveHTTPS(w http.ResponseWriter, r *http.Request) {
	if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
		s.watched.Delete(c)
	}
	name := hostname.Canonical(r.TLS.ServerName)
	if name == s.cfg.Domain || name == "" {
		// A cluster's host on a connection for the relay itself (or one
		// without SNI) is misdirected too, not a 404 of the relay's API.
		if host := hostname.OfAuthority(r.Host); s.misdirected(host, s.cfg.Domain) {
			s.refuse(reasonMisdirected, "host", host, "sni", name, "remote", r.RemoteAddr)
			http.Error(w, "spectro-proxy: request for "+host+" on a connection for "+s.cfg.Domain, http.StatusMisdirectedRequest)
			return
		}
		s.api.ServeHTTP(w, r)
		return
	}
	// Browsers reuse an HTTP/2 connection for any host its certificate
	// covers, and ours covers *.domain: a request for one cluster could
	// arrive on a connection opened for another. 421 makes the client
	// retry on a connection of its own, so routing by SNI stays right.
	if host := hostname.OfAuthority(r.Host); s.misdirected(host, name) {
		s.refuse(reasonMisdirected, "host", host, "sni", name, "remote", r.RemoteAddr)
		http.Error(w, "spectro-proxy: request for "+host+" on a connection for "+name, http.StatusMisdirectedRequest)
		return
	}
	label, _ := s.labelOf(name)
	s.serveTerminated(w, r, label)
}

func stripPort(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

// watchedConn sits under the TLS of a connection handed to the HTTPS
// server and notes what the HTTPS server does not say: whether a read hit
// its deadline (a slow client) and how much was read. When the connection
// closes before any request was served, that tells why (see connState).
type watchedConn struct {
	net.Conn
	read     atomic.Int64
	timedOut atomic.Bool
	// protoSeen: queueHTTP2Writes has looked at the connection's protocol.
	protoSeen atomic.Bool
}

// queueHTTP2Writes queues the writes of a public connection that speaks
// HTTP/2 (tunnel.QueueWrites), once, at its first state change after the
// handshake.
func (s *Server) queueHTTP2Writes(c net.Conn) {
	v, ok := s.watched.Load(c)
	if !ok {
		return
	}
	if v.(*watchedConn).protoSeen.Swap(true) {
		return
	}
	if tc, ok := c.(*tls.Conn); ok && tc.ConnectionState().NegotiatedProtocol == "h2" {
		tunnel.QueueWrites(tc)
	}
}

func (w *watchedConn) Read(p []byte) (int, error) {
	n, err := w.Conn.Read(p)
	w.read.Add(int64(n))
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		w.timedOut.Store(true)
	}
	return n, err
}

// stallConn cuts a connection whose peer takes no data for d: each write
// must finish within d (to 1.5 d). Nothing else in the relay sets write
// deadlines on public connections. (Passthrough streams, tunnels and
// HTTP/1 clients are all covered here; streams of an HTTP/2 connection,
// which can stall one at a time, by stallWriter.)
//
// A write moves the deadline only once less than d of it remains, to 1.5 d
// ahead, and leaves it set: moving a socket's deadline is a runtime timer
// operation, and setting and clearing it around every write was 4.5% of
// the relay's CPU in passthrough small GETs (make bench, profiled). A
// deadline that passes between writes harms nothing: the next write moves
// it first.
type stallConn struct {
	net.Conn
	d time.Duration
	// until is the deadline the writes armed, in Unix nanoseconds; 0 when
	// none is, or a deadline was set from outside since (net/http's
	// handshake timeout, gorilla's per-message deadline), which the next
	// write must replace.
	until atomic.Int64
}

func (c *stallConn) Write(p []byte) (int, error) {
	now := time.Now()
	if u := c.until.Load(); u == 0 || u-now.UnixNano() < int64(c.d) {
		until := now.Add(c.d + c.d/2)
		_ = c.Conn.SetWriteDeadline(until)
		c.until.Store(until.UnixNano())
	}
	return c.Conn.Write(p)
}

func (c *stallConn) SetWriteDeadline(t time.Time) error {
	c.until.Store(0)
	return c.Conn.SetWriteDeadline(t)
}

func (c *stallConn) SetDeadline(t time.Time) error {
	c.until.Store(0)
	return c.Conn.SetDeadline(t)
}

func (c *stallConn) CloseWrite() error { return tunnel.CloseWrite(c.Conn) }

// connListener is a net.Listener fed by the SNI router.
type connListener struct {
	ch     chan net.Conn
	done   chan struct{}
	once   sync.Once
	mu     sync.RWMutex
	closed bool
}

func newConnListener() *connListener {
	return &connListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *connListener) push(c net.Conn) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return false
	}
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.mu.Lock()
		l.closed = true
		l.mu.Unlock()
	})
	return nil
}

func (l *connListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
