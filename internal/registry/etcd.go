package registry

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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
