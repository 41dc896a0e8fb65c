package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// The replica's lease: granted, kept alive on one open stream, granted
// again when etcd says it is gone.

// leaseLoop grants the lease, keeps it alive every TTL/3 (measuring the
// round trip), and grants a new one when etcd says it is gone.
func (e *Etcd) leaseLoop(ctx context.Context) {
	interval := e.cfg.LeaseTTL / 3
	retry := min(interval, time.Second)
	var bo backoffState
	var wait time.Duration
	unreachableSince := time.Time{}
	ka := &keepAliver{cli: e.cli}
	defer ka.drop()
	for {
		if !e.sleep(ctx, wait, e.kickLease) {
			return
		}
		e.mu.Lock()
		id := e.lease
		e.mu.Unlock()
		if id == 0 {
			if err := e.grant(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				wait = bo.next()
				e.log.Warn("granting lease failed, retrying", "err", err, "in", wait)
				continue
			}
			bo.reset()
			unreachableSince = time.Time{}
			wait = 0 // open the keep-alive stream now, while etcd answers
			continue
		}
		start := time.Now()
		err := ka.once(ctx, id, interval)
		switch {
		case err == nil:
			e.m.keepalive.Observe(time.Since(start).Seconds())
			e.m.write("keepalive", 1)
			if !unreachableSince.IsZero() {
				e.log.Info("etcd reachable again, lease kept", "after", time.Since(unreachableSince).Round(time.Millisecond))
				unreachableSince = time.Time{}
			}
			wait = interval
		case errors.Is(err, rpctypes.ErrLeaseNotFound):
			e.log.Warn("lease gone (expired while etcd was out of reach), granting a new one and rewriting every key", "lease", fmt.Sprintf("%x", int64(id)))
			e.leaseGone(id)
			unreachableSince = time.Time{}
			wait = 0
		default:
			if ctx.Err() != nil {
				return
			}
			if unreachableSince.IsZero() {
				unreachableSince = start
				e.log.Warn("lease keep-alive failed: etcd unreachable, serving from the last view", "err", err)
			}
			wait = retry
		}
	}
}

// keepAliver sends keep-alives one at a time on one LeaseKeepAlive stream
// that it keeps open between them. Not KeepAliveOnce, which opens a stream
// per keep-alive: an etcd member that is stopping (SIGTERM: gRPC's
// graceful stop, ~7s) refuses new streams but serves open ones, and its
// leases go on expiring meanwhile. Not the client's KeepAlive either: it
// hides the round trip, which is a metric.
type keepAliver struct {
	cli    *clientv3.Client
	stream pb.Lease_LeaseKeepAliveClient
	cancel context.CancelFunc
}

// once renews lease id and waits up to timeout for the answer.
// rpctypes.ErrLeaseNotFound means etcd says the lease is gone; any other
// error, that etcd did not answer (the stream is dropped, the next call
// opens another).
func (k *keepAliver) once(ctx context.Context, id clientv3.LeaseID, timeout time.Duration) error {
	if k.stream == nil {
		sctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		s, err := pb.NewLeaseClient(k.cli.ActiveConnection()).LeaseKeepAlive(sctx)
		if err != nil {
			cancel()
			return fmt.Errorf("opening lease keep-alive stream: %w", err)
		}
		k.stream, k.cancel = s, cancel
	}
	// A partition leaves Recv waiting: cancel the stream at the timeout.
	timer := time.AfterFunc(timeout, k.cancel)
	err := k.stream.Send(&pb.LeaseKeepAliveRequest{ID: int64(id)})
	var resp *pb.LeaseKeepAliveResponse
	if err == nil {
		resp, err = k.stream.Recv()
	}
	if !timer.Stop() || err != nil {
		k.drop() // canceled, or about to be
	}
	if err != nil {
		return fmt.Errorf("lease keep-alive: %w", err)
	}
	if resp.TTL <= 0 {
		return rpctypes.ErrLeaseNotFound
	}
	return nil
}

func (k *keepAliver) drop() {
	if k.cancel != nil {
		k.cancel()
	}
	k.stream, k.cancel = nil, nil
}

// grant takes a new lease and queues every key of this replica under it.
func (e *Etcd) grant(ctx context.Context) error {
	tctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	resp, err := e.cli.Grant(tctx, int64(math.Ceil(e.cfg.LeaseTTL.Seconds())))
	if err != nil {
		return fmt.Errorf("granting lease: %w", err)
	}
	e.m.write("grant", 1)
	e.mu.Lock()
	e.lease, e.held = resp.ID, true
	// Rewrite everything: after a lost lease etcd has deleted it all.
	e.queueLocked(e.selfKey, true, e.selfVal)
	for _, ts := range e.local {
		for _, t := range ts {
			val, _ := json.Marshal(t)
			e.queueLocked(e.tunnelKey(t), true, string(val))
		}
	}
	n := e.nLocal
	e.m.held.Set(1)
	hook := e.readyHook
	e.mu.Unlock()
	if hook != nil {
		hook(true)
	}
	e.log.Info("lease granted", "lease", fmt.Sprintf("%x", int64(resp.ID)), "ttl", resp.TTL, "tunnels", n)
	e.kick(e.kickWrite)
	return nil
}

// leaseGone forgets lease id (if still current): Ready turns false and
// the lease loop grants another.
func (e *Etcd) leaseGone(id clientv3.LeaseID) {
	e.mu.Lock()
	gone := e.lease == id
	if gone {
		e.lease, e.held = 0, false
		e.m.held.Set(0)
	}
	hook := e.readyHook
	e.mu.Unlock()
	if gone && hook != nil {
		hook(false)
	}
	e.kick(e.kickLease)
}
