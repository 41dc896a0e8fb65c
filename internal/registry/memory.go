package registry

import (
	"context"
	"slices"
	"sync"
	"time"
)

// Memory is the registry of a single relay: there is no one to share
// with, so Lookup is always empty and the rest is this replica's own
// announces and revocations. It is the default (no etcd needed).
type Memory struct {
	self Replica

	mu sync.Mutex
	// tunnels by label: a label has one or two (an agent's replicas), so
	// a short slice, not a map per label, which cost a relay with 10,000
	// idle tunnels about 0.9 KiB each (make bench, relay heap profile).
	tunnels map[string][]Tunnel
	revoked map[string]time.Time // token id -> expiry (zero: forever)
}

// same reports whether a and b are the same announced tunnel, as the etcd
// key tells them apart (label, cluster, agent).
func same(a, b Tunnel) bool {
	return a.Label == b.Label && a.ClusterUID == b.ClusterUID && a.AgentID == b.AgentID
}

var _ Registry = (*Memory)(nil)

// NewMemory returns the registry of a lone relay.
func NewMemory(self Replica) *Memory {
	return &Memory{self: self, tunnels: map[string][]Tunnel{}, revoked: map[string]time.Time{}}
}

// Start does nothing: there is no fleet to join.
func (m *Memory) Start(context.Context) error { return nil }

// Self is this replica.
func (m *Memory) Self() Replica { return m.self }

// Announce records t.
func (m *Memory) Announce(t Tunnel) {
	m.mu.Lock()
	defer m.mu.Unlock()
	held := m.tunnels[t.Label]
	for i := range held {
		if same(held[i], t) {
			held[i] = t
			return
		}
	}
	m.tunnels[t.Label] = append(held, t)
}

// Withdraw forgets t.
func (m *Memory) Withdraw(t Tunnel) {
	m.mu.Lock()
	defer m.mu.Unlock()
	held := slices.DeleteFunc(m.tunnels[t.Label], func(h Tunnel) bool { return same(h, t) })
	if len(held) == 0 {
		delete(m.tunnels, t.Label)
		return
	}
	m.tunnels[t.Label] = held
}

// Lookup is always empty: no other replica exists.
func (m *Memory) Lookup(string) []Holder { return nil }

// LabelOwner returns the cluster of an announced tunnel for label.
func (m *Memory) LabelOwner(label string) (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if held := m.tunnels[label]; len(held) > 0 {
		return held[0].ClusterUID, true
	}
	return "", false
}

// Replicas is this replica alone.
func (m *Memory) Replicas() []Replica { return []Replica{m.self} }

// Revoke marks tokenID revoked until expires (zero: forever).
func (m *Memory) Revoke(_ context.Context, tokenID string, expires time.Time) error {
	m.mu.Lock()
	m.revoked[tokenID] = expires
	m.mu.Unlock()
	return nil
}

// Revoked reports whether tokenID is revoked now.
func (m *Memory) Revoked(tokenID string) bool {
	m.mu.Lock()
	exp, ok := m.revoked[tokenID]
	m.mu.Unlock()
	return ok && (exp.IsZero() || time.Now().Before(exp))
}

// Ready is always true: a lone relay has no lease to lose.
func (m *Memory) Ready() bool { return true }

// Close does nothing.
func (m *Memory) Close(context.Context) error { return nil }
