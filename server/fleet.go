package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/spectroproxy/spectro-proxy/internal/peer"
	"github.com/spectroproxy/spectro-proxy/internal/pki"
	fleet "github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// The fleet (issue 13): N replicas behind one load balancer. Each holds the
// tunnels of the agents that dialed it and announces them in the shared
// registry (internal/registry: in memory for a single relay, etcd for a
// fleet); a user connection that lands on a replica without a local tunnel
// for its name is carried to a replica that holds one over the peer
// channel (internal/peer; forward.go sends, peer.go receives). At most one
// extra hop: what a replica receives from a peer is served from its local
// tunnels only.

// fleetPart is the relay's share of the fleet.
type fleetPart struct {
	reg fleet.Registry
	// id is the replica's peer certificate; nil without a peer listener
	// (then nothing is forwarded either: a replica without a peer
	// listener is a single relay).
	id *peer.Identity
	// tr carries terminate-mode requests to peers (keep-alive pool).
	tr *http.Transport
	// started: the registry loaded its first view (readyz waits for it).
	started atomic.Bool
	// peerSrv serves the peer listener while Serve runs.
	peerSrv  *http.Server
	peerDone chan struct{} // closed when peerSrv.Serve returned

	forwarded  *prometheus.CounterVec // kind, result
	fwdStreams *prometheus.GaugeVec   // kind
	peerServed *prometheus.CounterVec // kind
}

// Forwarding kinds, the kind label of the fleet's metrics.
const (
	kindConn = "conn" // a whole passthrough connection
	kindHTTP = "http" // a terminate-mode request (or upgrade)
)

// reasonForwardFailed: no holder of a name known only on other replicas
// took the connection or request.
const reasonForwardFailed = "forward_failed"

// fleetDefaults fills the fleet's zero fields (see Config).
func (c *Config) fleetDefaults() {
	if c.ReplicaID == "" {
		c.ReplicaID = os.Getenv("POD_NAME")
	}
	if c.ReplicaID == "" {
		c.ReplicaID, _ = os.Hostname()
	}
	if c.EtcdPrefix == "" {
		c.EtcdPrefix = DefaultEtcdPrefix
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.PeerCAFile == "" && c.PeerCAKeyFile == "" && c.StateDir != "" {
		c.PeerCAFile, c.PeerCAKeyFile = filepath.Join(c.StateDir, "ca.crt"), filepath.Join(c.StateDir, "ca.key")
	}
	if c.PeerAdvertise == "" {
		c.PeerAdvertise = c.defaultPeerAdvertise()
	}
}

// defaultPeerAdvertise is env POD_IP with PeerListen's port, else
// PeerListen when it names a host; "" when neither applies.
func (c *Config) defaultPeerAdvertise() string {
	if c.PeerListen == "" {
		return ""
	}
	host, port, err := net.SplitHostPort(c.PeerListen)
	if err != nil {
		return ""
	}
	if ip := os.Getenv("POD_IP"); ip != "" {
		return net.JoinHostPort(ip, port)
	}
	if host != "" && !net.ParseIP(host).IsUnspecified() {
		return c.PeerListen
	}
	return ""
}

// validateFleet reports what is wrong with the fleet's fields, naming the
// flag.
func (c *Config) validateFleet() error {
	if len(c.EtcdEndpoints) > 0 && c.PeerListen == "" && c.Registry == nil {
		return errors.New("peer-listen is required with etcd-endpoints (other replicas forward users' connections to it), e.g. :8444")
	}
	if len(c.EtcdEndpoints) == 0 && (c.EtcdCAFile != "" || c.EtcdCertFile != "" || c.EtcdKeyFile != "") {
		return errors.New("etcd-ca-file, etcd-cert-file and etcd-key-file need etcd-endpoints")
	}
	if (c.EtcdCertFile == "") != (c.EtcdKeyFile == "") {
		return errors.New("etcd-cert-file and etcd-key-file go together")
	}
	if (c.PeerCAFile == "") != (c.PeerCAKeyFile == "") {
		return errors.New("peer-ca-file and peer-ca-key-file go together")
	}
	if c.LeaseTTL < 0 || (c.LeaseTTL > 0 && c.LeaseTTL < 2*time.Second) {
		return errors.New("lease-ttl must be at least 2s (etcd's keep-alive runs at a third of it)")
	}
	if c.PeerListen == "" {
		if c.PeerAdvertise != "" {
			return errors.New("peer-advertise needs peer-listen")
		}
		return nil
	}
	if _, _, err := net.SplitHostPort(c.PeerListen); err != nil {
		return fmt.Errorf("peer-listen %q: %w", c.PeerListen, err)
	}
	if c.PeerCAFile == "" && c.StateDir == "" {
		return errors.New("peer-ca-file and peer-ca-key-file are required with peer-listen (or state-dir, whose ca.crt and ca.key are used)")
	}
	adv := c.PeerAdvertise
	if adv == "" {
		adv = c.defaultPeerAdvertise()
	}
	if adv == "" {
		return fmt.Errorf("peer-advertise is required: peer-listen %q names no host and POD_IP is not set", c.PeerListen)
	}
	if _, _, err := net.SplitHostPort(adv); err != nil {
		return fmt.Errorf("peer-advertise %q: %w", adv, err)
	}
	return nil
}

// newFleet builds the registry and the peer identity cfg asks for and
// registers the fleet's metrics.
func newFleet(cfg Config, m *metrics) (*fleetPart, error) {
	f := &fleetPart{
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_forwarded_total",
			Help: "Users' connections (conn) and terminate-mode requests (http) this replica forwarded to the replica holding the tunnel, by result (ok, failed).",
		}, []string{"kind", "result"}),
		fwdStreams: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "spectro_proxy_forwarded_streams",
			Help: "Forwarded connections and requests in flight now, by kind (conn, http).",
		}, []string{"kind"}),
		peerServed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_peer_served_total",
			Help: "Connections and requests other replicas forwarded to this one, by kind (conn, http).",
		}, []string{"kind"}),
	}
	m.reg.MustRegister(f.forwarded, f.fwdStreams, f.peerServed)
	// Every series from the start: dashboards and alerts see a 0, not
	// nothing, on a replica that never forwarded.
	for _, kind := range []string{kindConn, kindHTTP} {
		f.forwarded.WithLabelValues(kind, "ok")
		f.forwarded.WithLabelValues(kind, "failed")
		f.fwdStreams.WithLabelValues(kind)
		f.peerServed.WithLabelValues(kind)
	}
	self := fleet.Replica{ID: cfg.ReplicaID, PeerAddr: cfg.PeerAdvertise}
	if cfg.PeerListen != "" {
		id, err := peer.Load(cfg.PeerCAFile, cfg.PeerCAKeyFile, cfg.ReplicaID)
		if err != nil {
			return nil, err
		}
		f.id, f.tr = id, id.Transport()
	}
	switch {
	case cfg.Registry != nil:
		f.reg = cfg.Registry
	case len(cfg.EtcdEndpoints) == 0:
		f.reg = fleet.NewMemory(self)
	default:
		reg, err := NewEtcdRegistry(cfg, self, m.reg)
		if err != nil {
			return nil, err
		}
		f.reg = reg
	}
	return f, nil
}

