package server

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/peer"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// The peer listener: what other replicas forward here (see fleet.go). It
// serves from this replica's LOCAL tunnels only, never forwarding again,
// and answers 503 with Spectro-Proxy-Error: no-local-tunnel when it has
// none for the name, so the forwarder tries the next holder.

// peerReceivedKey marks a request that came from a peer: it is never
// forwarded again (at most one extra hop, no loops).
type peerReceivedKey struct{}

func peerReceived(ctx context.Context) bool { return ctx.Value(peerReceivedKey{}) != nil }

// newPeerServer is the peer listener's HTTP/1.1 server. Requests carry
// connCtx (which the drain's hard stop ends) and, like the public
// side's, no write timeout: watches stream for hours.
func (s *Server) newPeerServer(connCtx context.Context) *http.Server {
	return &http.Server{
		Handler:           http.HandlerFunc(s.servePeer),
		ReadHeaderTimeout: s.cfg.RequestHeaderTimeout,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    s.cfg.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.cfg.Logger.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return connCtx },
		// No HTTP/2 (upgrades must pass): the TLS config offers only
		// http/1.1, and an empty map keeps net/http from adding h2.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
}

// servePeer serves one request from another replica: a whole
// passthrough connection, or a terminate-mode request it terminated.
func (s *Server) servePeer(w http.ResponseWriter, r *http.Request) {
	name := hostname.Canonical(r.Header.Get(peer.HeaderHost))
	source := r.Header.Get(peer.HeaderSource)
	label, ok := s.labelOf(name)
	if !ok || source == "" {
		s.refuse(reasonBadPeerRequest, "host", name, "peer", r.RemoteAddr)
		http.Error(w, "spectro-proxy: peer request without a host of "+s.cfg.Domain+" or a source", http.StatusBadRequest)
		return
	}
	if peer.IsConnRequest(r) {
		s.fl.peerServed.WithLabelValues(kindConn).Inc()
		s.servePeerConn(w, r, label, source)
		return
	}
	s.fl.peerServed.WithLabelValues(kindHTTP).Inc()
	if !s.reg.usable(label) {
		noLocalTunnel(w, label)
		return
	}
	// The user's request as the forwarder terminated it: the user's
	// address counts against the per-source limits and goes into
	// X-Forwarded-For, as if the user had connected here.
	r.RemoteAddr = source
	r.Header.Del(peer.HeaderHost)
	r.Header.Del(peer.HeaderSource)
	s.serveTerminated(w, r.WithContext(context.WithValue(r.Context(), peerReceivedKey{}, true)), label)
}

// noLocalTunnel is the answer that makes the forwarder try the next holder.
func noLocalTunnel(w http.ResponseWriter, label string) {
	w.Header().Set(tunnel.HeaderError, peer.ErrNoTunnel)
	http.Error(w, "spectro-proxy: no tunnel for "+label+" on this replica", http.StatusServiceUnavailable)
}

// servePeerConn carries a whole passthrough connection down a local
// tunnel: the stream is opened before the 101, so a failure is still an
// answer the forwarder can act on.
func (s *Server) servePeerConn(w http.ResponseWriter, r *http.Request, label, source string) {
	cands, mode, _ := s.reg.candidates(label)
	if len(cands) == 0 || mode != tunnel.Passthrough {
		noLocalTunnel(w, label)
		return
	}
	release, ok := s.srcStreams.enter(sourceOf(source), label)
	if !ok {
		s.refuse(reasonTooManyStreamsFromSource, "host", label, "remote", source, "peer", r.RemoteAddr, "max", s.cfg.MaxStreamsPerSource)
		w.Header().Set(tunnel.HeaderError, reasonTooManyStreamsFromSource)
		http.Error(w, "spectro-proxy: too many streams from the source", http.StatusTooManyRequests)
		return
	}
	defer release()
	// Hijacked below: the drain waits for it as for any public connection.
	s.conns.Add(1)
	defer s.conns.Done()
	st, err := s.openStream(r.Context(), label, tunnel.StreamTCP, cands)
	if err != nil {
		reason, code := reasonStreamFailed, http.StatusBadGateway
		if errors.Is(err, errTooManyStreams) {
			reason, code = reasonTooManyStreams, http.StatusServiceUnavailable
		}
		s.refuse(reason, "host", label, "remote", source, "peer", r.RemoteAddr, "error", err.Error())
		w.Header().Set(tunnel.HeaderError, reason)
		http.Error(w, "spectro-proxy: "+err.Error(), code)
		return
	}
	c, err := peer.AcceptConn(w)
	if err != nil {
		st.Close()
		s.log.Debug("peer connection lost before the join", "host", label, "peer", r.RemoteAddr, "error", err)
		return
	}
	s.track(c, true)
	defer s.track(c, false)
	s.m.streams.WithLabelValues("passthrough").Inc()
	defer s.m.streams.WithLabelValues("passthrough").Dec()
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	up, down, err := tunnel.Join(c, st)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		s.refuse(reasonWriteStall, "host", label, "remote", source, "timeout", s.cfg.WriteStallTimeout.String())
	}
	s.m.bytes.WithLabelValues("to_agent").Add(float64(up))
	s.m.bytes.WithLabelValues("from_agent").Add(float64(down))
	s.log.Debug("forwarded passthrough closed", "host", label, "remote", source, "peer", r.RemoteAddr, "up", up, "down", down, "error", err)
}

// reasonBadPeerRequest: a peer's request named no host of the domain, or
// no source.
const reasonBadPeerRequest = "bad_peer_request"
