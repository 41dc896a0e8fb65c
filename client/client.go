package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/profiling"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Client is the agent.
type Client struct {
	cfg     Config
	log     *slog.Logger
	routes  map[string]*route
	relay   *relayDialer
	dialer  *websocket.Dialer
	metrics *metrics
	ready   atomic.Bool
	// mode is the API server route's mode once chosen (a tunnel.Mode), and
	// modeErr why it is not chosen yet (an error), both for /readyz.
	mode, modeErr atomic.Value
	// connects counts tunnels established, for tests and logs.
	connects atomic.Int64
}

// New checks cfg and prepares the agent's routes.
func New(cfg Config) (*Client, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid agent config: %w", err)
	}
	c := &Client{cfg: cfg, log: cfg.Logger, metrics: newMetrics()}
	routes, err := buildRoutes(&cfg)
	if err != nil {
		return nil, err
	}
	c.routes = routes
	tlsConf := &tls.Config{ServerName: cfg.Server, MinVersion: tls.VersionTLS12}
	if cfg.RelayCAFile != "" {
		pemCerts, err := os.ReadFile(cfg.RelayCAFile)
		if err != nil {
			return nil, fmt.Errorf("reading relay CA: %w", err)
		}
		if tlsConf.RootCAs, err = pki.Pool(pemCerts); err != nil {
			return nil, fmt.Errorf("relay CA %s: %w", cfg.RelayCAFile, err)
		}
	}
	nd := &net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 30 * time.Second}
	if c.relay, err = newRelayDialer(&cfg, nd); err != nil {
		return nil, err
	}
	if c.relay.proxy != nil {
		c.log.Info("the relay connection goes through an HTTP proxy", "proxy", c.relay.proxyName(), "connect", c.relay.addr)
	}
	c.dialer = &websocket.Dialer{
		NetDialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := c.relay.DialContext(ctx)
			if err != nil {
				return nil, err
			}
			// One write syscall per tunnel message, not one per TLS record.
			return tunnel.NewBatchConn(c), nil
		},
		TLSClientConfig:  tlsConf,
		HandshakeTimeout: cfg.DialTimeout,
		ReadBufferSize:   64 << 10,
		WriteBufferSize:  64 << 10,
	}
	return c, nil
}

// Ready reports whether a tunnel is up.
func (c *Client) Ready() bool { return c.ready.Load() }

// Connects returns how many tunnels have been established so far.
func (c *Client) Connects() int64 { return c.connects.Load() }

// Run first settles the API server route's mode (decideMode: in auto mode
// it waits for the API server), starts publishing the kubeconfig skeleton
// in the background when configured, then keeps a tunnel up until ctx is
// done, and drains: the relay is told
// (GOAWAY) to open no new streams here, and streams in flight get up to
// DrainTimeout to finish.
func (c *Client) Run(ctx context.Context) error {
	if c.cfg.HealthAddr != "" {
		ln, err := net.Listen("tcp", c.cfg.HealthAddr)
		if err != nil {
			return fmt.Errorf("listening for health checks on %s: %w", c.cfg.HealthAddr, err)
		}
		h := c.healthHandler()
		if c.cfg.Pprof {
			h = profiling.Wrap(h)
		}
		hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(ln)
		defer hs.Close()
	}
	mode, err := c.decideMode(ctx)
	if err != nil {
		return nil // ctx ended before the API server answered
	}
	c.setMode(mode)
	if c.cfg.KubeconfigConfigMap != "" {
		var wg sync.WaitGroup
		defer wg.Wait()
		pctx, cancel := context.WithCancel(ctx)
		defer cancel()
		wg.Go(func() { c.publish(pctx, mode) })
	}
	delay := c.cfg.BackoffMin
	for {
		started := time.Now()
		err := c.connectOnce(ctx)
		if ctx.Err() != nil {
			return nil
		}
		// A tunnel that stayed up a while resets the backoff: after a relay
		// restart the agent should be back in well under 5 s.
		if time.Since(started) > 30*time.Second {
			delay = c.cfg.BackoffMin
		}
		wait := jitter(delay)
		var ra *retryAfterError
		if errors.As(err, &ra) && ra.after > wait {
			wait = ra.after + jitter(delay)
		}
		c.log.Warn("tunnel down; reconnecting", "error", err, "retry_in", wait.Round(time.Millisecond).String())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		delay = min(delay*2, c.cfg.BackoffMax)
	}
}

// jitter spreads d over [d/2, d) so a fleet does not retry in lockstep.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

type retryAfterError struct {
	after time.Duration
	err   error
}

