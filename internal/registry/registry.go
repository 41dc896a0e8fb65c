// Package registry is the relay fleet's shared view: which relay replicas
// are alive and which of them holds a tunnel for which label, plus the
// token revocations every replica honours.
//
// Two implementations: Memory, a single relay with nothing to share (the
// default; `make run` needs nothing else), and Etcd, N replicas on one etcd
// cluster. Routing reads only the local view (Lookup, LabelOwner, Revoked
// never wait on etcd); writes go to etcd in the background.
//
// Etcd's files by role: etcd.go is the type and its Registry methods,
// etcd_lease.go the lease, etcd_write.go the queued writes of this
// replica's keys, etcd_view.go the watched view of the fleet,
// etcd_metrics.go its metrics.
package registry

import (
	"context"
	"time"
)

// Replica is one relay process.
type Replica struct {
	// ID is unique among live replicas (the pod name in Kubernetes).
	ID string `json:"id"`
	// PeerAddr is host:port of the replica's internal peer listener,
	// where other replicas forward users' connections (empty: none).
	PeerAddr string `json:"peer"`
}

// Tunnel is one agent tunnel a replica holds, for one label.
type Tunnel struct {
	Label      string `json:"-"`
	ClusterUID string `json:"cluster"`
	AgentID    string `json:"agent"`
	Mode       string `json:"mode"` // "passthrough" or "terminate"
}

// Holder is another replica that holds a tunnel for a label.
type Holder struct {
	Replica    Replica
	ClusterUID string
	Mode       string
}

// Registry is the shared view. Every method is safe for concurrent use.
type Registry interface {
	// Start joins the fleet: takes a lease, writes the replica's own key,
	// loads the view and keeps it current (watch) until Close. It returns
	// once the first view is loaded, or with ctx's error (then the work
	// stops; Close still releases what was taken). ctx bounds Start alone:
	// the view must stay current through a drain that begins when the
	// serving context ends.
	Start(ctx context.Context) error
	// Self is this replica.
	Self() Replica
	// Announce records that this replica holds t, and Withdraw that it no
	// longer does. Neither blocks on etcd: while etcd is unreachable the
	// write is retried in the background and the tunnel is served locally.
	Announce(t Tunnel)
	Withdraw(t Tunnel)
	// Lookup returns the other live replicas that hold a tunnel for label,
	// from the local view, in the order to try them (spread over calls).
	Lookup(label string) []Holder
	// LabelOwner returns the cluster whose tunnel holds label on any
	// replica (self included): one label, one cluster, fleet-wide.
	LabelOwner(label string) (clusterUID string, ok bool)
	// Replicas returns the live replicas, self included, sorted by ID.
	Replicas() []Replica
	// Revoke marks a token id revoked on every replica until expires
	// (zero: forever); Revoked reads the local view.
	Revoke(ctx context.Context, tokenID string, expires time.Time) error
	Revoked(tokenID string) bool
	// Ready reports whether the replica holds its lease (Memory: always).
	Ready() bool
	// Close withdraws everything this replica wrote (revokes its lease), so
	// other replicas stop routing to it at once, and stops the background
	// work.
	Close(ctx context.Context) error
}
