// Package server is the relay: one public TLS listener shared by agents and
// users. It reads each connection's server name, terminates the relay's own
// domain (the agents' tunnel endpoint, health and metrics), and carries every
// <label>.<domain> connection down the tunnel of the agent that registered
// that label.
//
// Files by the path of the data: server.go is the lifecycle (New, Serve,
// drain); dispatch.go sorts each public connection by server name;
// api.go is the relay's own HTTPS API and tunnel.go its tunnel endpoint
// (authorize, register); passthrough.go carries raw TLS down a stream and
// terminate.go one request or upgrade per stream, or (httpconns.go) short
// requests on kept-alive HTTP/1.1 streams; streams.go holds the
// stream slots both use; registry.go says which agents serve which label;
// limit.go bounds what strangers can cost; state.go is the state dir.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Server is the relay.
type Server struct {
	cfg     Config
	log     *slog.Logger
	tlsConf *tls.Config
	tokens  *token.Verifier
	relay   *tunnel.RelayTransport // the HTTP/2 client side of every tunnel
	reg     *registry
	m       *metrics
	limiter *rate.Limiter
	fails   *failLimiter
	hellos  *helloGate
	// srcStreams counts each source's streams per host name.
	srcStreams *sourceStreams
	// inFlight counts the connections and requests the relay carries
	// now, of every kind (see InFlight).
	inFlight atomic.Int64
	// idle counts each source's idle keep-alive connections.
	idle *idleConns
	// clusterRegs rate-limits each cluster's registrations.
	clusterRegs *failLimiter
	upgrader    websocket.Upgrader
	// watched maps each TLS connection handed to the HTTPS server, until it
	// serves a request, to what lies under it (see connState).
	watched sync.Map // *tls.Conn -> *watchedConn

	// api is the relay's own HTTPS API; health is its part the plain-HTTP
	// health port serves (see api.go).
	api, health *http.ServeMux

	// https serves the relay's own domain and terminate-mode routes; it is
	// fed TLS connections by the SNI router through httpLn.
	https  *http.Server
	httpLn *connListener

	// fl is the relay's share of the fleet: registry, peer channel.
	fl *fleetPart

	draining atomic.Bool
	splices  sync.Map       // splicedConn -> *session: spliced connections (splice.go)
	drainer  *drainer       // moves and streamed responses (drain.go)
	workers  *workers       // run HTTP/2 requests (workers.go); set by Serve
	pooled   pooledSessions // sessions with HTTP connection pools (httpconns.go)
	conns    sync.WaitGroup // raw connections being proxied or routed
	connsMu  sync.Mutex
	open     map[net.Conn]struct{}
}

// New checks cfg, creates the local state it asks for, and returns a relay.
func New(cfg Config) (*Server, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid relay config: %w", err)
	}
	if err := cfg.ensureState(); err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("loading relay certificate: %w", err)
	}
	key, err := token.ReadKey(cfg.SigningKeyFile)
	if err != nil {
		return nil, err
	}
	relay, err := tunnel.NewRelayTransport(cfg.Liveness)
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg: cfg,
		log: cfg.Logger,
		tlsConf: &tls.Config{
			Certificates: []tls.Certificate{cert},
			// TLS 1.2 at least, and for 1.2 only forward-secret AEAD
			// suites (1.3 suites are all of that kind and not settable).
			MinVersion:   tls.VersionTLS12,
			CipherSuites: cipherSuites,
			NextProtos:   []string{"h2", "http/1.1"},
		},
		tokens:      token.NewVerifier(key, cfg.RevocationFile),
		relay:       relay,
		reg:         newRegistry(),
		m:           newMetrics(),
		limiter:     rate.NewLimiter(rate.Limit(cfg.RegistrationsPerSecond), max(1, int(cfg.RegistrationsPerSecond))),
		fails:       newFailLimiter(cfg.AuthFailuresPerSecond, cfg.AuthFailureBurst),
		hellos:      newHelloGate(cfg.MaxPendingHellos, cfg.MaxPendingHellosPerSource),
		srcStreams:  newSourceStreams(cfg.MaxStreamsPerSource),
		clusterRegs: newFailLimiter(clusterRegistrationsPerSecond, clusterRegistrationBurst),
		idle:        newIdleConns(cfg.MaxIdleConnsPerSource),
		// Sized for many idle tunnels; see tunnel.NewUpgrader.
		upgrader: tunnel.NewUpgrader(),
		open:     map[net.Conn]struct{}{},
	}
	s.drainer = newDrainer(s)
	// Slots in use on every tunnel: back to zero once every stream ended,
	// whichever way it ended.
	s.m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "spectro_proxy_stream_slots_used", Help: "Stream slots taken on all tunnels now (see MaxStreamsPerTunnel).",
	}, func() float64 {
		var n int32
		for _, sess := range s.reg.all() {
			n += sess.streams.Load()
		}
		return float64(n)
	}))
	if s.fl, err = newFleet(cfg, s.m); err != nil {
		return nil, err
	}
	s.api, s.health = s.newAPI()
	s.httpLn = newConnListener()
	s.https = &http.Server{
		Handler: http.HandlerFunc(s.serveHTTPS),
		// Slow clients must not hold goroutines forever: the TLS handshake
		// and headers must arrive promptly (net/http applies this to the
		// handshake too). No WriteTimeout: watches and logs -f stream for
		// hours.
		ReadHeaderTimeout: cfg.RequestHeaderTimeout,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    cfg.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
		ConnState:         s.connState,
		// Requests carry their connection, so serveHTTPS can mark it
		// served (net/http calls a connection active as soon as the first
		// header byte arrives, too early to tell a slowloris apart).
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
	return s, nil
}

