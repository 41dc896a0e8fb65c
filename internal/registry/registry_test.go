package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// fleet is what a test case runs against: n registries of one
// implementation. With etcd, every registry reaches etcd through its own
// cuttable TCP proxy (a partition of that replica alone), and raw is a
// direct client for looking at and tampering with etcd.
type fleet struct {
	t      *testing.T
	regs   []Registry
	etcd   *testcluster.Etcd // nil: Memory
	raw    *clientv3.Client
	prefix string
	links  []*link
}

func (f *fleet) isEtcd() bool { return f.etcd != nil }

func (f *fleet) et(i int) *Etcd { return f.regs[i].(*Etcd) }

// recordReady records every change of Ready of the registries regs, in
// order, and returns a function that reads the changes so far.
func (f *fleet) recordReady(regs ...int) func() []bool {
	var mu sync.Mutex
	var changes []bool
	for _, i := range regs {
		f.et(i).mu.Lock()
		f.et(i).readyHook = func(r bool) { mu.Lock(); changes = append(changes, r); mu.Unlock() }
		f.et(i).mu.Unlock()
	}
	return func() []bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(changes)
	}
}

// eventually polls cond every 20ms until it holds or the deadline passes.
func (f *fleet) eventually(within time.Duration, what string, cond func() bool) {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			f.t.Fatalf("not within %v: %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// keys returns the keys under the fleet's prefix, straight from etcd.
func (f *fleet) keys() map[string]clientv3.LeaseID {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := f.raw.Get(ctx, f.prefix, clientv3.WithPrefix())
	require.NoError(f.t, err)
	m := map[string]clientv3.LeaseID{}
	for _, kv := range resp.Kvs {
		m[strings.TrimPrefix(string(kv.Key), f.prefix)] = clientv3.LeaseID(kv.Lease)
	}
	return m
}

func (f *fleet) revision() int64 {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := f.raw.Get(ctx, "/nothing-here")
	require.NoError(f.t, err)
	return resp.Header.Revision
}

type fleetOpts struct {
	n        int
	ttl      time.Duration
	noStart  bool
	announce []Tunnel // announced by replica 0 before Start
}

type testCase struct {
	name      string
	opts      fleetOpts
	fleetOnly bool // needs other replicas, or etcd itself
	run       func(t *testing.T, f *fleet)
}

func tun(label, cluster, agent string) Tunnel {
	return Tunnel{Label: label, ClusterUID: cluster, AgentID: agent, Mode: "passthrough"}
}

func holderIDs(hs []Holder) []string {
	var ids []string
	for _, h := range hs {
		ids = append(ids, h.Replica.ID)
	}
	return ids
}

func replicaIDs(rs []Replica) []string {
	var ids []string
	for _, r := range rs {
		ids = append(ids, r.ID)
	}
	return ids
}

func owner(r Registry, label string) string {
	c, ok := r.LabelOwner(label)
	if !ok {
		return "<none>"
	}
	return c
}

var cases = []testCase{{
	name: "announce and withdraw are seen by the others",
	opts: fleetOpts{n: 2},
	run: func(t *testing.T, f *fleet) {
		a := tun("a.example", "c1", "agent1")
		f.regs[0].Announce(a)
		require.Equal(t, "c1", owner(f.regs[0], "a.example"), "own announce is visible at once")
		require.Empty(t, f.regs[0].Lookup("a.example"), "Lookup never returns self")
		if len(f.regs) > 1 {
			f.eventually(5*time.Second, "replica 1 sees r0 holding a.example", func() bool {
				return fmt.Sprint(holderIDs(f.regs[1].Lookup("a.example"))) == "[r0]"
			})
			h := f.regs[1].Lookup("a.example")[0]
			require.Equal(t, Holder{Replica: Replica{ID: "r0", PeerAddr: "r0.peer:8444"}, ClusterUID: "c1", Mode: "passthrough"}, h)
			require.Equal(t, map[string]clientv3.LeaseID{
				"replicas/r0": f.keys()["replicas/r0"], "replicas/r1": f.keys()["replicas/r1"],
				"tunnels/a.example/r0/c1/agent1": f.keys()["replicas/r0"],
			}, f.keys(), "tunnel key under r0's lease")
		}
		// The same tunnel in another mode replaces it.
		b := a
		b.Mode = "terminate"
		f.regs[0].Announce(b)
		if len(f.regs) > 1 {
			f.eventually(5*time.Second, "replica 1 sees the new mode", func() bool {
				hs := f.regs[1].Lookup("a.example")
				return len(hs) == 1 && hs[0].Mode == "terminate"
			})
		}
		f.regs[0].Withdraw(a) // the key is label, cluster, agent: any mode withdraws it
		require.Equal(t, "<none>", owner(f.regs[0], "a.example"), "own withdraw is visible at once")
		if len(f.regs) > 1 {
			f.eventually(5*time.Second, "replica 1 sees the withdraw", func() bool {
				return len(f.regs[1].Lookup("a.example")) == 0 && owner(f.regs[1], "a.example") == "<none>"
			})
			require.NotContains(t, f.keys(), "tunnels/a.example/r0/c1/agent1")
		}
	},
}, {
	name: "announce before Start is written on Start",
	opts: fleetOpts{n: 2, announce: []Tunnel{tun("early.example", "c9", "agent9")}},
	run: func(t *testing.T, f *fleet) {
		require.Equal(t, "c9", owner(f.regs[0], "early.example"))
		if len(f.regs) > 1 {
			f.eventually(5*time.Second, "replica 1 sees the early announce", func() bool {
				return owner(f.regs[1], "early.example") == "c9"
			})
		}
	},
}, {
	name:      "lookup spreads over holders, skips self and replicas whose key is gone",
	opts:      fleetOpts{n: 3},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		f.regs[0].Announce(tun("b.example", "c2", "agent1"))
		f.regs[1].Announce(tun("b.example", "c2", "agent1~1"))
		f.eventually(5*time.Second, "replica 2 sees both holders", func() bool {
			return len(f.regs[2].Lookup("b.example")) == 2
		})
		firsts := map[string]int{}
		for range 10 {
			hs := f.regs[2].Lookup("b.example")
			require.Len(t, hs, 2)
			require.NotEqual(t, hs[0].Replica.ID, hs[1].Replica.ID)
			firsts[hs[0].Replica.ID]++
		}
		require.Equal(t, map[string]int{"r0": 5, "r1": 5}, firsts, "round-robin over calls")
		f.eventually(5*time.Second, "replica 0 sees r1 only", func() bool {
			return fmt.Sprint(holderIDs(f.regs[0].Lookup("b.example"))) == "[r1]"
		})
		// r1's replica key vanishes (its tunnel key stays): r1 is no
		// longer a place to forward to.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := f.raw.Delete(ctx, f.prefix+"replicas/r1")
		require.NoError(t, err)
		f.eventually(5*time.Second, "replica 2 skips r1", func() bool {
			return fmt.Sprint(holderIDs(f.regs[2].Lookup("b.example"))) == "[r0]" &&
				fmt.Sprint(replicaIDs(f.regs[2].Replicas())) == "[r0 r2]"
		})
		require.Contains(t, f.keys(), "tunnels/b.example/r1/c2/agent1~1")
		require.Empty(t, f.regs[0].Lookup("b.example"))
	},
}, {
	name: "label owner covers self and others",
	opts: fleetOpts{n: 2},
	run: func(t *testing.T, f *fleet) {
		f.regs[0].Announce(tun("own.example", "c3", "agent1"))
		require.Equal(t, "c3", owner(f.regs[0], "own.example"))
		require.Equal(t, "<none>", owner(f.regs[0], "nobody.example"))
		if len(f.regs) > 1 {
			f.regs[1].Announce(tun("other.example", "c4", "agent1"))
			f.eventually(5*time.Second, "both see both labels", func() bool {
				return owner(f.regs[0], "other.example") == "c4" && owner(f.regs[1], "own.example") == "c3"
			})
		}
	},
}, {
	name: "replicas lists the fleet, sorted, self included",
	opts: fleetOpts{n: 3},
	run: func(t *testing.T, f *fleet) {
		want := "[r0]"
		if len(f.regs) == 3 {
			want = "[r0 r1 r2]"
		}
		for _, r := range f.regs {
			f.eventually(5*time.Second, "replicas "+want, func() bool { return fmt.Sprint(replicaIDs(r.Replicas())) == want })
		}
		if f.isEtcd() {
			require.Equal(t, 3.0, testutil.ToFloat64(f.et(0).m.replicas))
		}
	},
}, {
	name: "revocations are shared and expire",
	opts: fleetOpts{n: 2},
	run: func(t *testing.T, f *fleet) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, f.regs[0].Revoke(ctx, "tok-forever", time.Time{}))
		require.NoError(t, f.regs[0].Revoke(ctx, "tok-short", time.Now().Add(2*time.Second)))
		require.True(t, f.regs[0].Revoked("tok-forever"), "own revocation at once")
		require.True(t, f.regs[0].Revoked("tok-short"))
		require.False(t, f.regs[0].Revoked("tok-other"))
		last := f.regs[len(f.regs)-1]
		if f.isEtcd() {
			// The token CLI writes without a relay.
			require.NoError(t, WriteRevocation(ctx, EtcdConfig{Endpoints: []string{f.etcd.Endpoint()}, Prefix: strings.TrimSuffix(f.prefix, "/")}, "tok-cli", time.Time{}))
			f.eventually(5*time.Second, "replica 1 sees all three revocations", func() bool {
				return last.Revoked("tok-forever") && last.Revoked("tok-short") && last.Revoked("tok-cli")
			})
			keys := f.keys()
			require.Equal(t, clientv3.LeaseID(0), keys["revocations/tok-forever"], "no lease: outlives the replica")
			require.NotEqual(t, clientv3.LeaseID(0), keys["revocations/tok-short"], "own lease of the revocation's TTL")
			require.NotEqual(t, keys["replicas/r0"], keys["revocations/tok-short"])
		}
		f.eventually(10*time.Second, "tok-short expires everywhere", func() bool {
			for _, r := range f.regs {
				if r.Revoked("tok-short") {
					return false
				}
			}
			return true
		})
		require.True(t, last.Revoked("tok-forever"))
		if f.isEtcd() {
			f.eventually(10*time.Second, "etcd forgets tok-short (its lease ends)", func() bool {
				_, ok := f.keys()["revocations/tok-short"]
				return !ok
			})
			// Closing the revoking replica keeps its revocation.
			require.NoError(t, f.regs[0].Close(ctx))
			require.Contains(t, f.keys(), "revocations/tok-forever")
			require.True(t, f.regs[1].Revoked("tok-forever"))
		}
	},
}, {
	name: "close removes the replica's keys at once",
	opts: fleetOpts{n: 2, ttl: 30 * time.Second},
	run: func(t *testing.T, f *fleet) {
		f.regs[0].Announce(tun("gone.example", "c5", "agent1"))
		if len(f.regs) > 1 {
			f.eventually(5*time.Second, "replica 1 sees r0's tunnel", func() bool { return len(f.regs[1].Lookup("gone.example")) == 1 })
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		start := time.Now()
		require.NoError(t, f.regs[0].Close(ctx))
		require.NoError(t, f.regs[0].Close(ctx), "Close twice is fine")
		if len(f.regs) > 1 {
			for k := range f.keys() {
				require.NotContains(t, k, "r0", "r0's keys deleted by the time Close returns")
			}
			f.eventually(2*time.Second, "replica 1 stops routing to r0 (lease TTL is 30s)", func() bool {
				return len(f.regs[1].Lookup("gone.example")) == 0 && fmt.Sprint(replicaIDs(f.regs[1].Replicas())) == "[r1]"
			})
			t.Logf("r0 gone from r1's view %v after Close began (lease TTL 30s)", time.Since(start).Round(time.Millisecond))
		}
	},
}, {
	name: "the registry outlives Start's ctx, until Close",
	opts: fleetOpts{n: 2, noStart: true},
	run: func(t *testing.T, f *fleet) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		for _, r := range f.regs {
			require.NoError(t, r.Start(ctx))
		}
		cancel() // the relay's serving context ends: its drain begins
		f.regs[0].Announce(tun("drain.example", "c1", "agent1"))
		require.Equal(t, "c1", owner(f.regs[0], "drain.example"))
		if len(f.regs) > 1 {
			f.eventually(5*time.Second, "replica 1 still sees r0's writes", func() bool {
				return len(f.regs[1].Lookup("drain.example")) == 1
			})
		}
		for _, r := range f.regs {
			require.True(t, r.Ready())
		}
	},
}, {
	name: "ready",
	opts: fleetOpts{n: 1, noStart: true},
	run: func(t *testing.T, f *fleet) {
		r := f.regs[0]
		if f.isEtcd() {
			require.False(t, r.Ready(), "no lease before Start")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, r.Start(ctx))
		require.True(t, r.Ready())
	},
}, {
	name:      "start fails with ctx while etcd is unreachable, and announce does not block",
	opts:      fleetOpts{n: 1, noStart: true},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		f.links[0].cut()
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		start := time.Now()
		f.regs[0].Announce(tun("x.example", "c1", "a"))
		require.Less(t, time.Since(start), 50*time.Millisecond)
		err := f.regs[0].Start(ctx)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.False(t, f.regs[0].Ready())
		require.Equal(t, "c1", owner(f.regs[0], "x.example"))
	},
}, {
	name:      "lease revoked behind the replica's back: new lease, every key rewritten",
	opts:      fleetOpts{n: 2},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		changes := f.recordReady(0)
		f.regs[0].Announce(tun("l1.example", "c6", "agent1"))
		f.regs[0].Announce(tun("l2.example", "c7", "agent1"))
		f.eventually(5*time.Second, "replica 1 sees both", func() bool {
			return len(f.regs[1].Lookup("l1.example")) == 1 && len(f.regs[1].Lookup("l2.example")) == 1
		})
		old := f.keys()["replicas/r0"]
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := f.raw.Revoke(ctx, old)
		require.NoError(t, err)
		// The next keep-alive (TTL/3 = 1s) finds the lease gone.
		f.eventually(10*time.Second, "r0 rewrote its keys under a new lease", func() bool {
			k := f.keys()
			l := k["replicas/r0"]
			return l != 0 && l != old && k["tunnels/l1.example/r0/c6/agent1"] == l && k["tunnels/l2.example/r0/c7/agent1"] == l
		})
		f.eventually(5*time.Second, "replica 1 routes to r0 again", func() bool {
			return len(f.regs[1].Lookup("l1.example")) == 1 && len(f.regs[1].Lookup("l2.example")) == 1
		})
		require.True(t, f.regs[0].Ready())
		require.Equal(t, []bool{false, true}, changes(), "unready from the lease's loss to the new grant")
		require.Equal(t, 1.0, testutil.ToFloat64(f.et(0).m.held))
	},
}, {
	name:      "partitioned past the TTL: ready while unreachable, then a new lease and a rewrite",
	opts:      fleetOpts{n: 2, ttl: 2 * time.Second},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		changes := f.recordReady(0)
		f.regs[0].Announce(tun("p.example", "c8", "agent1"))
		f.eventually(5*time.Second, "replica 1 sees p.example, r0 sees r1", func() bool {
			return len(f.regs[1].Lookup("p.example")) == 1 && len(f.regs[0].Replicas()) == 2
		})
		f.links[0].cut()
		f.eventually(10*time.Second, "r0's lease expires: replica 1 drops r0", func() bool {
			return len(f.regs[1].Lookup("p.example")) == 0 && len(f.regs[1].Replicas()) == 1
		})
		require.True(t, f.regs[0].Ready(), "merely unreachable: still ready")
		require.Equal(t, "[r0 r1]", fmt.Sprint(replicaIDs(f.regs[0].Replicas())), "r0 keeps its last view")
		f.regs[0].Announce(tun("q.example", "c8", "agent1"))
		f.links[0].restore()
		f.eventually(15*time.Second, "replica 1 sees r0 with both tunnels", func() bool {
			return len(f.regs[1].Lookup("p.example")) == 1 && len(f.regs[1].Lookup("q.example")) == 1
		})
		require.Equal(t, []bool{false, true}, changes())
	},
}, {
	name:      "silent partition past the TTL (no RST): nothing hangs, ready, then a new lease",
	opts:      fleetOpts{n: 2, ttl: 2 * time.Second},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		f.regs[0].Announce(tun("s.example", "c8", "agent1"))
		f.eventually(5*time.Second, "replica 1 sees s.example, r0 sees r1", func() bool {
			return len(f.regs[1].Lookup("s.example")) == 1 && len(f.regs[0].Replicas()) == 2
		})
		f.links[0].freeze()
		f.eventually(10*time.Second, "r0's lease expires: replica 1 drops r0", func() bool {
			return len(f.regs[1].Replicas()) == 1
		})
		start := time.Now()
		f.regs[0].Announce(tun("t.example", "c8", "agent1"))
		require.Equal(t, "c8", owner(f.regs[0], "t.example"))
		require.Len(t, f.regs[0].Replicas(), 2, "r0 keeps its last view")
		require.True(t, f.regs[0].Ready(), "merely unreachable: still ready")
		require.Less(t, time.Since(start), 50*time.Millisecond)
		f.links[0].restore()
		f.eventually(20*time.Second, "replica 1 sees r0 with both tunnels", func() bool {
			return len(f.regs[1].Lookup("s.example")) == 1 && len(f.regs[1].Lookup("t.example")) == 1
		})
		require.True(t, f.regs[0].Ready())
	},
}, {
	name:      "compaction while partitioned: the watch restarts with a fresh list",
	opts:      fleetOpts{n: 2},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		f.regs[0].Announce(tun("old.example", "c1", "agent1"))
		f.eventually(5*time.Second, "replica 1 sees old.example", func() bool { return len(f.regs[1].Lookup("old.example")) == 1 })
		f.links[1].cut()
		// Two revisions, so that the compaction below removes one that
		// replica 1 has not seen.
		f.regs[0].Withdraw(tun("old.example", "c1", "agent1"))
		f.eventually(5*time.Second, "r0's withdraw reaches etcd", func() bool {
			_, o := f.keys()["tunnels/old.example/r0/c1/agent1"]
			return !o
		})
		f.regs[0].Announce(tun("new.example", "c1", "agent1"))
		f.eventually(5*time.Second, "r0's announce reaches etcd", func() bool {
			_, n := f.keys()["tunnels/new.example/r0/c1/agent1"]
			return n
		})
		require.Equal(t, 1, len(f.regs[1].Lookup("old.example")), "replica 1 keeps its last view while cut off")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := f.raw.Compact(ctx, f.revision())
		require.NoError(t, err)
		before := testutil.ToFloat64(f.et(1).m.watchRestarts)
		f.links[1].restore()
		f.eventually(15*time.Second, "replica 1 catches up", func() bool {
			return len(f.regs[1].Lookup("old.example")) == 0 && len(f.regs[1].Lookup("new.example")) == 1
		})
		require.Greater(t, testutil.ToFloat64(f.et(1).m.watchRestarts), before, "the watch was restarted")
	},
}, {
	name: "etcd down: view kept, ready, announce queued and written after etcd is back",
	// Shorter than etcd's graceful stop (SIGTERM: ~7s serving the open
	// streams only, while leases go on expiring): keep-alives on the open
	// stream keep the lease through it.
	opts:      fleetOpts{n: 2, ttl: 4 * time.Second},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		changes := f.recordReady(0, 1)
		f.regs[0].Announce(tun("up.example", "c1", "agent1"))
		f.eventually(5*time.Second, "replica 1 sees up.example", func() bool { return len(f.regs[1].Lookup("up.example")) == 1 })
		leases := f.keys()
		stopAt := time.Now()
		require.NoError(t, f.etcd.Stop())
		t.Logf("etcd stopped (SIGTERM) in %v", time.Since(stopAt).Round(time.Millisecond))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		defer func() { _ = f.etcd.Start(ctx) }() // for the next cases, should this one fail
		start := time.Now()
		f.regs[0].Announce(tun("down.example", "c2", "agent1"))
		f.regs[1].Withdraw(tun("never.example", "c2", "agent1"))
		f.regs[0].Withdraw(tun("up.example", "c1", "agent1"))
		f.regs[0].Announce(tun("up.example", "c1", "agent2"))
		require.Less(t, time.Since(start), 50*time.Millisecond, "announce and withdraw do not wait on etcd")
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			for _, r := range f.regs {
				require.True(t, r.Ready(), "etcd unreachable is no reason to be unready")
			}
			require.Equal(t, "[r0]", fmt.Sprint(holderIDs(f.regs[1].Lookup("up.example"))))
			require.Equal(t, "c2", owner(f.regs[0], "down.example"))
			time.Sleep(100 * time.Millisecond)
		}
		require.NoError(t, f.etcd.Start(ctx))
		f.eventually(15*time.Second, "replica 1 sees the writes queued during the outage", func() bool {
			return len(f.regs[1].Lookup("down.example")) == 1 && len(f.regs[1].Lookup("up.example")) == 1
		})
		f.eventually(5*time.Second, "keys in etcd", func() bool {
			k := f.keys()
			_, a := k["tunnels/up.example/r0/c1/agent2"]
			_, b := k["tunnels/up.example/r0/c1/agent1"]
			_, c := k["tunnels/down.example/r0/c2/agent1"]
			return a && !b && c
		})
		for _, r := range f.regs {
			require.True(t, r.Ready())
		}
		k := f.keys()
		require.Equal(t, leases["replicas/r0"], k["replicas/r0"], "r0's lease outlived the outage")
		require.Equal(t, leases["replicas/r1"], k["replicas/r1"], "r1's lease outlived the outage")
		require.Empty(t, changes(), "Ready never changed")
	},
}, {
	name:      "a storm of 3,300 announces is batched",
	opts:      fleetOpts{n: 2},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		const n = 3300
		start := time.Now()
		for i := range n {
			f.regs[0].Announce(tun(fmt.Sprintf("storm%d.example", i), fmt.Sprintf("c%d", i), "agent1"))
		}
		announced := time.Since(start)
		f.eventually(60*time.Second, "replica 1 sees all 3,300", func() bool {
			return len(f.regs[1].Lookup(fmt.Sprintf("storm%d.example", n-1))) == 1 &&
				len(f.regs[1].Lookup("storm0.example")) == 1 && len(f.keys()) == n+2
		})
		seen := time.Since(start)
		var m dto.Metric
		require.NoError(t, f.et(0).m.put.Write(&m))
		txns := m.GetHistogram().GetSampleCount()
		require.LessOrEqual(t, txns, uint64(n/maxBatch+5), "batched")
		t.Logf("3,300 announces returned in %v; all in replica 1's view after %v; %d transactions, mean %v",
			announced.Round(time.Millisecond), seen.Round(time.Millisecond), txns,
			(time.Duration(m.GetHistogram().GetSampleSum()*float64(time.Second)) / time.Duration(txns)).Round(time.Microsecond))
	},
}, {
	name:      "at rest only keep-alives go to etcd",
	opts:      fleetOpts{n: 3, ttl: 3 * time.Second},
	fleetOnly: true,
	run: func(t *testing.T, f *fleet) {
		for i, r := range f.regs {
			for j := range 20 {
				r.Announce(tun(fmt.Sprintf("rest%d.example", j), "c1", fmt.Sprintf("agent%d", i)))
			}
		}
		f.eventually(10*time.Second, "everyone sees 60 tunnels", func() bool {
			for _, r := range f.regs {
				if len(r.Lookup("rest19.example")) != 2 {
					return false
				}
			}
			return len(f.keys()) == 63
		})
		writes := func(op string) float64 {
			var n float64
			for i := range f.regs {
				n += testutil.ToFloat64(f.et(i).m.writes.WithLabelValues(op))
			}
			return n
		}
		// Announcing what is already announced writes nothing.
		f.regs[0].Announce(tun("rest0.example", "c1", "agent0"))
		ops := []string{"put", "delete", "grant", "revoke"}
		before := map[string]float64{}
		for _, op := range ops {
			before[op] = writes(op)
		}
		rev, kas := f.revision(), writes("keepalive")
		const rest = 4 * time.Second // over one lease TTL: every replica keeps alive at least once
		time.Sleep(rest)
		require.Equal(t, rev, f.revision(), "etcd's revision did not move")
		for _, op := range ops {
			require.Equal(t, before[op], writes(op), op)
		}
		ka := writes("keepalive") - kas
		require.GreaterOrEqual(t, ka, 3.0)
		t.Logf("at rest over %v, 3 replicas: %d keep-alives (%.2f/s), 0 puts, revision unchanged at %d",
			rest, int(ka), ka/rest.Seconds(), rev)
		// Metric names are the contract's.
		for i := range f.regs {
			h := f.et(i).m.keepalive
			require.Positive(t, testutil.CollectAndCount(h, "spectro_proxy_registry_lease_keepalive_seconds"))
		}
	},
}}

