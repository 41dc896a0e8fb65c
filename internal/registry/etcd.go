package registry

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// Defaults of EtcdConfig.
const (
	DefaultPrefix   = "/spectro-proxy/"
	DefaultLeaseTTL = 10 * time.Second
)

const (
	// opTimeout bounds one etcd request (a write batch, the listing, a
	// grant): a request to an unreachable etcd fails and is retried
	// instead of hanging.
	opTimeout = 5 * time.Second
	// maxBatch is the most keys one write transaction carries: etcd's
	// default --max-txn-ops.
	maxBatch = 128
	// retryMin and retryMax bound the backoff between attempts while
	// etcd is unreachable.
	retryMin = 100 * time.Millisecond
	retryMax = 5 * time.Second
)

// EtcdConfig configures an Etcd registry.
type EtcdConfig struct {
	// Endpoints are etcd's client URLs.
	Endpoints []string
	// TLS is the client TLS configuration (nil: plain http).
	TLS *tls.Config
	// Prefix is where the fleet's keys live (default DefaultPrefix).
	Prefix string
	// LeaseTTL is how long a replica's keys outlive its last keep-alive
	// (default DefaultLeaseTTL): the time until the fleet stops routing to
	// a replica that died.
	LeaseTTL time.Duration
	// Self is this replica.
	Self Replica
	// Logger gets the registry's events (nil: discarded).
	Logger *slog.Logger
	// Metrics, when set, gets the registry's metrics.
	Metrics prometheus.Registerer
}

// Etcd is the registry of N relay replicas sharing one etcd cluster.
//
// Keys, all under Prefix and, except revocations, under the replica's one
// lease:
//
//	replicas/<id>                                       JSON Replica
//	tunnels/<label>/<replicaID>/<clusterUID>/<agentID>  JSON Tunnel
//	revocations/<tokenID>                               {"expires": unix, 0 = never}
//
// A revocation has no lease (it outlives the replica that wrote it), or one
// of its own whose TTL ends when the revocation may be forgotten.
//
// Announce and Withdraw only queue a write: a background writer batches
// the queue into transactions and retries with backoff while etcd is
// unreachable. A watch on the prefix keeps a local view that every read
// uses. At rest the registry sends nothing but lease keep-alives.
type Etcd struct {
	cfg     EtcdConfig
	log     *slog.Logger
	cli     *clientv3.Client
	m       *metrics
	selfVal string // JSON of cfg.Self
	selfKey string

	rr atomic.Uint64 // rotates Lookup's order

	kickWrite chan struct{} // the writer has work (buffered 1)
	kickLease chan struct{} // the lease is gone: grant another now (buffered 1)
	joined    chan struct{} // closed once the replica key is written
	listed    chan struct{} // closed once the first view is loaded

	startOnce sync.Once
	closeOnce sync.Once
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	mu        sync.Mutex
	lease     clientv3.LeaseID    // 0: none (before the first, or after etcd dropped it)
	held      bool                // Ready: etcd has not said the lease is gone
	local     map[string][]Tunnel // own tunnels by label (a slice: see view.tunnels)
	nLocal    int
	localRev  map[string]time.Time // revocations written through this replica
	pending   map[string]*pendingOp
	gen       uint64 // stamps pending ops, so that a write that raced a newer op keeps it queued
	view      view
	joinedSet bool
	listedSet bool
	// readyHook, when set (by tests), sees every change of Ready, which
	// polling could miss.
	readyHook func(ready bool)
}

// pendingOp is the wanted state of one of this replica's keys.
type pendingOp struct {
	put bool   // false: delete
	val string // for put
	gen uint64
}

// view is the fleet as last seen through the watch.
type view struct {
	replicas map[string]Replica
	// label -> its tunnels: most labels have one or two, and a slice of
	// them costs a fraction of a map (every replica holds every tunnel of
	// the fleet).
	tunnels map[string][]viewTunnel
	revoked map[string]time.Time
}

type viewTunnel struct {
	key     string // the etcd key; the other fields are substrings of it
	replica string
	cluster string
	mode    string
}

func newView() view {
	return view{replicas: map[string]Replica{}, tunnels: map[string][]viewTunnel{}, revoked: map[string]time.Time{}}
}

// internMode returns the constant for the two modes, so that a view of
// thousands of tunnels does not hold thousands of copies.
func internMode(m string) string {
	switch m {
	case "passthrough":
		return "passthrough"
	case "terminate":
		return "terminate"
	}
	return m
}

var _ Registry = (*Etcd)(nil)

