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
	revoked  *token.Revocations
	reg      *registry
	m        *metrics
	limiter  *rate.Limiter
	upgrader websocket.Upgrader

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
	s := &Server{
		cfg: cfg,
		log: cfg.Logger,
		tlsConf: &tls.Config{
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
			NextProtos:   []string{"h2", "http/1.1"},
		},
		key:     key,
		revoked: token.NewRevocations(cfg.RevocationFile),
		reg:     newRegistry(),
		m:       newMetrics(),
		limiter: rate.NewLimiter(rate.Limit(cfg.RegistrationsPerSecond), max(1, int(cfg.RegistrationsPerSecond))),
		// Sized for many idle tunnels; see tunnel.NewUpgrader.
		upgrader: tunnel.NewUpgrader(),
		open:     map[net.Conn]struct{}{},
	}
	s.httpLn = newConnListener()
	s.https = &http.Server{
		Handler: http.HandlerFunc(s.serveHTTPS),
		// Slow clients must not hold goroutines forever: headers must
		// arrive promptly. No WriteTimeout: watches and logs -f stream for
		// hours.
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
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
	stop := context.AfterFunc(ctx, func() { ln.Close() })
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
			s.handleConn(ctx, conn)
		}()
	}
	s.drain()
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

// drain runs once the listener is closed.
func (s *Server) drain() {
	s.draining.Store(true)
	s.log.Info("relay draining", "timeout", s.cfg.DrainTimeout.String())
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
	defer cancel()
	// A fresh context: Shutdown with the already-cancelled serve context
	// would skip the drain entirely.
	_ = s.https.Shutdown(ctx)
	done := make(chan struct{})
	go func() { s.conns.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
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
	name, pc, err := sni.Peek(conn, s.cfg.HelloTimeout)
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
	name = strings.ToLower(strings.TrimSuffix(name, "."))
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
	if !s.httpLn.push(tls.Server(c, s.tlsConf)) {
		c.Close()
	}
}

// labelOf returns the label of a name one level under the relay's domain.
func (s *Server) labelOf(name string) (string, bool) {
	label, ok := strings.CutSuffix(name, "."+s.cfg.Domain)
	if !ok || label == "" || strings.Contains(label, ".") {
		return "", false
	}
	return label, true
}

func (s *Server) refuse(reason string, args ...any) {
	s.m.refusals.WithLabelValues(reason).Inc()
	s.log.Info("refused", append([]any{"reason", reason}, args...)...)
}

// serveHTTPS serves connections whose TLS the relay terminated.
func (s *Server) serveHTTPS(w http.ResponseWriter, r *http.Request) {
	name := strings.ToLower(strings.TrimSuffix(r.TLS.ServerName, "."))
	if name == s.cfg.Domain || name == "" {
		s.serveAPI(w, r)
		return
	}
	label, _ := s.labelOf(name)
	s.serveTerminated(w, r, label)
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
		out = append(out, fmt.Sprintf("%s.%s (%s)", label, s.cfg.Domain, mode))
	}
	return out
}
