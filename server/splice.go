package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"net/url"
	"os"

	"golang.org/x/net/http2/hpack"

	"github.com/spectroproxy/spectro-proxy/internal/h2splice"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubereq"
	"github.com/spectroproxy/spectro-proxy/internal/sni"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// A terminate-mode connection to a cluster's API server whose client
// speaks HTTP/2 (kubectl, client-go, browsers) is spliced: the relay ends
// its TLS and carries its HTTP/2 bytes down one stream, onto an HTTP/2
// connection the agent opens to the API server. Per request that costs
// the relay a header block's decoding (to keep the connection on its
// host, see h2splice) instead of an HTTP/2 server's and a client's work:
// the floors' design, which the second HTTPS stack kept terminate mode
// far from (docs/performance.md, twelfth pass).
//
// What the request-by-request path does for each request, a splice does
// per connection or leaves to the API server, as passthrough does: the
// source's stream limit counts the connection; the API server bounds the
// streams on it (and answers CONNECT and odd methods itself);
// X-Forwarded-For and -Proto are added after the client's own; and the
// drain tells the client to go away (GOAWAY), lets its requests finish,
// and closes the connection once only watches and logs -f are left on it,
// when it ends those of the request-by-request path. The Spectro-Proxy-*
// fields a user sends reach the API server, which ignores
// them: the agent reads none of the bytes. Dashboards, HTTP/1.1 clients,
// connections forwarded to another replica's tunnel and agents that
// predate StreamH2 keep the request-by-request path.

// terminate ends a terminate-mode connection's TLS and splices it or
// hands it to the HTTPS server.
func (s *Server) terminate(ctx context.Context, c *sni.Conn, name, label string, cands []*session) {
	cands = h2Sessions(label, cands)
	if len(cands) == 0 {
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
	if tc.ConnectionState().NegotiatedProtocol != "h2" || !s.splice(ctx, tc, name, label, cands) {
		s.pushHTTPS(tc, wc)
	}
}

// h2Sessions are the sessions among cands that take label's HTTP/2
// connections.
func h2Sessions(label string, cands []*session) []*session {
	if hostname.IsDashboard(label) {
		return nil
	}
	var out []*session
	for _, sess := range cands {
		if sess.h2Streams && !sess.noH2.Load() {
			out = append(out, sess)
		}
	}
	return out
}

// splice carries tc down a stream; false when none could be opened (the
// HTTPS server then serves tc, and says why in HTTP).
func (s *Server) splice(ctx context.Context, tc *tls.Conn, name, label string, cands []*session) bool {
	remote := tc.RemoteAddr().String()
	release, ok := s.srcStreams.enter(sourceOf(remote), label)
	if !ok {
		return false // each request is refused with 429, and why
	}
	defer release()
	st, err := s.openStream(ctx, label, tunnel.StreamH2, cands)
	if err != nil {
		var re *tunnel.RefusedError
		if errors.As(err, &re) && re.Code == http.StatusHTTPVersionNotSupported {
			// The API server does not speak HTTP/2: requests go one by
			// one on these tunnels from now on.
			for _, sess := range cands {
				sess.noH2.Store(true)
			}
		}
		s.log.Debug("no HTTP/2 stream; serving requests one by one", "host", label, "remote", remote, "error", err)
		return false
	}
	sc := h2splice.New(tc, h2splice.Options{
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
	s.splices.Store(sc, st.slot.sess)
	defer s.splices.Delete(sc)
	if s.draining.Load() {
		sc.GoAway()
	}
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
	}
	s.m.bytes.WithLabelValues("to_agent").Add(float64(up))
	s.m.bytes.WithLabelValues("from_agent").Add(float64(down))
	s.log.Debug("spliced connection closed", "host", label, "remote", remote, "up", up, "down", down, "error", err)
	return true
}

// splicedPlain counts the requests open on spliced connections that end
// by themselves (not a watch or logs -f).
func (s *Server) splicedPlain() int {
	n := 0
	s.splices.Range(func(k, _ any) bool {
		plain, _ := k.(*h2splice.Conn).Open(staysOpen)
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
		sc := k.(*h2splice.Conn)
		if plain, _ := sc.Open(staysOpen); plain == 0 {
			sc.Shut()
			n++
		}
		return true
	})
	if n > 0 {
		s.log.Info("closing spliced HTTP/2 connections that carry only watches and logs -f", "count", n)
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
		sc := k.(*h2splice.Conn)
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
		k.(*h2splice.Conn).GoAway()
		return true
	})
}
