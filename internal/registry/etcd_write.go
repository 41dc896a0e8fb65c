package registry

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Writes of this replica's keys: queued, batched under the lease, retried
// with backoff while etcd is unreachable.

// writeLoop writes the pending keys in batches under the current lease,
// retrying with backoff while etcd is unreachable.
func (e *Etcd) writeLoop(ctx context.Context) {
	var bo backoffState
	var wait time.Duration = -1 // -1: until kicked
	for {
		if !e.sleep(ctx, wait, e.kickWrite) {
			return
		}
		wait = -1
		for {
			lease, keys, ops := e.takeBatch()
			if lease == 0 || len(ops) == 0 {
				break // no lease: grant() kicks us
			}
			err := e.writeBatch(ctx, lease, keys, ops)
			if err == nil {
				bo.reset()
				continue
			}
			if ctx.Err() != nil {
				return
			}
			if errors.Is(err, rpctypes.ErrLeaseNotFound) {
				e.log.Warn("lease gone while writing, granting a new one", "lease", fmt.Sprintf("%x", int64(lease)))
				e.leaseGone(lease)
				break
			}
			wait = bo.next()
			e.log.Warn("registry write failed, retrying", "err", err, "keys", len(keys), "in", wait)
			break
		}
	}
}

// takeBatch copies up to maxBatch pending ops.
func (e *Etcd) takeBatch() (clientv3.LeaseID, []string, []pendingOp) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.lease == 0 || len(e.pending) == 0 {
		return e.lease, nil, nil
	}
	keys := make([]string, 0, min(len(e.pending), maxBatch))
	// The replica key first: others skip tunnels of a replica they do not
	// see, and Start waits for it.
	if _, ok := e.pending[e.selfKey]; ok {
		keys = append(keys, e.selfKey)
	}
	for key := range e.pending {
		if len(keys) == maxBatch {
			break
		}
		if key != e.selfKey {
			keys = append(keys, key)
		}
	}
	ops := make([]pendingOp, len(keys))
	for i, key := range keys {
		ops[i] = *e.pending[key]
	}
	return e.lease, keys, ops
}

func (e *Etcd) writeBatch(ctx context.Context, lease clientv3.LeaseID, keys []string, ops []pendingOp) error {
	txn := make([]clientv3.Op, len(keys))
	puts, dels, self := 0, 0, false
	for i, key := range keys {
		if ops[i].put {
			txn[i] = clientv3.OpPut(key, ops[i].val, clientv3.WithLease(lease))
			puts++
		} else {
			txn[i] = clientv3.OpDelete(key)
			dels++
		}
		self = self || key == e.selfKey
	}
	tctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	start := time.Now()
	if _, err := e.cli.Txn(tctx).Then(txn...).Commit(); err != nil {
		return fmt.Errorf("writing %d keys: %w", len(keys), err)
	}
	if puts > 0 {
		e.m.put.Observe(time.Since(start).Seconds())
	}
	e.m.write("put", puts)
	e.m.write("delete", dels)
	e.mu.Lock()
	for i, key := range keys {
		if p, ok := e.pending[key]; ok && p.gen == ops[i].gen {
			delete(e.pending, key)
		}
	}
	joined := self && !e.joinedSet
	e.joinedSet = e.joinedSet || self
	e.mu.Unlock()
	if joined {
		close(e.joined)
	}
	return nil
}

// sleep waits d (forever when d < 0, not at all when d == 0), or until
// kick fires; false when ctx ended.
func (e *Etcd) sleep(ctx context.Context, d time.Duration, kick <-chan struct{}) bool {
	if d == 0 {
		return ctx.Err() == nil
	}
	var timer <-chan time.Time
	if d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		timer = t.C
	}
	select {
	case <-ctx.Done():
		return false
	case <-timer:
	case <-kick:
	}
	return true
}

// backoffState is exponential backoff with jitter, retryMin to retryMax.
type backoffState struct{ d time.Duration }

func (b *backoffState) next() time.Duration {
	if b.d == 0 {
		b.d = retryMin
	} else {
		b.d = min(2*b.d, retryMax)
	}
	return b.d/2 + rand.N(b.d/2+1)
}

func (b *backoffState) reset() { b.d = 0 }