func TestMemory(t *testing.T) {
	for _, tc := range cases {
		if tc.fleetOnly {
			continue
		}
		t.Run(tc.name, func(t *testing.T) {
			m := NewMemory(Replica{ID: "r0", PeerAddr: "r0.peer:8444"})
			for _, a := range tc.opts.announce {
				m.Announce(a)
			}
			f := &fleet{t: t, regs: []Registry{m}}
			if !tc.opts.noStart {
				require.NoError(t, m.Start(t.Context()))
			}
			tc.run(t, f)
			require.NoError(t, m.Close(t.Context()))
		})
	}
}

func TestEtcd(t *testing.T) {
	log := testLogger(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := testcluster.StartEtcd(ctx, t.TempDir(), log)
	if errors.Is(err, testcluster.ErrBinariesMissing) && os.Getenv("CI") == "" {
		t.Skip(err)
	}
	require.NoError(t, err)
	defer e.Close()
	// The registry's client options: back within seconds after etcd's
	// restart.
	raw, err := newClient(EtcdConfig{Endpoints: []string{e.Endpoint()}})
	require.NoError(t, err)
	defer raw.Close()

	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := &fleet{t: t, etcd: e, raw: raw, prefix: fmt.Sprintf("/test%d/", i)}
			for r := range tc.opts.n {
				l := newLink(t, strings.TrimPrefix(e.Endpoint(), "http://"))
				f.links = append(f.links, l)
				reg, err := NewEtcd(EtcdConfig{
					Endpoints: []string{"http://" + l.addr()},
					Prefix:    f.prefix,
					LeaseTTL:  tc.opts.ttl,
					Self:      Replica{ID: fmt.Sprintf("r%d", r), PeerAddr: fmt.Sprintf("r%d.peer:8444", r)},
					Logger:    log.With("r", r),
					Metrics:   prometheus.NewRegistry(),
				})
				require.NoError(t, err)
				if r == 0 {
					for _, a := range tc.opts.announce {
						reg.Announce(a)
					}
				}
				f.regs = append(f.regs, reg)
			}
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				for _, l := range f.links {
					l.restore() // a failed case may have left one cut
				}
				for _, r := range f.regs {
					require.NoError(t, r.Close(ctx))
				}
				for _, l := range f.links {
					l.close()
				}
			}()
			if !tc.opts.noStart {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				for _, r := range f.regs {
					require.NoError(t, r.Start(ctx))
				}
			}
			tc.run(t, f)
		})
	}
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.DiscardHandler)
}

