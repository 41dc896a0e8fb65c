package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// The agent's tunnels. Slot 0 is always held; slot 1, under the agent id
// plus SecondTunnelSuffix, with --tunnels 2, or in auto when the relay
// reports more than one replica. The two stay on distinct relay replicas
// (the 101 answer names the replica): losing one replica then costs the
// cluster no reconnect at all.
//
// A draining relay sends a "move" stream down each tunnel. The agent
// answers 200 and dials a replacement for that slot through the load
// balancer (the draining relay refuses it with 503, so it lands on
// another replica), keeping its reconnect backoff and jitter; once the
// replacement is registered, the old tunnel is shut down gracefully:
// GOAWAY, its streams in flight finish (within DrainTimeout).

// liveTunnel is one established tunnel.
type liveTunnel struct {
	conn     net.Conn
	agentID  string
	replica  string // the relay replica that holds it ("" from an older relay)
	replicas int    // live relay replicas, as that relay reported them
	counted  bool   // tunnelUp has run for it
}

// tunnelSlots is the agent's tunnel state.
type tunnelSlots struct {
	up       atomic.Int32 // tunnels connected now
	replicas atomic.Int32 // live relay replicas, last reported
	stopping atomic.Bool

	mu      sync.Mutex
	current [2]*liveTunnel // each slot's newest tunnel, while it is up

	// multi is signalled when slot 0 comes up (slot 1 may start if it
	// is wanted); yield asks slot 1 to move off the
	// replica slot 0 has just landed on.
	multi, yield chan struct{}
	// bg runs tunnels' serving and graceful shutdowns; Run waits for it.
	bg sync.WaitGroup
}

func (t *tunnelSlots) init() {
	t.multi = make(chan struct{}, 1)
	t.yield = make(chan struct{}, 1)
	t.replicas.Store(1)
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// errNoSecond: in auto, the fleet is down to one replica; slot 1 rests.
var errNoSecond = errors.New("the relay reports one replica: no second tunnel")

// errSameReplica: slot 1 landed on slot 0's replica.
var errSameReplica = errors.New("same relay replica as the first tunnel")

func (c *Client) slotAgentID(slot int) string {
	if slot == 0 {
		return c.cfg.AgentID
	}
	return c.cfg.AgentID + SecondTunnelSuffix
}

func (c *Client) slotUp(slot int) bool {
	c.tunnels.mu.Lock()
	defer c.tunnels.mu.Unlock()
	return c.tunnels.current[slot] != nil
}

func (c *Client) replicaOf(slot int) string {
	c.tunnels.mu.Lock()
	defer c.tunnels.mu.Unlock()
	if lt := c.tunnels.current[slot]; lt != nil {
		return lt.replica
	}
	return ""
}

// wantSecond reports whether slot 1 should be held.
func (c *Client) wantSecond() bool {
	return c.cfg.Tunnels == "2" || c.cfg.Tunnels == TunnelsAuto && c.tunnels.replicas.Load() > 1
}

// runTunnels holds the slots until ctx is done, then waits for every
// tunnel's drain.
func (c *Client) runTunnels(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() { c.tunnels.stopping.Store(true) })
	defer stop()
	var wg sync.WaitGroup
	wg.Go(func() { c.runSlot(ctx, 0) })
	if c.cfg.Tunnels != "1" {
		wg.Go(func() {
			for ctx.Err() == nil {
				// After the first is up, so that the distinct-replica
				// rule has the first's replica to go by.
				for !c.wantSecond() || !c.slotUp(0) {
					select {
					case <-ctx.Done():
						return
					case <-c.tunnels.multi:
					}
				}
				c.runSlot(ctx, 1)
			}
		})
	}
	wg.Wait()
	c.tunnels.bg.Wait()
}