func (e *retryAfterError) Error() string { return e.err.Error() }
func (e *retryAfterError) Unwrap() error { return e.err }

func (c *Client) connectOnce(ctx context.Context) error {
	conn, err := c.dial(ctx)
	if err != nil {
		return err
	}
	c.connects.Add(1)
	c.metrics.connects.Inc()
	c.metrics.tunnelUp.Set(1)
	c.ready.Store(true)
	defer func() {
		c.ready.Store(false)
		c.metrics.tunnelUp.Set(0)
	}()
	c.log.Info("tunnel up", "relay", c.cfg.relayAddr(), "proxy", c.relay.proxyName(), "hostnames", c.hostnames())

	srv := tunnel.NewAgentServer(http.HandlerFunc(c.serveStream), c.cfg.MaxStreams, c.cfg.Liveness)
	hardStop, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.ServeConn(hardStop, conn)
	}()
	select {
	case <-served:
		return errors.New("tunnel closed")
	case <-ctx.Done():
	}
	c.ready.Store(false)
	c.log.Info("draining tunnel", "timeout", c.cfg.DrainTimeout.String())
	dctx, dcancel := context.WithTimeout(context.Background(), c.cfg.DrainTimeout)
	defer dcancel()
	_ = srv.Shutdown(dctx)
	select {
	case <-served:
	case <-dctx.Done():
		c.log.Warn("drain timeout: closing tunnel with streams still open")
		cancel()
		<-served
	}
	return nil
}

// dial opens the WebSocket tunnel and authenticates.
func (c *Client) dial(ctx context.Context) (net.Conn, error) {
	tok, err := os.ReadFile(c.cfg.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("reading tunnel token: %w", err)
	}
	routes := map[string]tunnel.Mode{}
	for label, r := range c.routes {
		routes[label] = r.mode
	}
	h := http.Header{}
	h.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	h.Set(tunnel.HeaderAgent, c.cfg.AgentID)
	h.Set(tunnel.HeaderRoutes, tunnel.FormatRoutes(routes))
	u := "wss://" + net.JoinHostPort(c.cfg.Server, strconv.Itoa(c.cfg.Port)) + tunnel.Path
	ws, resp, err := c.dialer.DialContext(ctx, u, h)
	if err != nil {
		if resp == nil {
			return nil, fmt.Errorf("dialing relay %s: %w", c.relay.addr, err)
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		resp.Body.Close()
		err = fmt.Errorf("relay refused tunnel: %s: %s", resp.Status, strings.TrimSpace(string(body)))
		if s, perr := strconv.Atoi(resp.Header.Get("Retry-After")); perr == nil && s > 0 {
			return nil, &retryAfterError{after: time.Duration(s) * time.Second, err: err}
		}
		return nil, err
	}
	return tunnel.NewConn(ws), nil
}

func (c *Client) hostnames() []string {
	out := make([]string, 0, len(c.routes))
	for label, r := range c.routes {
		out = append(out, label+"."+c.cfg.Server+" -> "+r.target.String()+" ("+string(r.mode)+")")
	}
	return out
}

func (c *Client) healthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		mode := c.Mode()
		switch {
		case mode == "":
			msg := "choosing a mode: waiting for the API server certificate"
			if err, _ := c.modeErr.Load().(error); err != nil {
				msg += ": " + err.Error()
			}
			http.Error(w, msg, http.StatusServiceUnavailable)
		case !c.Ready():
			http.Error(w, "tunnel to relay is not up mode="+string(mode), http.StatusServiceUnavailable)
		default:
			fmt.Fprintln(w, "ok mode="+string(mode))
		}
	})
	mux.Handle("/metrics", promhttp.HandlerFor(c.metrics.reg, promhttp.HandlerOpts{}))
	return mux
}

// Mode returns the API server route's mode (passthrough or terminate), or
// "" while the agent is still choosing it (mode auto).
func (c *Client) Mode() tunnel.Mode {
	m, _ := c.mode.Load().(tunnel.Mode)
	return m
}

// setMode records the chosen mode before the first connect: the route
// registers with it, and /readyz, /metrics and the ConfigMap report it.
func (c *Client) setMode(m tunnel.Mode) {
	c.routes[c.cfg.Subdomain].mode = m
	c.mode.Store(m)
	c.metrics.mode.WithLabelValues(string(m)).Set(1)
	c.log.Info("API server route mode", "mode", m, "configured", c.cfg.Mode, "hostname", c.cfg.Subdomain+"."+c.cfg.Server)
}

func (c *Client) setModeErr(err error) { c.modeErr.Store(err) }
