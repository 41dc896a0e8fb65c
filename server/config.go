package server

import (
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	fleet "github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Config is the relay's configuration. Zero values take the defaults
// (the Default constants).
type Config struct {
	// Listen is the address of the public TLS listener.
	Listen string
	// Domain is the relay's own name; agents' labels live under it.
	Domain string
	// TLSCertFile and TLSKeyFile hold a certificate for Domain and *.Domain.
	// Without them, StateDir must be set and the relay creates a local CA
	// and certificate there on first start.
	TLSCertFile, TLSKeyFile string
	// StateDir keeps what the relay creates for itself: ca.crt, ca.key,
	// tls.crt, tls.key and signing.key.
	StateDir string
	// SigningKeyFile holds the key tokens are signed with (StateDir's
	// signing.key when empty).
	SigningKeyFile string
	// RevocationFile lists revoked token ids (see token.Revocations).
	RevocationFile string
	// RevocationInterval is how often live sessions are checked against
	// the revocation file: revoking a token ends its sessions within it.
	RevocationInterval time.Duration

	// HelloTimeout bounds how long a new connection may take to send its
	// ClientHello, so idle sockets cannot pile up before routing.
	HelloTimeout time.Duration
	// MaxPendingHellos caps connections still sending their ClientHello, and
	// MaxPendingHellosPerSource caps them per source address; connections
	// beyond either are closed at once (a slowloris then costs the relay a
	// bounded amount, and one address cannot use up the total).
	MaxPendingHellos, MaxPendingHellosPerSource int
	// RequestHeaderTimeout bounds how long a TLS handshake plus request
	// headers may take on connections the relay terminates.
	RequestHeaderTimeout time.Duration
	// MaxHeaderBytes bounds the request headers the relay reads.
	MaxHeaderBytes int
	// NoSplice serves every terminate-mode connection request by request
	// on the relay's own HTTPS server, as before connections were spliced
	// (splice.go): the way back should a client misbehave on a spliced
	// connection.
	NoSplice bool
	// Liveness detects dead tunnels (an agent gone without a FIN).
	Liveness tunnel.Liveness
	// StreamTimeout bounds the wait for an agent to answer a new stream.
	StreamTimeout time.Duration
	// MaxStreamsPerTunnel caps concurrent streams one agent must serve.
	MaxStreamsPerTunnel uint32
	// MaxStreamsPerSource caps the concurrent streams (passthrough
	// connections, requests, upgrades) one source address (an IPv6 /64)
	// has open to one host name, so one source cannot take a cluster's
	// slots, nor pin more than this many stream windows of relay memory.
	MaxStreamsPerSource int
	// MaxIdleConnsPerSource caps the idle keep-alive connections one
	// source address (an IPv6 /64) keeps open to the relay's terminated
	// side; past it, a connection that goes idle is closed.
	MaxIdleConnsPerSource int
	// WriteStallTimeout cuts a public connection, or a stream of one,
	// whose client has not taken a write for this long (a client that
	// never reads would otherwise pin its stream's buffered data, and
	// the tunnel's flow-control window with it).
	WriteStallTimeout time.Duration
	// MaxSessionsPerCluster caps the sessions (agent replicas) one cluster
	// has at once; a reconnect under the same agent id replaces its old
	// session and does not count twice.
	MaxSessionsPerCluster int
	// DrainTimeout bounds how long shutdown waits for connections in flight.
	DrainTimeout time.Duration
	// ShutdownDelay keeps the listener accepting for this long after the
	// serve context ends, with /readyz failing, so a load balancer stops
	// sending new connections before the relay stops taking them (in
	// Kubernetes, endpoint removal races SIGTERM). New tunnels are already
	// told to go elsewhere during the delay.
	ShutdownDelay time.Duration
	// RegistrationsPerSecond limits new tunnels accepted per second (with an
	// equal burst), so a fleet reconnecting at once after a restart is
	// spread out with Retry-After instead of overloading the relay.
	RegistrationsPerSecond float64
	// AuthFailuresPerSecond and AuthFailureBurst rate-limit failed tunnel
	// registrations per source address: past the burst, a source must wait
	// (429 with Retry-After) before its next attempt is even checked.
	AuthFailuresPerSecond float64
	AuthFailureBurst      int

	// The fleet: several replicas behind one load balancer sharing a
	// registry, forwarding users' connections to the replica holding the
	// cluster's tunnel (see fleet.go).

	// ReplicaID names this replica among the live ones (default: env
	// POD_NAME, else the host name).
	ReplicaID string
	// Replicas returns how many relay replicas are live, this one
	// included (nil: the registry's count). Each tunnel's 101 answer
	// carries it; an agent in --tunnels auto holds a second tunnel when
	// it is more than one.
	Replicas func() int
	// EtcdEndpoints is the registry's etcd cluster; empty: a single relay
	// with an in-memory registry.
	EtcdEndpoints []string
	// EtcdCAFile, EtcdCertFile and EtcdKeyFile are the etcd client's TLS
	// (all optional: no CA = system roots, no certificate = none sent).
	EtcdCAFile, EtcdCertFile, EtcdKeyFile string
	// EtcdPrefix is the key prefix of the fleet in etcd.
	EtcdPrefix string
	// LeaseTTL is the replica's etcd lease: a replica that dies is out of
	// the fleet's view after this long.
	LeaseTTL time.Duration
	// PeerListen is the address of the internal mTLS listener other
	// replicas forward to ("" = none; required with EtcdEndpoints).
	PeerListen string
	// PeerListener, when set, is the peer listener already open on
	// PeerListen, which Serve then owns and closes. A program embedding
	// the relay (and its tests) opens port 0 first, so no other socket
	// can take the port between choosing it and listening on it.
	PeerListener net.Listener
	// PeerAdvertise is host:port other replicas dial (default: env POD_IP
	// with PeerListen's port, else PeerListen when it names a host).
	PeerAdvertise string
	// PeerCAFile and PeerCAKeyFile are the CA each replica issues its own
	// peer certificate from at start, and verifies peers against (default:
	// StateDir's ca.crt and ca.key).
	PeerCAFile, PeerCAKeyFile string
	// Registry is the fleet's shared view; nil: built from the fields above
	// (in memory without EtcdEndpoints, else on etcd).
	Registry fleet.Registry

	Logger *slog.Logger
}

// Defaults, the one place each is written: Config.withDefaults applies
// them, the relay's flags show them, and docs/design.md's flag table is
// checked against the flags (docs/flags_test.go).
const (
	DefaultListen                    = ":8443"
	DefaultHelloTimeout              = 5 * time.Second
	DefaultMaxPendingHellos          = 4096
	DefaultMaxPendingHellosPerSource = 256
	DefaultRequestHeaderTimeout      = 10 * time.Second
	DefaultMaxHeaderBytes            = 64 << 10
	DefaultAuthFailuresPerSecond     = 0.2
	DefaultAuthFailureBurst          = 10
	DefaultStreamTimeout             = 10 * time.Second
	DefaultMaxStreamsPerTunnel       = 1000
	DefaultMaxStreamsPerSource       = 32
	DefaultWriteStallTimeout         = 30 * time.Second
	DefaultRevocationInterval        = 10 * time.Second
	DefaultMaxSessionsPerCluster     = 16
	DefaultMaxIdleConnsPerSource     = 256
	DefaultDrainTimeout              = 25 * time.Second
	DefaultRegistrationsPerSecond    = 200
	DefaultEtcdPrefix                = "/spectro-proxy/"
	DefaultLeaseTTL                  = 10 * time.Second
	// StateSigningKey is the signing key's name in the state dir.
	StateSigningKey = "signing.key"
)

// withDefaults returns c with every zero field set to its default, the
// domain in canonical form, and the signing key in the state dir when no
// other is named. New calls it; Validate does not.
func (c Config) withDefaults() Config {
	def := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	def(&c.HelloTimeout, DefaultHelloTimeout)
	def(&c.RequestHeaderTimeout, DefaultRequestHeaderTimeout)
	def(&c.StreamTimeout, DefaultStreamTimeout)
	def(&c.DrainTimeout, DefaultDrainTimeout)
	def(&c.WriteStallTimeout, DefaultWriteStallTimeout)
	def(&c.RevocationInterval, DefaultRevocationInterval)
	if c.MaxIdleConnsPerSource == 0 {
		c.MaxIdleConnsPerSource = DefaultMaxIdleConnsPerSource
	}
	if c.MaxSessionsPerCluster == 0 {
		c.MaxSessionsPerCluster = DefaultMaxSessionsPerCluster
	}
	if c.MaxStreamsPerSource == 0 {
		c.MaxStreamsPerSource = DefaultMaxStreamsPerSource
	}
	if c.MaxPendingHellos == 0 {
		c.MaxPendingHellos = DefaultMaxPendingHellos
	}
	if c.MaxPendingHellosPerSource == 0 {
		c.MaxPendingHellosPerSource = DefaultMaxPendingHellosPerSource
	}
	if c.MaxHeaderBytes == 0 {
		c.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	if c.AuthFailuresPerSecond == 0 {
		c.AuthFailuresPerSecond = DefaultAuthFailuresPerSecond
	}
	if c.AuthFailureBurst == 0 {
		c.AuthFailureBurst = DefaultAuthFailureBurst
	}
	c.Liveness = c.Liveness.WithDefaults()
	if c.MaxStreamsPerTunnel == 0 {
		c.MaxStreamsPerTunnel = DefaultMaxStreamsPerTunnel
	}
	if c.RegistrationsPerSecond == 0 {
		c.RegistrationsPerSecond = DefaultRegistrationsPerSecond
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	c.Domain = hostname.Canonical(c.Domain)
	if c.SigningKeyFile == "" && c.StateDir != "" {
		c.SigningKeyFile = filepath.Join(c.StateDir, StateSigningKey)
	}
	c.fleetDefaults()
	return c
}

// Validate reports the first thing wrong with the configuration. It only
// looks: zero values stand for defaults (see withDefaults), and the domain
// is checked in canonical form.
func (c *Config) Validate() error {
	domain := hostname.Canonical(c.Domain)
	if domain == "" {
		return errors.New("domain is required (the relay's own host name, e.g. proxy.example.com)")
	}
	if err := hostname.ValidateDomain(domain); err != nil {
		return err
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return errors.New("tls-cert-file and tls-key-file go together")
	}
	if c.TLSCertFile == "" && c.StateDir == "" {
		return errors.New("either tls-cert-file/tls-key-file or state-dir is required")
	}
	if c.SigningKeyFile == "" && c.StateDir == "" {
		return errors.New("signing-key-file is required (or state-dir, which keeps one)")
	}
	if c.Liveness.ReadIdle < 0 || c.Liveness.Ping < 0 || c.HelloTimeout < 0 || c.StreamTimeout < 0 || c.DrainTimeout < 0 || c.RequestHeaderTimeout < 0 || c.WriteStallTimeout < 0 || c.RevocationInterval < 0 {
		return errors.New("timeouts must not be negative")
	}
	if c.MaxPendingHellos < 0 || c.MaxPendingHellosPerSource < 0 || c.MaxHeaderBytes < 0 || c.AuthFailureBurst < 0 ||
		c.AuthFailuresPerSecond < 0 || c.RegistrationsPerSecond < 0 || c.MaxStreamsPerSource < 0 || c.MaxSessionsPerCluster < 0 || c.MaxIdleConnsPerSource < 0 {
		return errors.New("limits must not be negative")
	}
	return c.validateFleet()
}
