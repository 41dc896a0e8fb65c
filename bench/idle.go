package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/proctest"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// IdleAgents are many minimal agents in this process: one WebSocket each to
// the relay, serving HTTP/2 on it like the real agent, with no routes behind
// them. They exist to load the relay with idle tunnels.
type IdleAgents struct {
	relay  *Relay
	srv    *tunnel.AgentServer
	dialer *websocket.Dialer
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	n      atomic.Int64

	// Set by NewFleetAgents: several relays, and redial after a drop.
	addrs      []string
	next       atomic.Uint64
	redial     bool
	reconnects atomic.Int64
	// redialErrs counts failed redials by error (first 200 chars).
	errMu      sync.Mutex
	redialErrs map[string]int
}

// writeBuffers is shared by every idle agent's WebSocket: an idle
// connection holds no write buffer of its own.
var writeBuffers = &sync.Pool{}

// NewIdleAgents prepares agents for r.
func NewIdleAgents(r *Relay) *IdleAgents {
	ctx, cancel := context.WithCancel(context.Background())
	nd := &net.Dialer{Timeout: 10 * time.Second}
	return &IdleAgents{
		relay: r,
		srv: tunnel.NewAgentServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "idle bench agent", http.StatusNotFound)
		}), 10, tunnel.DefaultLiveness),
		dialer: &websocket.Dialer{
			NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return nd.DialContext(ctx, network, r.Addr)
			},
			TLSClientConfig:  &tls.Config{ServerName: Domain, RootCAs: r.Roots, MinVersion: tls.VersionTLS12},
			HandshakeTimeout: 10 * time.Second,
			ReadBufferSize:   4 << 10,
			WriteBufferSize:  4 << 10,
			WriteBufferPool:  writeBuffers,
		},
		ctx:    ctx,
		cancel: cancel,
	}
}

// NewFleetAgents prepares agents for a fleet of relays sharing r's CA and
// signing key: each dial goes to the next of addrs and, when that one
// refuses the connection, to the one after (a load balancer's round robin
// and redispatch), and an agent whose tunnel drops dials again with the
// real agent's backoff (250 ms doubling, jittered, Retry-After honoured).
func NewFleetAgents(r *Relay, addrs []string) *IdleAgents {
	a := NewIdleAgents(r)
	a.addrs, a.redial = addrs, true
	nd := &net.Dialer{Timeout: 10 * time.Second}
	a.dialer.NetDialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		start := a.next.Add(1)
		var err error
		for i := range uint64(len(a.addrs)) {
			var c net.Conn
			if c, err = nd.DialContext(ctx, network, a.addrs[(start+i)%uint64(len(a.addrs))]); err == nil {
				return c, nil
			}
		}
		return nil, err
	}
	return a
}

func (a *IdleAgents) noteErr(err error) {
	msg := err.Error()
	// One count per kind, not per socket: drop the addresses.
	for _, op := range []string{"read tcp ", "write tcp ", "dial tcp "} {
		if i := strings.LastIndex(msg, ": "); i >= 0 && strings.HasPrefix(msg, op) {
			msg = op + msg[i+2:]
			break
		}
	}
	if len(msg) > 200 {
		msg = msg[:200]
	}
	a.errMu.Lock()
	if a.redialErrs == nil {
		a.redialErrs = map[string]int{}
	}
	a.redialErrs[msg]++
	a.errMu.Unlock()
}

// RedialErrors returns the failed redials so far, counted by error.
func (a *IdleAgents) RedialErrors() map[string]int {
	a.errMu.Lock()
	defer a.errMu.Unlock()
	return maps.Clone(a.redialErrs)
}

// Reconnects is how many tunnels were dialed again after a drop.
func (a *IdleAgents) Reconnects() int { return int(a.reconnects.Load()) }

// Count is how many agents are connected.
func (a *IdleAgents) Count() int { return int(a.n.Load()) }

// Grow connects agents until total are up, conc at a time, each for a
// cluster of its own (tokens allow one cluster's labels only).
func (a *IdleAgents) Grow(ctx context.Context, total, conc int) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	next := make(chan int)
	errc := make(chan error, conc)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for i := range next {
				if err := a.connect(ctx, i); err != nil {
					errc <- err
					cancel()
					return
				}
			}
		})
	}
