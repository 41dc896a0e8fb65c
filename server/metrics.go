package server

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Refusal reasons, the values of the refusals metric's reason label.
const (
	reasonNotTLS           = "not_tls"
	reasonHelloTimeout     = "hello_timeout"
	reasonNoServerName     = "no_server_name"
	reasonUnknownHost      = "unknown_host"
	reasonAgentUnavailable = "agent_unavailable"
	reasonStreamFailed     = "stream_failed"
	reasonBadToken         = "bad_token"
	reasonExpiredToken     = "expired_token"
	reasonRevokedToken     = "revoked_token"
	reasonLabelNotAllowed  = "label_not_allowed"
	reasonLabelConflict    = "label_conflict"
	reasonMisdirected      = "misdirected_request"
	reasonBadRegistration  = "bad_registration"
	reasonRateLimited      = "rate_limited"
	reasonDraining         = "draining"
	reasonTooManyHellos    = "too_many_pending_hellos"
	reasonAuthRateLimited  = "auth_rate_limited"
	reasonTooManyStreams   = "too_many_streams"
	reasonRequestTimeout   = "request_timeout"
	reasonHeadersTooLarge  = "headers_too_large"
	reasonNoRequest        = "no_request"
	reasonMessageTooLarge  = "message_too_large"
	// reasonMethodNotAllowed: CONNECT (the tunnel's own stream protocol)
	// or another method no terminate-mode route serves.
	reasonMethodNotAllowed = "method_not_allowed"
	// reasonUpstreamHeadersTooLarge: a target's answer had a header
	// section over the relay's bound; that stream was closed.
	reasonUpstreamHeadersTooLarge = "upstream_headers_too_large"
	// reasonUpgradeMismatch: a target answered 101 with another
	// protocol than the request's Upgrade.
	reasonUpgradeMismatch = "upgrade_mismatch"
	// reasonTooManyStreamsFromSource: one source address (IPv6 /64) has
	// MaxStreamsPerSource streams open to the host name already.
	reasonTooManyStreamsFromSource = "too_many_streams_from_source"
	// reasonWriteStall: a passthrough client took no data for
	// WriteStallTimeout; its stream was cut.
	reasonWriteStall = "write_stall"
	// reasonBadHTTP2: a spliced connection's client broke HTTP/2's
	// framing or header compression; the connection was closed.
	reasonBadHTTP2 = "bad_http2"
	// reasonBadHTTP1: a spliced connection's client sent a request that
	// broke HTTP/1.1's syntax or framing (answered 400, 431 or 501).
	reasonBadHTTP1 = "bad_http1"
	// reasonSessionRevoked and reasonSessionExpired: a live tunnel ended
	// because its token was revoked or expired.
	reasonSessionRevoked = "session_revoked"
	reasonSessionExpired = "session_expired"
	// reasonTooManySessions: the cluster has MaxSessionsPerCluster
	// sessions; reasonClusterRateLimited: its registrations came faster
	// than clusterRegistrationsPerSecond.
	// reasonHelloEvicted: the pending hellos were at MaxPendingHellos; the
	// oldest of the source holding the most was closed for a new one.
	reasonHelloEvicted = "hello_evicted"
	// reasonTooManyIdleConns: a source held MaxIdleConnsPerSource idle
	// keep-alive connections already; the newest idle one was closed.
	reasonTooManyIdleConns   = "too_many_idle_conns"
	reasonTooManySessions    = "too_many_sessions"
	reasonClusterRateLimited = "cluster_rate_limited"
)

// metrics lives in a registry of its own (no global state), so several
// relays can run in one test process.
type metrics struct {
	reg      *prometheus.Registry
	tunnels  prometheus.Gauge
	streams  *prometheus.GaugeVec
	bytes    *prometheus.CounterVec
	refusals *prometheus.CounterVec
	regs     *prometheus.CounterVec
	splices  *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		tunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_tunnels_connected", Help: "Agent tunnels connected now.",
		}),
		streams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "spectro_proxy_streams_open", Help: "Streams open through tunnels now, by kind (passthrough, http, upgrade, spliced).",
		}, []string{"kind"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_bytes_total", Help: "Bytes carried through tunnels, by direction (to_agent, from_agent).",
		}, []string{"direction"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_refusals_total", Help: "Connections and registrations refused, by reason.",
		}, []string{"reason"}),
		regs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_tunnel_registrations_total", Help: "Tunnel registrations, by result (accepted, replaced, refused).",
		}, []string{"result"}),
		splices: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_spliced_connections_total", Help: "Terminate-mode connections carried as bytes to the API server, by protocol (h2, http/1.1).",
		}, []string{"protocol"}),
	}
	m.reg.MustRegister(m.tunnels, m.streams, m.bytes, m.refusals, m.regs, m.splices,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// refuse counts a refusal by reason and logs it.
func (s *Server) refuse(reason string, args ...any) {
	s.m.refusals.WithLabelValues(reason).Inc()
	s.log.Info("refused", append([]any{"reason", reason}, args...)...)
}