// runSlot keeps slot's tunnel up until ctx is done (slot 1 in auto: until
// the relay reports a single replica), reconnecting with backoff.
func (c *Client) runSlot(ctx context.Context, slot int) {
	delay := c.cfg.BackoffMin
	same := 0 // landings on the other slot's replica in a row
	var next *liveTunnel
	for {
		if ctx.Err() != nil {
			if next != nil { // a replacement that came as ctx ended
				next.conn.Close()
				c.tunnelDown(slot, next)
			}
			return
		}
		lt := next
		next = nil
		started := time.Now()
		var err error
		if lt == nil {
			if slot == 1 && !c.wantSecond() {
				return
			}
			lt, err = c.connectSlot(ctx, slot)
		}
		if err == nil {
			next, err = c.serveTunnel(ctx, slot, lt)
			if next != nil {
				delay = c.cfg.BackoffMin
				continue
			}
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errNoSecond) {
			c.log.Info("the relay reports a single replica: holding one tunnel")
			return
		}
		// A tunnel that stayed up a while resets the backoff: after a relay
		// restart the agent should be back in well under 5 s.
		if time.Since(started) > 30*time.Second {
			delay = c.cfg.BackoffMin
		}
		delay = sameReplicaDelay(delay, err, &same)
		wait := retryWait(delay, err)
		c.log.Warn("tunnel down; reconnecting", "slot", slot, "error", err, "retry_in", wait.Round(time.Millisecond).String())
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		delay = min(delay*2, c.cfg.BackoffMax)
	}
}

// connectSlot dials a tunnel for slot and keeps slot 1 off slot 0's
// replica.
func (c *Client) connectSlot(ctx context.Context, slot int) (*liveTunnel, error) {
	lt, err := c.dial(ctx, c.slotAgentID(slot))
	if err != nil {
		return nil, err
	}
	c.tunnels.replicas.Store(int32(lt.replicas))
	if slot == 1 {
		if c.cfg.Tunnels == TunnelsAuto && lt.replicas <= 1 {
			lt.conn.Close()
			return nil, errNoSecond
		}
		if first := c.replicaOf(0); lt.replica != "" && lt.replica == first {
			lt.conn.Close()
			return nil, fmt.Errorf("second tunnel landed on %s: %w; closed it", first, errSameReplica)
		}
	}
	return lt, nil
}

// tunnelUp and tunnelDown keep the count, readiness and metrics.
func (c *Client) tunnelUp(slot int, lt *liveTunnel) {
	lt.counted = true
	c.connects.Add(1)
	c.metrics.connects.Inc()
	n := c.tunnels.up.Add(1)
	c.metrics.tunnels.Set(float64(n))
	c.metrics.tunnelUp.Set(1)
	c.tunnels.mu.Lock()
	c.tunnels.current[slot] = lt
	other := c.tunnels.current[1]
	c.tunnels.mu.Unlock()
	if slot == 0 && other != nil && lt.replica != "" && other.replica == lt.replica {
		signal(c.tunnels.yield)
	}
	if slot == 0 {
		signal(c.tunnels.multi) // slot 1 may start now
	}
	c.log.Info("tunnel up", "relay", c.cfg.relayAddr(), "proxy", c.relay.proxyName(), "hostnames", c.hostnames(),
		"slot", slot, "agent_id", lt.agentID, "relay_replica", lt.replica, "relay_replicas", lt.replicas, "tunnels", n)
}

func (c *Client) tunnelDown(slot int, lt *liveTunnel) {
	c.tunnels.mu.Lock()
	if c.tunnels.current[slot] == lt {
		c.tunnels.current[slot] = nil
	}
	c.tunnels.mu.Unlock()
	n := c.tunnels.up.Add(-1)
	c.metrics.tunnels.Set(float64(n))
	if n == 0 {
		c.metrics.tunnelUp.Set(0)
	}
}