// NewEtcd returns a registry on etcd; it does not contact etcd until
// Start.
func NewEtcd(cfg EtcdConfig) (*Etcd, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcd registry: no endpoints")
	}
	if cfg.Self.ID == "" || strings.Contains(cfg.Self.ID, "/") {
		return nil, fmt.Errorf("etcd registry: replica id %q must be set and have no '/'", cfg.Self.ID)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(cfg.Prefix, "/") {
		cfg.Prefix += "/"
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.LeaseTTL < 2*time.Second {
		// etcd's minimum lease TTL; shorter would be raised silently.
		cfg.LeaseTTL = 2 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(cfg.Metrics)
	if err != nil {
		return nil, err
	}
	selfVal, err := json.Marshal(cfg.Self)
	if err != nil {
		return nil, fmt.Errorf("encoding replica: %w", err)
	}
	cli, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	return &Etcd{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "registry", "replica", cfg.Self.ID),
		cli:       cli,
		m:         m,
		selfVal:   string(selfVal),
		selfKey:   cfg.Prefix + "replicas/" + cfg.Self.ID,
		kickWrite: make(chan struct{}, 1),
		kickLease: make(chan struct{}, 1),
		joined:    make(chan struct{}),
		listed:    make(chan struct{}),
		local:     map[string][]Tunnel{},
		localRev:  map[string]time.Time{},
		pending:   map[string]*pendingOp{},
		view:      newView(),
	}, nil
}

// newClient returns an etcd client for cfg; it does not connect yet.
func newClient(cfg EtcdConfig) (*clientv3.Client, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: cfg.Endpoints,
		TLS:       cfg.TLS,
		// The client's own logging would duplicate ours (every retry);
		// what matters is logged through cfg.Logger.
		Logger: zap.NewNop(),
		// A dead connection (no RST: a partition) is noticed within
		// seconds, not at the kernel's TCP timeout. etcd refuses pings
		// more often than every 5s.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		DialOptions: []grpc.DialOption{
			// Back to etcd within seconds of its return: gRPC's default
			// backoff grows to two minutes.
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: retryMin, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
				MinConnectTimeout: 2 * time.Second,
			}),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("creating etcd client for %v: %w", cfg.Endpoints, err)
	}
	return cli, nil
}

// Start takes a lease, writes the replica key, loads the view and keeps it
// current until Close. It returns once the replica key is written and the
// first view is loaded, or with ctx's error, after stopping the work.
func (e *Etcd) Start(ctx context.Context) error {
	e.startOnce.Do(func() {
		// Not ctx: the view and the writes must outlive it (a drain
		// starts when the relay's serving context ends); Close ends them.
		bg, cancel := context.WithCancel(context.Background())
		e.mu.Lock()
		e.cancel = cancel
		e.mu.Unlock()
		e.wg.Add(3)
		go func() { defer e.wg.Done(); e.leaseLoop(bg) }()
		go func() { defer e.wg.Done(); e.writeLoop(bg) }()
		go func() { defer e.wg.Done(); e.watchLoop(bg) }()
	})
	for _, c := range []struct {
		ch   chan struct{}
		what string
	}{{e.joined, "writing the replica key"}, {e.listed, "loading the fleet's view"}} {
		select {
		case <-c.ch:
		case <-ctx.Done():
			e.stop()
			return fmt.Errorf("joining the relay fleet on etcd %v: %s: %w", e.cfg.Endpoints, c.what, ctx.Err())
		}
	}
	e.log.Info("joined the relay fleet", "endpoints", e.cfg.Endpoints, "replicas", len(e.Replicas()))
	return nil
}

// stop ends the background work and waits for it.
func (e *Etcd) stop() {
	e.mu.Lock()
	cancel := e.cancel
	e.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	e.wg.Wait()
}

// Self is this replica.
func (e *Etcd) Self() Replica { return e.cfg.Self }

func (e *Etcd) tunnelKey(t Tunnel) string {
	return e.cfg.Prefix + "tunnels/" + t.Label + "/" + e.cfg.Self.ID + "/" + t.ClusterUID + "/" + t.AgentID
}

// sameKey: u has t's etcd key (the same label, cluster and agent).
func (t Tunnel) sameKey(u Tunnel) bool {
	return t.Label == u.Label && t.ClusterUID == u.ClusterUID && t.AgentID == u.AgentID
}

