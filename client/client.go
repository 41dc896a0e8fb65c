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
	// tunnels holds the agent's tunnel slots (tunnels.go).
	tunnels tunnelSlots
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
	c.tunnels.init()
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

// Ready reports whether a tunnel is up (and the agent is not stopping).
func (c *Client) Ready() bool { return c.tunnels.up.Load() > 0 && !c.tunnels.stopping.Load() }

// Tunnels returns how many tunnels are connected now: two on distinct
// relay replicas, or one; for a moment three while one moves.
func (c *Client) Tunnels() int { return int(c.tunnels.up.Load()) }

// Connects returns how many tunnels have been established so far.
func (c *Client) Connects() int64 { return c.connects.Load() }

// Run first settles the API server route's mode (decideMode: in auto mode
// it waits for the API server), starts publishing the kubeconfig skeleton
// in the background when configured, then keeps its tunnels up (one, or
// two on distinct relay replicas: see tunnels.go) until ctx is done, and
// drains: the relay is told (GOAWAY) to open no new streams here, and
// streams in flight get up to DrainTimeout to finish.
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
	c.runTunnels(ctx)
	for _, r := range c.routes {
		r.transport.CloseIdleConnections()
	}
	return nil
}

// jitter spreads d over [d/2, d) so a fleet does not retry in lockstep.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// retryWait is how long to wait before the next dial: the backoff delay
// with jitter, or longer when the relay asked for it (Retry-After).
func retryWait(delay time.Duration, err error) time.Duration {
	wait := jitter(delay)
	var ra *retryAfterError
	if errors.As(err, &ra) && ra.after > wait {
		wait = ra.after + jitter(delay)
	}
	return wait
}

type retryAfterError struct {
	after time.Duration
	err   error
}

func (e *retryAfterError) Error() string { return e.err.Error() }
func (e *retryAfterError) Unwrap() error { return e.err }

// dial opens the WebSocket tunnel under agentID and authenticates.
func (c *Client) dial(ctx context.Context, agentID string) (*liveTunnel, error) {
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
	h.Set(tunnel.HeaderAgent, agentID)
	h.Set(tunnel.HeaderRoutes, tunnel.FormatRoutes(routes))
	h.Set(tunnel.HeaderStreams, tunnel.StreamHTTP+", "+tunnel.StreamH2)
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
	// A relay that predates replicas sends neither header: one replica.
	n, _ := strconv.Atoi(resp.Header.Get(tunnel.HeaderReplicas))
	return &liveTunnel{conn: tunnel.NewConn(ws), agentID: agentID, replica: resp.Header.Get(tunnel.HeaderReplica), replicas: max(1, n)}, nil
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