// Run listens on cfg.Listen and serves until ctx is done, then drains.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", s.cfg.Listen, err)
	}
	return s.Serve(ctx, ln)
}

// Serve accepts connections on ln until ctx is done, then stops accepting,
// lets connections in flight finish for up to DrainTimeout, and closes the
// rest and every tunnel.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	// Connections get a context of their own: ctx ending stops the
	// accepting, but the streams in flight must outlive it to be drained.
	// hardStop ends them once the drain is over.
	connCtx, hardStop := context.WithCancel(context.WithoutCancel(ctx))
	s.workers = newWorkers(maxWorkers, connCtx.Done(), idleTick)
	defer s.workers.wait() // after the hard stop below
	defer hardStop()
	leaveFleet, err := s.joinFleet(ctx, connCtx)
	if err != nil {
		return err
	}
	defer leaveFleet()
	s.log.Info("relay listening", "addr", ln.Addr().String(), "domain", s.cfg.Domain)
	if s.tokens.RevocationFileMissing() {
		s.log.Error("revocation file does not exist: no token is revoked until it is created", "revocation_file", s.cfg.RevocationFile)
	}
	// Tunnels go away during the drain too (agents moving off this
	// relay): this runs until the hard stop.
	retireCtx, stopRetire := context.WithCancel(connCtx)
	retireDone := make(chan struct{})
	go func() { defer close(retireDone); s.retireHTTPConns(retireCtx) }()
	defer func() { stopRetire(); <-retireDone }()
	revCtx, stopRev := context.WithCancel(ctx)
	revDone := make(chan struct{})
	go func() { defer close(revDone); s.checkRevocations(revCtx) }()
	defer func() { stopRev(); <-revDone }()
	// HTTPS requests carry connCtx too, so that the drain's hard stop ends
	// what is still running. A hijacked upgrade (kubectl exec) is no longer
	// the HTTPS server's to close: ReverseProxy closes its backend side when
	// the request's context ends, and without this one forwarded to another
	// replica held the drain forever (TestScaleOut, rolling a replica).
	s.https.BaseContext = func(net.Listener) context.Context { return connCtx }
	httpsDone := make(chan struct{})
	go func() {
		defer close(httpsDone)
		_ = s.https.Serve(s.httpLn)
	}()
	stop := context.AfterFunc(ctx, func() { s.beginDrain(ln) })
	defer stop()

	var acceptErr error
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					continue
				}
				acceptErr = fmt.Errorf("accepting connections: %w", err)
			}
			break
		}
		s.track(conn, true)
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			defer s.track(conn, false)
			s.handleConn(connCtx, conn)
		}()
	}
	s.drain(hardStop)
	<-httpsDone
	return acceptErr
}

func (s *Server) track(c net.Conn, add bool) {
	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	if add {
		s.open[c] = struct{}{}
	} else {
		delete(s.open, c)
	}
}

// drain runs once the listener is closed; hardStop cancels the streams
// still open when the drain timeout is up.
func (s *Server) drain(hardStop context.CancelFunc) {
	s.draining.Store(true)
	s.log.Info("relay draining", "timeout", s.cfg.DrainTimeout.String())
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
	defer cancel()
	go s.endStreamedResponses(ctx)
	s.goAwaySplices()
	// A fresh context: Shutdown with the already-cancelled serve context
	// would skip the drain entirely.
	if err := s.https.Shutdown(ctx); err != nil {
		// Past the drain timeout what is still running is cut, so that
		// shutdown ends (Shutdown itself never closes active connections).
		s.log.Warn("drain timeout: closing HTTPS connections still active", "error", err)
		s.https.Close()
	}
	s.stopPeers(ctx)
	done := make(chan struct{})
	go func() { s.conns.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		hardStop()
		s.connsMu.Lock()
		n := len(s.open)
		for c := range s.open {
			c.Close()
		}
		s.connsMu.Unlock()
		s.log.Warn("drain timeout: closing connections still open", "count", n)
	}
	s.awaitMoves(ctx) // the agents' replacements, before their old tunnels go
	for _, sess := range s.reg.all() {
		sess.close()
	}
	s.conns.Wait()
	s.httpLn.Close()
}

// Each cluster's registrations: a burst that covers all its replicas
// reconnecting at once, then one a second (issue 11: one token registered
// over 1000 sessions in 5 s under new agent ids).
const (
	clusterRegistrationsPerSecond = 1
	clusterRegistrationBurst      = 2 * DefaultMaxSessionsPerCluster
)

// cipherSuites are the TLS 1.2 suites the relay accepts: ECDHE key
// exchange and AEAD ciphers only (no CBC, no RSA key exchange).
var cipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// Tunnels returns the number of connected agent sessions.
func (s *Server) Tunnels() int { return s.reg.count() }

// InFlight is how many connections and requests the relay carries now:
// passthrough connections (its own, forwarded, and served for a peer),
// terminated requests and upgrades, and connections to its HTTPS server
// before their first request (their TLS handshake). The relay's main runs
// on one Go processor while this stays low (internal/procs).
func (s *Server) InFlight() int { return int(s.inFlight.Load()) }