// Announce queues the tunnel's key; it returns at once.
func (e *Etcd) Announce(t Tunnel) {
	key := e.tunnelKey(t)
	val, err := json.Marshal(t)
	if err != nil { // a struct of strings: cannot happen
		e.log.Error("encoding tunnel", "err", err)
		return
	}
	e.mu.Lock()
	ts := e.local[t.Label]
	switch i := slices.IndexFunc(ts, t.sameKey); {
	case i < 0:
		e.local[t.Label] = append(ts, t)
		e.nLocal++
	case ts[i] == t:
		e.mu.Unlock()
		return // already there: a repeat must not write
	default:
		ts[i] = t // another mode
	}
	e.queueLocked(key, true, string(val))
	e.mu.Unlock()
	e.kick(e.kickWrite)
}

// Withdraw queues the removal of the tunnel's key; it returns at once.
func (e *Etcd) Withdraw(t Tunnel) {
	key := e.tunnelKey(t)
	e.mu.Lock()
	ts := e.local[t.Label]
	i := slices.IndexFunc(ts, t.sameKey)
	if i < 0 {
		e.mu.Unlock()
		return
	}
	if ts = slices.Delete(ts, i, i+1); len(ts) == 0 {
		delete(e.local, t.Label)
	} else {
		e.local[t.Label] = slices.Clip(ts)
	}
	e.nLocal--
	e.queueLocked(key, false, "")
	e.mu.Unlock()
	e.kick(e.kickWrite)
}

func (e *Etcd) queueLocked(key string, put bool, val string) {
	e.gen++
	e.pending[key] = &pendingOp{put: put, val: val, gen: e.gen}
}

func (e *Etcd) kick(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Lookup returns the other live replicas holding label, one entry per
// replica, rotated by one on every call so that forwards spread over them.
func (e *Etcd) Lookup(label string) []Holder {
	e.mu.Lock()
	var hs []Holder
	for _, vt := range e.view.tunnels[label] {
		if vt.replica == e.cfg.Self.ID {
			continue
		}
		r, live := e.view.replicas[vt.replica]
		if !live || slices.ContainsFunc(hs, func(h Holder) bool { return h.Replica.ID == r.ID }) {
			continue
		}
		hs = append(hs, Holder{Replica: r, ClusterUID: vt.cluster, Mode: vt.mode})
	}
	e.mu.Unlock()
	if len(hs) > 1 {
		slices.SortFunc(hs, func(a, b Holder) int { return strings.Compare(a.Replica.ID, b.Replica.ID) })
		n := int(e.rr.Add(1) % uint64(len(hs)))
		hs = append(hs[n:], hs[:n]...)
	}
	return hs
}

// LabelOwner returns the cluster holding label: this replica's own
// tunnels first (they may not be in etcd yet), then the live others'.
func (e *Etcd) LabelOwner(label string) (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ts := e.local[label]; len(ts) > 0 {
		return ts[0].ClusterUID, true
	}
	for _, vt := range e.view.tunnels[label] {
		if vt.replica == e.cfg.Self.ID {
			continue // e.local is the truth for self
		}
		if _, live := e.view.replicas[vt.replica]; live {
			return vt.cluster, true
		}
	}
	return "", false
}

// Replicas returns the live replicas, self included, sorted by ID.
func (e *Etcd) Replicas() []Replica {
	e.mu.Lock()
	rs := make([]Replica, 0, len(e.view.replicas)+1)
	for _, r := range e.view.replicas {
		rs = append(rs, r)
	}
	_, selfSeen := e.view.replicas[e.cfg.Self.ID]
	e.mu.Unlock()
	if !selfSeen {
		rs = append(rs, e.cfg.Self)
	}
	slices.SortFunc(rs, func(a, b Replica) int { return strings.Compare(a.ID, b.ID) })
	return rs
}

type revocation struct {
	Expires int64 `json:"expires"` // unix seconds; 0: never
}

// Revoke writes the revocation to etcd (and marks it locally at once).
// With an expiry the key gets a lease of its own that ends then.
func (e *Etcd) Revoke(ctx context.Context, tokenID string, expires time.Time) error {
	if tokenID == "" || strings.Contains(tokenID, "/") {
		return fmt.Errorf("revoking token %q: invalid token id", tokenID)
	}
	e.mu.Lock()
	e.localRev[tokenID] = expires
	e.mu.Unlock()
	return writeRevocation(ctx, e.cli, e.cfg.Prefix, tokenID, expires, e.m)
}

// WriteRevocation writes a token revocation into the fleet's etcd (cfg's
// Endpoints, TLS, Prefix; the rest is unused) without joining the fleet:
// what Etcd.Revoke does, for the token revoke command. Every relay's view
// has it within moments.
func WriteRevocation(ctx context.Context, cfg EtcdConfig, tokenID string, expires time.Time) error {
	if tokenID == "" || strings.Contains(tokenID, "/") {
		return fmt.Errorf("revoking token %q: invalid token id", tokenID)
	}
	if len(cfg.Endpoints) == 0 {
		return errors.New("revoking token: no etcd endpoints")
	}
	cli, err := newClient(cfg)
	if err != nil {
		return err
	}
	defer cli.Close()
	return writeRevocation(ctx, cli, cfg.Prefix, tokenID, expires, nil)
}

func writeRevocation(ctx context.Context, cli *clientv3.Client, prefix, tokenID string, expires time.Time, m *metrics) error {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	rv := revocation{}
	var opts []clientv3.OpOption
	if !expires.IsZero() {
		rv.Expires = expires.Unix()
		ttl := int64(math.Ceil(time.Until(expires).Seconds()))
		if ttl <= 0 {
			return nil // expired already: nothing to remember
		}
		lease, err := cli.Grant(ctx, ttl)
		if err != nil {
			return fmt.Errorf("granting a lease for revocation of token %s: %w", tokenID, err)
		}
		m.write("grant", 1)
		opts = append(opts, clientv3.WithLease(lease.ID))
	}
	val, _ := json.Marshal(rv)
	if _, err := cli.Put(ctx, prefix+"revocations/"+tokenID, string(val), opts...); err != nil {
		return fmt.Errorf("writing revocation of token %s: %w", tokenID, err)
	}
	m.write("put", 1)
	return nil
}

// Revoked reports whether tokenID is revoked now, from the local view.
func (e *Etcd) Revoked(tokenID string) bool {
	now := time.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, m := range []map[string]time.Time{e.view.revoked, e.localRev} {
		if exp, ok := m[tokenID]; ok && (exp.IsZero() || now.Before(exp)) {
			return true
		}
	}
	return false
}

// Ready is false before the first lease and after etcd said the lease is
// gone, until a new one is granted. It stays true while etcd is merely
// unreachable: an etcd outage must not make every replica unready at once.
func (e *Etcd) Ready() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.held
}