feed:
	for i := a.Count(); i < total; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
	}
	return ctx.Err()
}

func (a *IdleAgents) connect(ctx context.Context, i int) error {
	uid := "idle-" + strconv.Itoa(i)
	tok, err := a.relay.Token(uid)
	if err != nil {
		return err
	}
	conn, err := a.dial(ctx, uid, tok)
	if err != nil {
		return fmt.Errorf("idle agent %d: %w", i, err)
	}
	a.n.Add(1)
	a.wg.Go(func() {
		for {
			a.srv.ServeConn(a.ctx, conn)
			a.n.Add(-1)
			if !a.redial || a.ctx.Err() != nil {
				return
			}
			if conn = a.redialLoop(uid, tok); conn == nil {
				return
			}
			a.reconnects.Add(1)
			a.n.Add(1)
		}
	})
	return nil
}

// retryAfter is a refusal that says when to come back.
type retryAfter struct {
	after time.Duration
	err   error
}

func (e *retryAfter) Error() string { return e.err.Error() }

func (a *IdleAgents) dial(ctx context.Context, uid, tok string) (*tunnel.Conn, error) {
	h := http.Header{}
	h.Set("Authorization", "Bearer "+tok)
	h.Set(tunnel.HeaderAgent, uid)
	h.Set(tunnel.HeaderRoutes, hostname.DefaultSubdomain(uid)+"="+string(tunnel.Passthrough))
	ws, resp, err := a.dialer.DialContext(ctx, "wss://"+Domain+tunnel.Path, h)
	if err != nil {
		if resp != nil {
			err = fmt.Errorf("relay answered %s: %w", resp.Status, err)
			if s, perr := strconv.Atoi(resp.Header.Get("Retry-After")); perr == nil && s > 0 {
				return nil, &retryAfter{after: time.Duration(s) * time.Second, err: err}
			}
		}
		return nil, err
	}
	return tunnel.NewConn(ws), nil
}

// redialLoop dials again as the real agent does after its tunnel dropped,
// until it succeeds or the agents are closed (nil).
func (a *IdleAgents) redialLoop(uid, tok string) *tunnel.Conn {
	delay := 250 * time.Millisecond
	for {
		wait := delay/2 + rand.N(delay/2+1)
		select {
		case <-a.ctx.Done():
			return nil
		case <-time.After(wait):
		}
		ctx, cancel := context.WithTimeout(a.ctx, 20*time.Second)
		conn, err := a.dial(ctx, uid, tok)
		cancel()
		if err == nil {
			return conn
		}
		a.noteErr(err)
		if ra, ok := err.(*retryAfter); ok && ra.after > delay {
			delay = ra.after
		}
		delay = min(delay*2, 30*time.Second)
	}
}

// Close disconnects every agent.
func (a *IdleAgents) Close() {
	a.cancel()
	a.wg.Wait()
}

// WaitTunnels polls the relay until it reports want tunnels.
func (r *Relay) WaitTunnels(ctx context.Context, want int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var got int
	var err error
	for {
		got, err = r.Tunnels(ctx)
		if err == nil && got == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("relay has %d tunnels, want %d: %w", got, want, errors.Join(err, ctx.Err()))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// SettledRSS samples pid's RSS until it has stayed within 2% for a few
// seconds (the Go runtime returns freed memory gradually) or timeout
// passes, and returns the last sample.
func SettledRSS(ctx context.Context, pid int, timeout time.Duration) (int64, error) {
	const window = 8 // samples of 250 ms
	deadline := time.Now().Add(timeout)
	var samples []int64
	for {
		u, err := proctest.ReadUsage(pid)
		if err != nil {
			return 0, err
		}
		samples = append(samples, u.RSS)
		if len(samples) >= window {
			w := samples[len(samples)-window:]
			lo, hi := w[0], w[0]
			for _, v := range w {
				lo, hi = min(lo, v), max(hi, v)
			}
			if float64(hi-lo) <= 0.02*float64(hi) || time.Now().After(deadline) {
				return u.RSS, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}
