package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/url"
	"os"

	"golang.org/x/net/http2/hpack"

	"github.com/spectroproxy/spectro-proxy/internal/h1splice"
	"github.com/spectroproxy/spectro-proxy/internal/h2splice"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubereq"
	"github.com/spectroproxy/spectro-proxy/internal/sni"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// A terminate-mode connection to a cluster's API server is spliced: the
// relay ends its TLS and carries its bytes down one stream, onto a
// connection the agent opens to the API server in the same protocol. A
// client that speaks HTTP/2 (kubectl, client-go, browsers) gets an
// HTTP/2 connection (tunnel.StreamH2, h2splice); one that speaks
// HTTP/1.1 (curl, scripts, exec's upgrades) an HTTP/1.1 one
// (tunnel.StreamHTTP, h1splice). Per request that costs the relay a
// header block's parsing (to keep the connection on its host, and to set
// X-Forwarded-*) instead of an HTTP server's and a client's work: the
// floors' design, which the second HTTPS stack kept terminate mode far
// from (docs/performance.md, twelfth and thirteenth passes).
//
// What the request-by-request path does for each request, a splice does
// per connection or leaves to the API server, as passthrough does: the
// source's stream limit counts the connection; the API server bounds the
// streams on it (and answers CONNECT and odd methods itself);
// over HTTP/2, X-Forwarded-For and -Proto are added after the client's
// own (over HTTP/1.1 they replace them, as on the request-by-request
// path); and the drain tells the client to go away (GOAWAY, or
// Connection: close on its next answer), lets its requests finish, and
// closes the connection once only watches and logs -f are left on it,
// when it ends those of the request-by-request path (an HTTP/1.1 watch at
// a chunk boundary, with its last chunk). The Spectro-Proxy-* fields a
// user sends over HTTP/2 reach the API server, which ignores them: the
// agent reads none of the bytes. Dashboards, connections forwarded to
// another replica's tunnel and agents that predate the stream kinds keep
// the request-by-request path.

// splicedConn is a client's connection as h1splice and h2splice carry it.
type splicedConn interface {
	net.Conn
	// GoAway asks the client to send no new requests on it; true the
	// first time.
	GoAway() bool
	// Shut closes it where no answer is cut.
	Shut()
	// Open counts its open requests: streamed ones (staysOpen) and the
	// rest.
	Open(staysOpen func(path string) bool) (plain, streamed int)
}

// terminate ends a terminate-mode connection's TLS and splices it or
// hands it to the HTTPS server.
func (s *Server) terminate(ctx context.Context, c *sni.Conn, name, label string, cands []*session) {
	var h2, h1 []*session
	if !s.cfg.NoSplice {
		h2, h1 = spliceSessions(label, cands)
	}
	if len(h2)+len(h1) == 0 {
		s.handOff(c)
		return
	}
	tc, wc := s.serverTLS(c)
	// In flight while it lasts, as the HTTPS server's handshakes are
	// (connState): the processors' adaptation counts them.
	s.inFlight.Add(1)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.RequestHeaderTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	s.inFlight.Add(-1)
	if err != nil {
		// As the HTTPS server counts a connection that never made a
		// request (connState).
		s.noRequest(c.RemoteAddr().String(), "error", err)
		c.Close()
		return
	}
	kind, cands := tunnel.StreamH2, h2
	if tc.ConnectionState().NegotiatedProtocol != "h2" {
		kind, cands = tunnel.StreamHTTP, h1
	}
	if len(cands) == 0 || !s.splice(ctx, tc, name, label, kind, cands) {
		s.pushHTTPS(tc, wc)
	}
}

// spliceSessions are the sessions among cands that take label's HTTP/2
// connections, and its HTTP/1.1 ones.
func spliceSessions(label string, cands []*session) (h2, h1 []*session) {
	if hostname.IsDashboard(label) {
		return nil, nil
	}
	for _, sess := range cands {
		if sess.h2Streams && !sess.noH2.Load() {
			h2 = append(h2, sess)
		}
		if sess.httpStreams {
			h1 = append(h1, sess)
		}
	}
	return h2, h1
}