// NewEtcdRegistry opens the fleet's registry on etcd from cfg's Etcd*
// fields (the relay, and `token revoke --etcd-endpoints`). metrics may be
// nil.
func NewEtcdRegistry(cfg Config, self fleet.Replica, metrics prometheus.Registerer) (fleet.Registry, error) {
	tlsConf, err := EtcdTLS(cfg.EtcdCAFile, cfg.EtcdCertFile, cfg.EtcdKeyFile)
	if err != nil {
		return nil, err
	}
	reg, err := fleet.NewEtcd(fleet.EtcdConfig{
		Endpoints: cfg.EtcdEndpoints, TLS: tlsConf, Prefix: cfg.EtcdPrefix, LeaseTTL: cfg.LeaseTTL,
		Self: self, Logger: cfg.Logger, Metrics: metrics,
	})
	if err != nil {
		return nil, fmt.Errorf("opening the fleet's registry: %w", err)
	}
	return reg, nil
}

// EtcdTLS is the etcd client's TLS from PEM files: nil when none is given
// (plain http endpoints).
func EtcdTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" && certFile == "" && keyFile == "" {
		return nil, nil
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("reading etcd-ca-file: %w", err)
		}
		if conf.RootCAs, err = pki.Pool(b); err != nil {
			return nil, fmt.Errorf("etcd-ca-file %s: %w", caFile, err)
		}
	}
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("loading etcd-cert-file and etcd-key-file: %w", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// joinFleet starts the peer listener and the registry (returning once
// its first view is loaded). The returned func leaves the fleet: it
// withdraws everything this replica announced (the registry's Close).
func (s *Server) joinFleet(ctx, connCtx context.Context) (leave func(), err error) {
	if s.cfg.PeerListen != "" {
		ln := s.cfg.PeerListener
		if ln == nil {
			if ln, err = net.Listen("tcp", s.cfg.PeerListen); err != nil {
				return nil, fmt.Errorf("listening for peers on %s: %w", s.cfg.PeerListen, err)
			}
		}
		s.fl.peerSrv, s.fl.peerDone = s.newPeerServer(connCtx), make(chan struct{})
		go func() {
			defer close(s.fl.peerDone)
			_ = s.fl.peerSrv.Serve(tls.NewListener(ln, s.fl.id.ServerConfig()))
		}()
		s.log.Info("peer listener", "addr", ln.Addr().String(), "advertise", s.fl.reg.Self().PeerAddr, "replica", s.cfg.ReplicaID)
	}
	if err := s.fl.reg.Start(ctx); err != nil {
		// Close stops what Start began (the etcd client, its retries).
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.stopPeers(ctx)
		_ = s.fl.reg.Close(ctx)
		return nil, fmt.Errorf("joining the fleet's registry: %w", err)
	}
	s.fl.started.Store(true)
	return func() {
		// The drain stopped the peer listener already; this bounds what
		// is left of it (Serve returning another way).
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.stopPeers(ctx)
		if err := s.fl.reg.Close(ctx); err != nil {
			s.log.Warn("leaving the fleet's registry", "error", err)
		}
		if s.fl.tr != nil {
			s.fl.tr.CloseIdleConnections()
		}
	}, nil
}

// stopPeers stops the peer listener: forwarded requests in flight get
// until ctx ends, then are closed. Hijacked connections (whole
// connections, upgrades) are the drain's (see drain).
func (s *Server) stopPeers(ctx context.Context) {
	if s.fl.peerSrv == nil {
		return
	}
	if err := s.fl.peerSrv.Shutdown(ctx); err != nil {
		s.fl.peerSrv.Close()
	}
	<-s.fl.peerDone
}

// fleetNotReady says why the replica is not ready in the fleet, or "".
func (s *Server) fleetNotReady() string {
	switch {
	case !s.fl.started.Load():
		return "joining the fleet (registry starting)"
	case !s.fl.reg.Ready():
		return "no registry lease"
	}
	return ""
}

// announce records sess's labels in the registry; old is the session
// it replaced, whose labels sess no longer serves are withdrawn.
func (s *Server) announce(sess, old *session) {
	for label, mode := range sess.routes.all() {
		s.fl.reg.Announce(tunnelOf(sess, label, mode))
	}
	if old != nil {
		for label, mode := range old.routes.all() {
			if _, ok := sess.routes.mode(label); !ok {
				s.fl.reg.Withdraw(tunnelOf(old, label, mode))
			}
		}
	}
}

// withdraw removes sess's labels from the registry.
func (s *Server) withdraw(sess *session) {
	for label, mode := range sess.routes.all() {
		s.fl.reg.Withdraw(tunnelOf(sess, label, mode))
	}
}

func tunnelOf(sess *session, label string, mode tunnel.Mode) fleet.Tunnel {
	return fleet.Tunnel{Label: label, ClusterUID: sess.clusterUID, AgentID: sess.agentID, Mode: string(mode)}
}

// heldInFleet returns a label of routes another cluster's tunnel holds
// on any replica, or "" (the fleet-wide form of registry.heldByOther).
func (s *Server) heldInFleet(routes routeSet, clusterUID string) string {
	for label := range routes.all() {
		if owner, ok := s.fl.reg.LabelOwner(label); ok && owner != clusterUID {
			return label
		}
	}
	return ""
}

// revokedInFleet reports whether the registry lists the token id revoked.
func (s *Server) revokedInFleet(tokenID string) bool { return s.fl.reg.Revoked(tokenID) }

// holders returns the other replicas to forward label to, in order, when
// this replica can forward at all.
func (s *Server) holders(label string) []fleet.Holder {
	if s.fl.id == nil {
		return nil
	}
	all := s.fl.reg.Lookup(label)
	out := all[:0:0]
	for _, h := range all {
		if h.Replica.PeerAddr != "" && h.Replica.ID != s.cfg.ReplicaID {
			out = append(out, h)
		}
	}
	return out
}

// remember notes that label is served in mode somewhere in the fleet, so
// that once no replica holds it any more users get "agent not connected"
// from this replica too, as from one that held it (see registry.seen).
func (r *registry) remember(label string, mode tunnel.Mode) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.seen[label]; !ok {
		r.seen[label] = mode
	}
}

// usable reports whether a session that takes new streams serves label
// (candidates without moving the round-robin start).
func (r *registry) usable(label string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.byLabel[label] {
		if s.cc.CanTakeNewRequest() {
			return true
		}
	}
	return false
}
