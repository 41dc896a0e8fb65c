package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/time/rate"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/sni"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Server is the relay.
type Server struct {
	cfg      Config
	log      *slog.Logger
	tlsConf  *tls.Config
	key      []byte
	relay    *tunnel.RelayTransport // the HTTP/2 client side of every tunnel
	revoked  *token.Revocations
	reg      *registry
	m        *metrics
	limiter  *rate.Limiter
	fails    *failLimiter
	hellos   *helloGate
	upgrader websocket.Upgrader
	// watched maps each TLS connection handed to the HTTPS server, until it
	// serves a request, to what lies under it (see connState).
	watched sync.Map // *tls.Conn -> *watchedConn

	// https serves the relay's own domain and terminate-mode routes; it is
	// fed TLS connections by the SNI router through httpLn.
	https  *http.Server
	httpLn *connListener

	draining atomic.Bool
	conns    sync.WaitGroup // raw connections being proxied or routed
	connsMu  sync.Mutex
	open     map[net.Conn]struct{}
}

// New checks cfg, creates the local state it asks for, and returns a relay.
func New(cfg Config) (*Server, error) {
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
		key:     key,
		relay:   relay,
		revoked: token.NewRevocations(cfg.RevocationFile),
		reg:     newRegistry(),
		m:       newMetrics(),
		limiter: rate.NewLimiter(rate.Limit(cfg.RegistrationsPerSecond), max(1, int(cfg.RegistrationsPerSecond))),
		fails:   newFailLimiter(cfg.AuthFailuresPerSecond, cfg.AuthFailureBurst),
		hellos:  newHelloGate(cfg.MaxPendingHellos, cfg.MaxPendingHellosPerSource),
		// Sized for many idle tunnels; see tunnel.NewUpgrader.
		upgrader: tunnel.NewUpgrader(),
		open:     map[net.Conn]struct{}{},
	}
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
	s.log.Info("relay listening", "addr", ln.Addr().String(), "domain", s.cfg.Domain)
	httpsDone := make(chan struct{})
	go func() {
		defer close(httpsDone)
		_ = s.https.Serve(s.httpLn)
	}()
	stop := context.AfterFunc(ctx, func() {
		s.draining.Store(true)
		if s.cfg.ShutdownDelay <= 0 {
			ln.Close()
			return
		}
		s.log.Info("relay not ready; accepting until the shutdown delay is over", "delay", s.cfg.ShutdownDelay.String())
		time.AfterFunc(s.cfg.ShutdownDelay, func() { ln.Close() })
	})
	defer stop()
	// Connections get a context of their own: ctx ending stops the
	// accepting, but the streams in flight must outlive it to be drained.
	// hardStop ends them once the drain is over.
	connCtx, hardStop := context.WithCancel(context.WithoutCancel(ctx))
	defer hardStop()

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
	// A fresh context: Shutdown with the already-cancelled serve context
	// would skip the drain entirely.
	if err := s.https.Shutdown(ctx); err != nil {
		// Past the drain timeout what is still running is cut, so that
		// shutdown ends (Shutdown itself never closes active connections).
		s.log.Warn("drain timeout: closing HTTPS connections still active", "error", err)
		s.https.Close()
	}
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
	for _, sess := range s.reg.all() {
		sess.close()
	}
	s.conns.Wait()
	s.httpLn.Close()
}

// handleConn routes one public connection by its server name.
func (s *Server) handleConn(ctx context.Context, conn net.Conn) {
	remote := conn.RemoteAddr().String()
	src := sourceOf(remote)
	if !s.hellos.enter(src) {
		s.refuse(reasonTooManyHellos, "remote", remote)
		conn.Close()
		return
	}
	name, pc, err := sni.Peek(conn, s.cfg.HelloTimeout)
	s.hellos.leave(src)
	if err != nil {
		reason := reasonNotTLS
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			reason = reasonHelloTimeout
		}
		s.refuse(reason, "remote", conn.RemoteAddr().String(), "error", err.Error())
		conn.Close()
		return
	}
	name = hostname.Canonical(name)
	if name == s.cfg.Domain {
		s.handOff(pc)
		return
	}
	label, ok := s.labelOf(name)
	if !ok {
		reason := reasonUnknownHost
		if name == "" {
			reason = reasonNoServerName
		}
		s.refuse(reason, "host", name, "remote", conn.RemoteAddr().String())
		_ = sni.WriteAlert(conn, sni.AlertUnrecognizedName)
		conn.Close()
		return
	}
	cands, mode, known := s.reg.candidates(label)
	if !known {
		s.refuse(reasonUnknownHost, "host", name, "remote", conn.RemoteAddr().String())
		_ = sni.WriteAlert(conn, sni.AlertUnrecognizedName)
		conn.Close()
		return
	}
	if mode == "terminate" {
		// TLS ends here; HTTP requests then go down the tunnel one stream
		// each (and "agent not connected" can be said in HTTP).
		s.handOff(pc)
		return
	}
	s.passthrough(ctx, pc, label, cands)
}