// splice carries tc down a stream of kind (StreamH2 or StreamHTTP); false
// when none could be opened (the HTTPS server then serves tc, and says
// why in HTTP).
func (s *Server) splice(ctx context.Context, tc *tls.Conn, name, label, kind string, cands []*session) bool {
	remote := tc.RemoteAddr().String()
	release, ok := s.srcStreams.enter(sourceOf(remote), label)
	if !ok {
		return false // each request is refused with 429, and why
	}
	defer release()
	st, err := s.openStream(ctx, label, kind, cands)
	if err != nil {
		var re *tunnel.RefusedError
		if kind == tunnel.StreamH2 && errors.As(err, &re) && re.Code == http.StatusHTTPVersionNotSupported {
			// The API server does not speak HTTP/2: requests go one by
			// one on these tunnels from now on.
			for _, sess := range cands {
				sess.noH2.Store(true)
			}
		}
		s.log.Debug("no stream to splice onto; serving requests one by one", "host", label, "remote", remote, "kind", kind, "error", err)
		return false
	}
	var sc splicedConn
	proto := "h2"
	if kind == tunnel.StreamHTTP {
		proto = "http/1.1"
		sc = h1splice.New(tc, h1splice.Options{
			Allow:                  func(host string) bool { return !s.misdirected(host, name) },
			MaxHeaderBytes:         s.cfg.MaxHeaderBytes,
			MaxResponseHeaderBytes: tunnel.MaxResponseHeaderBytes,
			ClientIP:               stripPort(remote),
			Refused: func(err error) {
				switch {
				case errors.Is(err, h1splice.ErrMisdirected):
					s.refuse(reasonMisdirected, "host", label, "sni", name, "remote", remote, "error", err.Error())
				case errors.Is(err, h1splice.ErrProtocol):
					s.refuse(reasonBadHTTP1, "host", label, "remote", remote, "error", err.Error())
				case errors.Is(err, h1splice.ErrUpstreamHeaders):
					s.refuse(reasonUpstreamHeadersTooLarge, "host", label, "remote", remote, "error", err.Error())
				default:
					s.log.Warn("spliced connection's upstream broke HTTP/1.1", "host", label, "remote", remote, "error", err)
				}
			},
		})
	} else {
		sc = s.h2Splice(tc, name, remote)
	}
	s.splices.Store(sc, st.slot.sess)
	defer s.splices.Delete(sc)
	if s.draining.Load() {
		sc.GoAway()
	}
	s.m.splices.WithLabelValues(proto).Inc()
	g := s.m.streams.WithLabelValues("spliced")
	g.Inc()
	defer g.Dec()
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	up, down, err := tunnel.Join(sc, st)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.refuse(reasonWriteStall, "host", label, "remote", remote, "timeout", s.cfg.WriteStallTimeout.String())
	case errors.Is(err, h2splice.ErrProtocol):
		s.refuse(reasonBadHTTP2, "host", label, "remote", remote, "error", err.Error())
	case errors.Is(err, h2splice.ErrUpstream):
		s.log.Warn("spliced connection's upstream broke HTTP/2", "host", label, "remote", remote, "error", err)
	}
	s.m.bytes.WithLabelValues("to_agent").Add(float64(up))
	s.m.bytes.WithLabelValues("from_agent").Add(float64(down))
	s.log.Debug("spliced connection closed", "host", label, "remote", remote, "kind", kind, "up", up, "down", down, "error", err)
	return true
}

// h2Splice wraps an HTTP/2 client's connection for name.
func (s *Server) h2Splice(tc *tls.Conn, name, remote string) *h2splice.Conn {
	return h2splice.New(tc, h2splice.Options{
		Allow: func(host string) bool { return !s.misdirected(host, name) }, // as serveHTTPS's 421
		Misdirected: func(host string) {
			s.refuse(reasonMisdirected, "host", host, "sni", name, "remote", remote)
		},
		MaxHeaderBlock: s.cfg.MaxHeaderBytes,
		// As the request-by-request path's X-Forwarded-*, for the API
		// server's audit log (its sourceIPs), but added after any the
		// client sent rather than instead: a splice cannot take a field
		// out of a compressed header block.
		Extra: h2splice.Fields(
			hpack.HeaderField{Name: "x-forwarded-for", Value: stripPort(remote)},
			hpack.HeaderField{Name: "x-forwarded-proto", Value: "https"}),
	})
}

// splicedPlain counts the requests open on spliced connections that end
// by themselves (not a watch or logs -f).
func (s *Server) splicedPlain() int {
	n := 0
	s.splices.Range(func(k, _ any) bool {
		plain, _ := k.(splicedConn).Open(staysOpen)
		n += plain
		return true
	})
	return n
}

// endSplices closes the spliced connections that carry only streamed
// responses (watches, logs -f), when the drain ends those (drain.go).
// Their clients had the GOAWAY at the drain's start, so each reads "server
// sent GOAWAY and closed the connection", which client-go's watch takes
// for a normal end (utilnet.IsProbableEOF) and re-watches elsewhere. A
// connection with another request still open is left to the drain's
// timeout.
func (s *Server) endSplices() {
	n := 0
	s.splices.Range(func(k, _ any) bool {
		sc := k.(splicedConn)
		if plain, _ := sc.Open(staysOpen); plain == 0 {
			sc.Shut()
			n++
		}
		return true
	})
	if n > 0 {
		s.log.Info("closing spliced connections that carry only watches and logs -f", "count", n)
	}
}

// staysOpen says whether a request for path never ends by itself.
func staysOpen(path string) bool {
	u, err := url.ParseRequestURI(path)
	return err == nil && kubereq.StaysOpen(u)
}

// retireSplices deals with the spliced connections of tunnels whose agent
// sent GOAWAY (it moves or stops, and waits for the streams open on the
// tunnel, as for the HTTP connections of retireHTTPConns): their clients
// are told to go away, so that new requests open a connection that takes
// another tunnel, and each is closed once it carries no request that ends
// by itself (idle, or only watches and logs -f, which client-go then
// re-watches elsewhere), rather than holding the agent to its drain
// timeout.
func (s *Server) retireSplices() {
	s.splices.Range(func(k, v any) bool {
		if !v.(*session).cc.GoingAway() {
			return true
		}
		sc := k.(splicedConn)
		if sc.GoAway() {
			return true // closed a round (250 ms) later at the soonest
		}
		if plain, _ := sc.Open(staysOpen); plain == 0 {
			sc.Shut()
		}
		return true
	})
}

// goAwaySplices tells every spliced connection's client to open no new
// streams on it (the drain).
func (s *Server) goAwaySplices() {
	s.splices.Range(func(k, _ any) bool {
		k.(splicedConn).GoAway()
		return true
	})
}
