package server

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// serveTunnel authenticates an agent, upgrades to WebSocket and serves the
// session until the tunnel ends.
func (s *Server) serveTunnel(w http.ResponseWriter, r *http.Request) {
	remote := r.RemoteAddr
	if s.draining.Load() {
		s.refuse(reasonDraining, "remote", remote)
		s.retryLater(w, "relay is shutting down")
		return
	}
	if !s.limiter.Allow() {
		s.refuse(reasonRateLimited, "remote", remote)
		s.retryLater(w, "too many tunnel registrations right now")
		return
	}
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		s.refuseTunnel(w, http.StatusUnauthorized, reasonBadToken, "missing bearer token", remote)
		return
	}
	claims, err := token.Verify(s.key, tok, time.Now())
	if err != nil {
		reason := reasonBadToken
		if errors.Is(err, token.ErrExpired) {
			reason = reasonExpiredToken
		}
		s.refuseTunnel(w, http.StatusUnauthorized, reason, err.Error(), remote)
		return
	}
	revoked, err := s.revoked.Revoked(claims.ID)
	if err != nil {
		s.log.Error("checking token revocation", "error", err)
		s.refuseTunnel(w, http.StatusServiceUnavailable, reasonRevokedToken, "revocation list unreadable", remote)
		return
	}
	if revoked {
		s.refuseTunnel(w, http.StatusUnauthorized, reasonRevokedToken, "token "+claims.ID+" is revoked", remote)
		return
	}
	routes, err := tunnel.ParseRoutes(r.Header.Get(tunnel.HeaderRoutes))
	if err != nil {
		s.refuseTunnel(w, http.StatusBadRequest, reasonBadRegistration, err.Error(), remote)
		return
	}
	for label := range routes {
		if !claims.Allows(label) {
			s.refuseTunnel(w, http.StatusForbidden, reasonLabelNotAllowed,
				fmt.Sprintf("token for cluster %s may not register %q (allowed: %s)", claims.ClusterUID, label, strings.Join(claims.Labels(), ", ")), remote)
			return
		}
	}
	agentID := r.Header.Get(tunnel.HeaderAgent)
	if agentID == "" || len(agentID) > 253 {
		s.refuseTunnel(w, http.StatusBadRequest, reasonBadRegistration, "agent id header missing or too long", remote)
		return
	}

	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		// Upgrade has already answered the client.
		s.refuse(reasonBadRegistration, "remote", remote, "error", err.Error())
		return
	}
	conn := tunnel.NewConn(ws)
	cc, err := tunnel.NewClientConn(conn, s.cfg.Liveness)
	if err != nil {
		conn.Close()
		s.log.Warn("starting tunnel", "remote", remote, "error", err)
		return
	}
	sess := &session{
		agentID: agentID, clusterUID: claims.ClusterUID, tokenID: claims.ID,
		routes: routes, remote: remote, since: time.Now(), cc: cc, conn: conn, done: conn.Done(),
	}
	result := "accepted"
	if old := s.reg.add(sess); old != nil {
		old.close()
		result = "replaced"
	}
	s.m.regs.WithLabelValues(result).Inc()
	s.m.tunnels.Inc()
	s.log.Info("agent connected", "cluster", claims.ClusterUID, "agent", agentID, "remote", remote,
		"hostnames", s.hostnames(sess), "replaced_stale_session", result == "replaced")

	<-sess.done
	s.reg.remove(sess)
	s.m.tunnels.Dec()
	cc.Close()
	s.log.Info("agent disconnected", "cluster", claims.ClusterUID, "agent", agentID, "remote", remote,
		"connected_for", time.Since(sess.since).Round(time.Millisecond).String())
}

func (s *Server) refuseTunnel(w http.ResponseWriter, code int, reason, msg, remote string) {
	s.refuse(reason, "remote", remote, "detail", msg)
	http.Error(w, "spectro-proxy: "+msg, code)
}

// retryLater answers 503 with a jittered Retry-After, so a fleet that was
// refused at once does not come back at once.
func (s *Server) retryLater(w http.ResponseWriter, msg string) {
	w.Header().Set("Retry-After", strconv.Itoa(1+rand.IntN(5)))
	http.Error(w, "spectro-proxy: "+msg, http.StatusServiceUnavailable)
}
