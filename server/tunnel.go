package server

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/websocket"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// serveTunnel authenticates an agent, upgrades to WebSocket and serves the
// session until the tunnel ends.
func (s *Server) serveTunnel(w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	src := sourceOf(remote)
	if s.draining.Load() {
		s.refuse(reasonDraining, "remote", remote)
		// Retry soon: through the load balancer the next dial lands on
		// another replica, and a moving agent's old tunnel only lasts
		// half the drain timeout (the agent's backoff jitter spreads a
		// fleet).
		s.retryLater(w, http.StatusServiceUnavailable, 1, "relay is shutting down")
		return
	}
	// A source that keeps failing is turned away before its token is even
	// read: a flood of bad tokens costs a map lookup each.
	if blocked, wait := s.fails.blocked(src); blocked {
		s.refuse(reasonAuthRateLimited, "remote", remote)
		s.retryLater(w, http.StatusTooManyRequests, int(wait/time.Second)+1, "too many failed tunnel registrations from "+src)
		return
	}
	reg, ok := s.authorize(w, r)
	if !ok {
		s.fails.fail(src)
		return
	}
	// The global limit comes after authentication, so bad tokens (however
	// many sources send them) cannot use up the budget of real agents.
	if !s.limiter.Allow() {
		s.refuse(reasonRateLimited, "remote", remote)
		s.retryLater(w, http.StatusServiceUnavailable, 1+rand.IntN(5), "too many tunnel registrations right now")
		return
	}
	claims, routes, agentID := reg.claims, newRouteSet(reg.routes), reg.agentID
	// One cluster's token cannot spend the registration budget of all:
	// its registrations are rate-limited on their own.
	if blocked, wait := s.clusterRegs.blocked(claims.ClusterUID); blocked {
		s.refuse(reasonClusterRateLimited, "cluster", claims.ClusterUID, "remote", remote)
		s.retryLater(w, http.StatusTooManyRequests, int(wait/time.Second)+1, "too many tunnel registrations for cluster "+claims.ClusterUID)
		return
	}
	s.clusterRegs.fail(claims.ClusterUID) // spends one
	if s.reg.clusterFull(claims.ClusterUID, agentID, s.cfg.MaxSessionsPerCluster) {
		s.refuse(reasonTooManySessions, "cluster", claims.ClusterUID, "agent", agentID, "remote", remote, "max", s.cfg.MaxSessionsPerCluster)
		s.retryLater(w, http.StatusTooManyRequests, 5+rand.IntN(10),
			fmt.Sprintf("cluster %s has %d tunnels connected already", claims.ClusterUID, s.cfg.MaxSessionsPerCluster))
		return
	}
	label := s.reg.heldByOther(routes, claims.ClusterUID)
	if label == "" {
		label = s.heldInFleet(routes, claims.ClusterUID) // on another replica
	}
	if label != "" {
		s.refuseTunnel(w, http.StatusConflict, reasonLabelConflict,
			fmt.Sprintf("host name %s is served by another cluster's agent", hostname.Host(label, s.cfg.Domain)), remote)
		return
	}

	ws, err := s.upgrader.Upgrade(w, r, s.tunnelHeaders())
	if err != nil {
		// Upgrade has already answered the client.
		s.refuse(reasonBadRegistration, "remote", remote, "error", err.Error())
		return
	}
	conn := tunnel.NewConn(ws)
	cc := s.relay.StartLazyClientConn(conn)
	sess := &session{
		agentID: agentID, clusterUID: claims.ClusterUID, tokenID: claims.ID,
		routes: routes, remote: remote, since: time.Now(), cc: cc, conn: conn,
		maxStreams:  int32(min(s.cfg.MaxStreamsPerTunnel, math.MaxInt32)),
		httpStreams: headerHasToken(r.Header, tunnel.HeaderStreams, tunnel.StreamHTTP),
		h2Streams:   headerHasToken(r.Header, tunnel.HeaderStreams, tunnel.StreamH2),
	}
	result := "accepted"
	old, err := s.reg.add(sess, s.cfg.MaxSessionsPerCluster)
	if errors.Is(err, errTooManySessions) {
		// Filled up since the check above; upgraded already, so the
		// agent sees the tunnel close and backs off.
		s.refuse(reasonTooManySessions, "cluster", claims.ClusterUID, "agent", agentID, "remote", remote, "max", s.cfg.MaxSessionsPerCluster)
		sess.close()
		return
	}
	if err != nil {
		// Another cluster registered the label between the check above
		// and now; the agent sees the tunnel close and retries.
		s.refuse(reasonLabelConflict, "remote", remote, "detail", err.Error())
		sess.close()
		return
	}
	if old != nil {
		old.close()
		result = "replaced"
	}
	s.m.regs.WithLabelValues(result).Inc()
	s.m.tunnels.Inc()
	s.announce(sess, old)
	// A token's TTL bounds its sessions too, not only its registrations.
	expiry := func() {}
	if claims.ExpiresAt != 0 {
		sess.expires = time.Unix(claims.ExpiresAt, 0)
		t := time.AfterFunc(time.Until(sess.expires), func() { s.endSession(sess, reasonSessionExpired) })
		expiry = func() { t.Stop() }
	}
	s.log.Info("agent connected", "cluster", claims.ClusterUID, "agent", agentID, "remote", remote,
		"hostnames", s.hostnames(sess), "replaced_stale_session", result == "replaced")

	// The handler returns now and cleanup runs when the tunnel closes
	// (whoever reads it closes it when reading fails: the goroutine waiting
	// for the agent, then x/net's read loop): the handler's
	// goroutine (its stack grown by the TLS handshake), the request and
	// net/http's connection state would otherwise live as long as the
	// tunnel, which is most of what an idle tunnel costs.
	conn.AfterClose(func() { s.tunnelClosed(sess, conn, expiry) })
}

