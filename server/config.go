package server

import (
	"errors"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Config is the relay's configuration. Zero durations take the defaults.
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
	// Liveness detects dead tunnels (an agent gone without a FIN).
	Liveness tunnel.Liveness
	// StreamTimeout bounds the wait for an agent to answer a new stream.
	StreamTimeout time.Duration
	// MaxStreamsPerTunnel caps concurrent streams one agent must serve.
	MaxStreamsPerTunnel uint32
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

	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.Listen == "" {
		c.Listen = ":8443"
	}
	if c.HelloTimeout == 0 {
		c.HelloTimeout = 5 * time.Second
	}
	if c.MaxPendingHellos == 0 {
		c.MaxPendingHellos = 4096
	}
	if c.MaxPendingHellosPerSource == 0 {
		c.MaxPendingHellosPerSource = 256
	}
	if c.RequestHeaderTimeout == 0 {
		c.RequestHeaderTimeout = 10 * time.Second
	}
	if c.MaxHeaderBytes == 0 {
		c.MaxHeaderBytes = 64 << 10
	}
	if c.AuthFailuresPerSecond == 0 {
		c.AuthFailuresPerSecond = 0.2
	}
	if c.AuthFailureBurst == 0 {
		c.AuthFailureBurst = 10
	}
	if c.Liveness.ReadIdle == 0 {
		c.Liveness.ReadIdle = tunnel.DefaultLiveness.ReadIdle
	}
	if c.Liveness.Ping == 0 {
		c.Liveness.Ping = tunnel.DefaultLiveness.Ping
	}
	if c.StreamTimeout == 0 {
		c.StreamTimeout = 10 * time.Second
	}
	if c.MaxStreamsPerTunnel == 0 {
		c.MaxStreamsPerTunnel = 1000
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 25 * time.Second
	}
	if c.RegistrationsPerSecond == 0 {
		c.RegistrationsPerSecond = 200
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	c.Domain = hostname.Canonical(c.Domain)
	if c.SigningKeyFile == "" && c.StateDir != "" {
		c.SigningKeyFile = filepath.Join(c.StateDir, "signing.key")
	}
}

// Validate reports the first thing wrong with the configuration.
func (c *Config) Validate() error {
	c.setDefaults()
	if c.Domain == "" {
		return errors.New("domain is required (the relay's own host name, e.g. proxy.example.com)")
	}
	if err := hostname.ValidateDomain(c.Domain); err != nil {
		return err
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return errors.New("tls-cert-file and tls-key-file go together")
	}
	if c.TLSCertFile == "" && c.StateDir == "" {
		return errors.New("either tls-cert-file/tls-key-file or state-dir is required")
	}
	if c.SigningKeyFile == "" {
		return errors.New("signing-key-file is required (or state-dir, which keeps one)")
	}
	if c.Liveness.ReadIdle < 0 || c.Liveness.Ping < 0 || c.HelloTimeout < 0 || c.StreamTimeout < 0 || c.DrainTimeout < 0 || c.RequestHeaderTimeout < 0 {
		return errors.New("timeouts must not be negative")
	}
	if c.MaxPendingHellos < 0 || c.MaxPendingHellosPerSource < 0 || c.MaxHeaderBytes < 0 || c.AuthFailureBurst < 0 ||
		c.AuthFailuresPerSecond < 0 || c.RegistrationsPerSecond < 0 {
		return errors.New("limits must not be negative")
	}
	return nil
}