// Close stops the background work and revokes the lease, which deletes
// every key this replica wrote at once (revocations excepted).
func (e *Etcd) Close(ctx context.Context) error {
	var err error
	e.closeOnce.Do(func() {
		e.stop()
		e.mu.Lock()
		lease := e.lease
		e.lease, e.held = 0, false
		e.mu.Unlock()
		e.m.held.Set(0)
		if lease != 0 {
			if _, rerr := e.cli.Revoke(ctx, lease); rerr != nil && !errors.Is(rerr, rpctypes.ErrLeaseNotFound) {
				err = fmt.Errorf("revoking lease %x (its keys expire with it): %w", int64(lease), rerr)
			} else {
				e.m.write("revoke", 1)
			}
		}
		if cerr := e.cli.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("closing etcd client: %w", cerr)
		}
	})
	return err
}

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

// watchLoop lists the prefix into the view and watches from there; when
// the watch ends (compacted, canceled) it lists and watches again. While
// etcd is unreachable the view stays as it was.
func (e *Etcd) watchLoop(ctx context.Context) {
	var bo backoffState
	for {
		rev, err := e.list(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			wait := bo.next()
			e.log.Warn("listing the registry failed, keeping the last view", "err", err, "retry_in", wait)
			if !e.sleep(ctx, wait, nil) {
				return
			}
			continue
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := e.cli.Watch(wctx, e.cfg.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		var werr error
		for wr := range wch {
			if werr = wr.Err(); werr != nil {
				break
			}
			bo.reset()
			e.apply(wr.Events)
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		e.m.watchRestarts.Inc()
		wait := bo.next()
		e.log.Warn("registry watch ended, listing again", "err", werr, "revision", rev, "in", wait)
		if !e.sleep(ctx, wait, nil) {
			return
		}
	}
}

// list replaces the view with etcd's keys and returns their revision.
func (e *Etcd) list(ctx context.Context) (int64, error) {
	tctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	resp, err := e.cli.Get(tctx, e.cfg.Prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("listing %s: %w", e.cfg.Prefix, err)
	}
	v := newView()
	e.log.Debug("listed the registry", "keys", len(resp.Kvs), "revision", resp.Header.Revision)
	for _, kv := range resp.Kvs {
		e.applyOne(&v, true, string(kv.Key), kv.Value)
	}
	e.mu.Lock()
	e.view = v
	n := len(v.replicas)
	first := !e.listedSet
	e.listedSet = true
	e.mu.Unlock()
	e.m.replicas.Set(float64(n))
	if first {
		close(e.listed)
	}
	return resp.Header.Revision, nil
}

func (e *Etcd) apply(evs []*clientv3.Event) {
	e.mu.Lock()
	for _, ev := range evs {
		e.applyOne(&e.view, ev.Type == mvccpb.PUT, string(ev.Kv.Key), ev.Kv.Value)
	}
	n := len(e.view.replicas)
	e.mu.Unlock()
	e.m.replicas.Set(float64(n))
}

// applyOne applies one key's put or delete to v. Keys it cannot parse are
// logged and skipped: one bad key must not stop the view.
func (e *Etcd) applyOne(v *view, put bool, key string, val []byte) {
	rest, ok := strings.CutPrefix(key, e.cfg.Prefix)
	if !ok {
		return
	}
	kind, rest, _ := strings.Cut(rest, "/")
	switch kind {
	case "replicas":
		e.log.Debug("replica key", "id", rest, "put", put)
		if !put {
			delete(v.replicas, rest)
			return
		}
		var r Replica
		if err := json.Unmarshal(val, &r); err != nil {
			e.log.Warn("skipping bad replica key", "key", key, "err", err)
			return
		}
		r.ID = rest
		v.replicas[rest] = r
	case "tunnels":
		// <label>/<replicaID>/<clusterUID>/<agentID>; the label is
		// parsed from the right in case it ever holds a '/'.
		parts := strings.Split(rest, "/")
		if len(parts) < 4 {
			e.log.Warn("skipping bad tunnel key", "key", key)
			return
		}
		n := len(parts)
		label := strings.Join(parts[:n-3], "/")
		ts := v.tunnels[label]
		i := slices.IndexFunc(ts, func(vt viewTunnel) bool { return vt.key == key })
		if !put {
			if i >= 0 {
				ts = slices.Delete(ts, i, i+1)
				if len(ts) == 0 {
					delete(v.tunnels, label)
				} else {
					v.tunnels[label] = slices.Clip(ts)
				}
			}
			return
		}
		var t struct {
			Mode string `json:"mode"`
		}
		if err := json.Unmarshal(val, &t); err != nil {
			e.log.Warn("skipping bad tunnel key", "key", key, "err", err)
			return
		}
		vt := viewTunnel{key: key, replica: parts[n-3], cluster: parts[n-2], mode: internMode(t.Mode)}
		if i >= 0 {
			ts[i] = vt
			return
		}
		v.tunnels[label] = append(ts, vt)
	case "revocations":
		if !put {
			delete(v.revoked, rest)
			return
		}
		var rv revocation
		if err := json.Unmarshal(val, &rv); err != nil {
			// Still revoked: failing closed is the safe side.
			e.log.Warn("revocation key with a bad value, treating as forever", "key", key, "err", err)
		}
		var exp time.Time
		if rv.Expires != 0 {
			exp = time.Unix(rv.Expires, 0)
		}
		v.revoked[rest] = exp
	}
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

// metrics are the registry's; a nil *metrics (WriteRevocation's callers)
// records nothing.
type metrics struct {
	keepalive     prometheus.Histogram
	held          prometheus.Gauge
	writes        *prometheus.CounterVec
	watchRestarts prometheus.Counter
	replicas      prometheus.Gauge
	put           prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	buckets := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}
	m := &metrics{
		keepalive: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "spectro_proxy_registry_lease_keepalive_seconds",
			Help:    "Round trip of the replica's etcd lease keep-alives.",
			Buckets: buckets,
		}),
		held: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_registry_lease_held",
			Help: "1 while the replica holds its etcd lease (0: before the first, or after etcd dropped it).",
		}),
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_registry_etcd_writes_total",
			Help: "Requests that change etcd, by op: put and delete (keys), grant, revoke, keepalive.",
		}, []string{"op"}),
		watchRestarts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spectro_proxy_registry_watch_restarts_total",
			Help: "Times the registry watch ended (compaction, cancel) and the view was listed again.",
		}),
		replicas: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_registry_replicas",
			Help: "Live relay replicas in this replica's view, itself included.",
		}),
		put: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "spectro_proxy_registry_put_seconds",
			Help:    "Latency of the etcd transactions that write announced tunnels.",
			Buckets: buckets,
		}),
	}
	for _, op := range []string{"put", "delete", "grant", "revoke", "keepalive"} {
		m.writes.WithLabelValues(op)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.keepalive, m.held, m.writes, m.watchRestarts, m.replicas, m.put} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("registering registry metrics: %w", err)
			}
		}
	}
	return m, nil
}

func (m *metrics) write(op string, n int) {
	if m != nil && n > 0 {
		m.writes.WithLabelValues(op).Add(float64(n))
	}
}