// tunnelClosed cleans up after sess's tunnel closed. (A method rather than
// the closure's body: the closure AfterClose holds for the life of every
// tunnel then captures three pointers, not a copy of the token's claims
// and the strings beside them.)
func (s *Server) tunnelClosed(sess *session, conn *tunnel.Conn, expiry func()) {
	expiry()
	if s.reg.remove(sess) {
		s.withdraw(sess) // not when replaced: the successor holds the keys
	}
	s.m.tunnels.Dec()
	s.closeHTTPConns(sess)
	sess.cc.Close()
	readErr := conn.ReadErr()
	if errors.Is(readErr, websocket.ErrReadLimit) {
		s.refuse(reasonMessageTooLarge, "cluster", sess.clusterUID, "agent", sess.agentID, "remote", sess.remote,
			"limit_bytes", tunnel.MaxMessageSize)
	}
	s.log.Info("agent disconnected", "cluster", sess.clusterUID, "agent", sess.agentID, "remote", sess.remote,
		"connected_for", time.Since(sess.since).Round(time.Millisecond).String(), "read_error", readErr)
}

// registration is what authorize allows: one agent replica of a cluster,
// serving routes its token allows.
type registration struct {
	claims  token.Claims
	routes  map[string]tunnel.Mode
	agentID string
}

// authorize checks a registration: token (signature, expiry, revocation),
// the labels it may register, and the agent id, and returns what it allows.
// On failure it has answered the agent and counted the reason.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request) (registration, bool) {
	remote := r.RemoteAddr
	fail := func(code int, reason, msg string) (registration, bool) {
		s.refuseTunnel(w, code, reason, msg, remote)
		return registration{}, false
	}
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return fail(http.StatusUnauthorized, reasonBadToken, "missing bearer token")
	}
	claims, err := s.tokens.Verify(tok)
	switch {
	case errors.Is(err, token.ErrRevocationUnreadable):
		s.log.Error("checking token revocation", "error", err)
		return fail(http.StatusServiceUnavailable, reasonRevokedToken, "revocation list unreadable")
	case errors.Is(err, token.ErrRevoked):
		return fail(http.StatusUnauthorized, reasonRevokedToken, err.Error())
	case errors.Is(err, token.ErrExpired):
		return fail(http.StatusUnauthorized, reasonExpiredToken, err.Error())
	case err != nil:
		return fail(http.StatusUnauthorized, reasonBadToken, err.Error())
	case s.revokedInFleet(claims.ID):
		return fail(http.StatusUnauthorized, reasonRevokedToken, fmt.Sprintf("token %s is revoked", claims.ID))
	}
	routes, err := tunnel.ParseRoutes(r.Header.Get(tunnel.HeaderRoutes))
	if err != nil {
		return fail(http.StatusBadRequest, reasonBadRegistration, err.Error())
	}
	for label := range routes {
		if !claims.Allows(label) {
			return fail(http.StatusForbidden, reasonLabelNotAllowed,
				fmt.Sprintf("token for cluster %s may not register %q (allowed: %s)", claims.ClusterUID, label, strings.Join(claims.Labels(), ", ")))
		}
	}
	agentID := r.Header.Get(tunnel.HeaderAgent)
	if agentID == "" || len(agentID) > 253 {
		return fail(http.StatusBadRequest, reasonBadRegistration, "agent id header missing or too long")
	}
	return registration{claims: claims, routes: routes, agentID: agentID}, true
}

func (s *Server) refuseTunnel(w http.ResponseWriter, code int, reason, msg, remote string) {
	s.refuse(reason, "remote", remote, "detail", msg)
	http.Error(w, "spectro-proxy: "+msg, code)
}

// retryLater answers code with Retry-After. Callers jitter the delay where
// a whole fleet may be refused at once, so it does not come back at once.
func (s *Server) retryLater(w http.ResponseWriter, code, afterSeconds int, msg string) {
	w.Header().Set("Retry-After", strconv.Itoa(afterSeconds))
	http.Error(w, "spectro-proxy: "+msg, code)
}

// hostnames renders the public host names of a session's labels.
func (s *Server) hostnames(sess *session) []string {
	out := make([]string, 0, len(sess.routes))
	for label, mode := range sess.routes.all() {
		out = append(out, fmt.Sprintf("%s (%s)", hostname.Host(label, s.cfg.Domain), mode))
	}
	return out
}

// endSession closes a session whose token no longer holds (revoked or
// expired); the agent's reconnect is then refused with the reason.
func (s *Server) endSession(sess *session, reason string) {
	s.refuse(reason, "cluster", sess.clusterUID, "agent", sess.agentID, "token_id", sess.tokenID, "remote", sess.remote)
	sess.close()
}

// checkRevocations ends the sessions of revoked tokens every
// RevocationInterval until ctx is done.
func (s *Server) checkRevocations(ctx context.Context) {
	tick := time.NewTicker(s.cfg.RevocationInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, sess := range s.reg.all() {
			if s.revokedInFleet(sess.tokenID) {
				s.endSession(sess, reasonSessionRevoked)
				continue
			}
			revoked, err := s.tokens.Revoked(sess.tokenID)
			if err != nil {
				// Live sessions stay: new registrations are refused
				// meanwhile (see authorize), and this is logged.
				s.log.Error("checking live sessions against the revocation file", "error", err)
				break
			}
			if revoked {
				s.endSession(sess, reasonSessionRevoked)
			}
		}
	}
}