// serveTunnel serves lt until it ends (an error), ctx is done (drained,
// nil, nil), or it moved: then it returns the replacement, already
// registered, while lt shuts down gracefully in the background.
func (c *Client) serveTunnel(ctx context.Context, slot int, lt *liveTunnel) (*liveTunnel, error) {
	if !lt.counted {
		c.tunnelUp(slot, lt)
	}
	move := make(chan struct{}, 1)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodConnect && r.Header.Get(tunnel.HeaderStream) == tunnel.StreamMove {
			c.log.Info("the relay asks this tunnel to move (it is draining)", "slot", slot, "relay_replica", lt.replica)
			signal(move)
			w.WriteHeader(http.StatusOK)
			return
		}
		c.serveStream(w, r)
	})
	srv := tunnel.NewAgentServer(h, c.cfg.MaxStreams, c.cfg.Liveness)
	hardStop, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	c.tunnels.bg.Go(func() {
		defer close(served)
		defer c.tunnelDown(slot, lt)
		defer cancel()
		srv.ServeConn(hardStop, lt.conn)
	})
	drain := func() {
		c.log.Info("draining tunnel", "slot", slot, "relay_replica", lt.replica, "timeout", c.cfg.DrainTimeout.String())
		dctx, dcancel := context.WithTimeout(context.Background(), c.cfg.DrainTimeout)
		defer dcancel()
		_ = srv.Shutdown(dctx)
		select {
		case <-served:
		case <-dctx.Done():
			c.log.Warn("drain timeout: closing tunnel with streams still open", "slot", slot)
			cancel()
			<-served
		}
	}
	var yield <-chan struct{}
	if slot == 1 {
		yield = c.tunnels.yield
	}
	for {
		select {
		case <-served:
			return nil, errors.New("tunnel closed")
		case <-ctx.Done():
			drain()
			return nil, nil
		case <-yield:
			// Slot 0 landed on this tunnel's replica. A replacement
			// dialed now under the same agent id could land on this
			// replica too and replace this tunnel there, so this one
			// goes first (gracefully; slot 0 serves the cluster) and
			// the slot reconnects with backoff, as after a landing on
			// the same replica.
			if lt.replica == "" || c.replicaOf(0) != lt.replica {
				continue // slot 0 has moved on again
			}
			c.tunnels.bg.Go(drain)
			return nil, fmt.Errorf("the first tunnel moved onto %s, the second's: %w; closing the second", lt.replica, errSameReplica)
		case <-move:
		}
		next, err := c.replace(ctx, slot, lt, served)
		if next == nil && err == nil {
			continue // the old tunnel ended or ctx is done: the select above sees it
		}
		c.tunnels.bg.Go(drain)
		return next, err
	}
}

// replace dials a replacement for slot's tunnel old, with backoff and
// jitter, while old still serves. It gives up (nil, nil) once old ends or
// ctx is done, and returns errNoSecond when slot 1 is not wanted any more
// (old is then to be shut down).
func (c *Client) replace(ctx context.Context, slot int, old *liveTunnel, served <-chan struct{}) (*liveTunnel, error) {
	delay := c.cfg.BackoffMin
	same := 0
	for {
		// A replacement that registers is never on the draining relay,
		// which refuses tunnels (503) from before it sends move. One
		// under the old tunnel's replica name is that replica restarted
		// in place (a StatefulSet pod, a VM's hostname) and is kept:
		// closing it left the cluster without a tunnel once the old
		// process ended, and cost the fleet a second registration each.
		lt, err := c.connectSlot(ctx, slot)
		if err == nil {
			c.log.Info("replacement tunnel registered; shutting the old one down gracefully", "slot", slot,
				"from_replica", old.replica, "to_replica", lt.replica)
			// Counted before the old one goes: the agent never has
			// zero tunnels on the way.
			c.tunnelUp(slot, lt)
			return lt, nil
		}
		if errors.Is(err, errNoSecond) {
			return nil, err
		}
		delay = sameReplicaDelay(delay, err, &same)
		wait := retryWait(delay, err)
		c.log.Warn("dialing a replacement tunnel; the old one keeps serving", "slot", slot, "error", err,
			"retry_in", wait.Round(time.Millisecond).String())
		select {
		case <-ctx.Done():
			return nil, nil
		case <-served:
			return nil, nil
		case <-time.After(wait):
		}
		delay = min(delay*2, c.cfg.BackoffMax)
	}
}

// Landing on the replica the agent must avoid is no failure of the relay:
// a load balancer that spreads connections sends the next dial elsewhere,
// so the first sameReplicaQuickTries retries wait at most
// sameReplicaRetryMax instead of the growing backoff (which after a
// replica's loss kept agents on one tunnel for 40-95 s in TestScaleOut).
// Past them the backoff grows as usual: a load balancer with client
// affinity would send every dial to the same replica.
const (
	sameReplicaRetryMax   = time.Second
	sameReplicaQuickTries = 8
)

// sameReplicaDelay returns the delay before the next dial after err, and
// counts landings on the same replica in a row in *same.
func sameReplicaDelay(delay time.Duration, err error, same *int) time.Duration {
	if !errors.Is(err, errSameReplica) {
		*same = 0
		return delay
	}
	*same++
	if *same <= sameReplicaQuickTries {
		return min(delay, sameReplicaRetryMax)
	}
	return delay
}