// link is a TCP proxy between one registry and etcd that the test can cut
// (every connection closed, new ones refused: the peer is gone) or freeze
// (bytes held back, nothing closed: a silent partition, as a dropped route
// is; TCP delivers the held bytes once it heals) and restore.
type link struct {
	t      *testing.T
	ln     net.Listener
	target string

	mu     sync.Mutex
	down   bool
	thawed chan struct{} // closed unless frozen
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

func newLink(t *testing.T, target string) *link {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	thawed := make(chan struct{})
	close(thawed)
	l := &link{t: t, ln: ln, target: target, conns: map[net.Conn]struct{}{}, thawed: thawed}
	l.wg.Add(1)
	go l.accept()
	return l
}

func (l *link) addr() string { return l.ln.Addr().String() }

func (l *link) accept() {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		l.mu.Lock()
		if l.down {
			l.mu.Unlock()
			c.Close()
			continue
		}
		l.conns[c] = struct{}{}
		l.wg.Add(1)
		l.mu.Unlock()
		go l.serve(c)
	}
}

func (l *link) serve(c net.Conn) {
	defer l.wg.Done()
	l.waitThawed() // a new connection hangs while frozen, as a SYN to nowhere
	up, err := net.DialTimeout("tcp", l.target, 2*time.Second)
	l.mu.Lock()
	if err != nil || l.down {
		l.mu.Unlock()
		c.Close()
		if up != nil {
			up.Close()
		}
		return
	}
	l.conns[up] = struct{}{}
	l.wg.Add(2)
	l.mu.Unlock()
	go l.pipe(c, up)
	go l.pipe(up, c)
}

func (l *link) pipe(dst, src net.Conn) {
	defer l.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		l.waitThawed()
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
	l.mu.Lock()
	delete(l.conns, dst)
	delete(l.conns, src)
	l.mu.Unlock()
}

func (l *link) waitThawed() {
	l.mu.Lock()
	ch := l.thawed
	l.mu.Unlock()
	<-ch
}

func (l *link) cut() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.down = true
	for c := range l.conns {
		c.Close()
	}
}

func (l *link) freeze() {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.thawed:
		l.thawed = make(chan struct{})
	default:
	}
}

func (l *link) restore() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.down = false
	select {
	case <-l.thawed:
	default:
		close(l.thawed)
	}
}

func (l *link) close() {
	l.ln.Close()
	l.restore()
	l.cut()
	l.wg.Wait()
}

// TestMain fails the run on goroutines left behind: Close must stop the
// registry's loops and the etcd client's.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