// handOff terminates TLS and gives the connection to the HTTPS server.
func (s *Server) handOff(c net.Conn) {
	wc := &watchedConn{Conn: c}
	// Tunnels batch their TLS records into one write per message; other
	// connections write through.
	tc := tls.Server(tunnel.NewBatchConn(wc), s.tlsConf)
	s.watched.Store(tc, wc)
	if !s.httpLn.push(tc) {
		s.watched.Delete(tc)
		c.Close()
	}
}

// connState explains connections the HTTPS server closed before a single
// request reached serveHTTPS, which net/http does silently: a slow handshake or slow
// headers (slowloris), headers over MaxHeaderBytes (answered 431), or
// nothing usable at all (a failed TLS handshake, a bad request, a client
// that only connected).
func (s *Server) connState(c net.Conn, state http.ConnState) {
	switch state {
	case http.StateHijacked:
		s.watched.Delete(c)
	case http.StateClosed:
		v, ok := s.watched.LoadAndDelete(c)
		if !ok {
			return
		}
		wc := v.(*watchedConn)
		remote := wc.RemoteAddr().String()
		switch {
		case wc.timedOut.Load():
			s.refuse(reasonRequestTimeout, "remote", remote, "timeout", s.cfg.RequestHeaderTimeout.String())
		case wc.read.Load() > int64(s.cfg.MaxHeaderBytes):
			s.refuse(reasonHeadersTooLarge, "remote", remote, "read_bytes", wc.read.Load(), "max_header_bytes", s.cfg.MaxHeaderBytes)
		default:
			// Common and harmless (probes, clients that gave up): counted,
			// logged only at debug level.
			s.m.refusals.WithLabelValues(reasonNoRequest).Inc()
			s.log.Debug("refused", "reason", reasonNoRequest, "remote", remote)
		}
	}
}

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

// labelOf returns the label of a name one level under the relay's domain.
func (s *Server) labelOf(name string) (string, bool) {
	return hostname.LabelOf(name, s.cfg.Domain)
}

func (s *Server) refuse(reason string, args ...any) {
	s.m.refusals.WithLabelValues(reason).Inc()
	s.log.Info("refused", append([]any{"reason", reason}, args...)...)
}

// connKey is the context key of a request's connection.
type connKey struct{}

// serveHTTPS serves connections whose TLS the relay terminated.
func (s *Server) serveHTTPS(w http.ResponseWriter, r *http.Request) {
	if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
		s.watched.Delete(c)
	}
	name := hostname.Canonical(r.TLS.ServerName)
	if name == s.cfg.Domain || name == "" {
		s.serveAPI(w, r)
		return
	}
	// Browsers reuse an HTTP/2 connection for any host its certificate
	// covers, and ours covers *.domain: a request for one cluster could
	// arrive on a connection opened for another. 421 makes the client
	// retry on a connection of its own, so routing by SNI stays right.
	// A Host outside the domain (kubectl with tls-server-name dialing
	// 127.0.0.1) is no such case: SNI alone names the cluster then.
	if host := strings.ToLower(stripPort(r.Host)); host != name && hostname.InDomain(host, s.cfg.Domain) {
		s.refuse(reasonMisdirected, "host", host, "sni", name, "remote", r.RemoteAddr)
		http.Error(w, "spectro-proxy: request for "+host+" on a connection for "+name, http.StatusMisdirectedRequest)
		return
	}
	label, _ := s.labelOf(name)
	s.serveTerminated(w, r, label)
}

func stripPort(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

// serveAPI is the relay's own HTTPS API.
func (s *Server) serveAPI(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/v1/tunnel":
		s.serveTunnel(w, r)
	case "/healthz":
		fmt.Fprintln(w, "ok")
	case "/readyz":
		if s.draining.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	case "/metrics":
		promhttp.HandlerFor(s.m.reg, promhttp.HandlerOpts{}).ServeHTTP(w, r)
	default:
		http.NotFound(w, r)
	}
}

// Tunnels returns the number of connected agent sessions.
func (s *Server) Tunnels() int { return s.reg.count() }

// connListener is a net.Listener fed by the SNI router.
type connListener struct {
	ch     chan net.Conn
	done   chan struct{}
	once   sync.Once
	mu     sync.RWMutex
	closed bool
}

func newConnListener() *connListener {
	return &connListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *connListener) push(c net.Conn) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return false
	}
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.mu.Lock()
		l.closed = true
		l.mu.Unlock()
	})
	return nil
}

func (l *connListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// hostnameList renders the public host names of a session's labels.
func (s *Server) hostnames(sess *session) []string {
	out := make([]string, 0, len(sess.routes))
	for label, mode := range sess.routes {
		out = append(out, fmt.Sprintf("%s (%s)", hostname.Host(label, s.cfg.Domain), mode))
	}
	return out
}
