package registry

import (
	"context"
	"sync"
	"time"
)

// Memory is the registry of a single relay: there is no one to share
// with, so Lookup is always empty and the rest is this replica's own
// announces and revocations. It is the default (no etcd needed).
type Memory struct {
	self Replica

	mu      sync.Mutex
	tunnels map[string]map[tunnelID]Tunnel // by label
	revoked map[string]time.Time           // token id -> expiry (zero: forever)
}

// tunnelID identifies one announced tunnel, as the etcd key does.
type tunnelID struct{ label, cluster, agent string }

func idOf(t Tunnel) tunnelID { return tunnelID{t.Label, t.ClusterUID, t.AgentID} }

var _ Registry = (*Memory)(nil)

// NewMemory returns the registry of a lone relay.
func NewMemory(self Replica) *Memory {
	return &Memory{self: self, tunnels: map[string]map[tunnelID]Tunnel{}, revoked: map[string]time.Time{}}
}

// Start does nothing: there is no fleet to join.
func (m *Memory) Start(context.Context) error { return nil }

// Self is this replica.
func (m *Memory) Self() Replica { return m.self }

// Announce records t.
func (m *Memory) Announce(t Tunnel) {
	m.mu.Lock()
	byID := m.tunnels[t.Label]
	if byID == nil {
		byID = map[tunnelID]Tunnel{}
		m.tunnels[t.Label] = byID
	}
	byID[idOf(t)] = t
	m.mu.Unlock()
}

// Withdraw forgets t.
func (m *Memory) Withdraw(t Tunnel) {
	m.mu.Lock()
	if byID := m.tunnels[t.Label]; byID != nil {
		delete(byID, idOf(t))
		if len(byID) == 0 {
			delete(m.tunnels, t.Label)
		}
	}
	m.mu.Unlock()
}

// Lookup is always empty: no other replica exists.
func (m *Memory) Lookup(string) []Holder { return nil }

// LabelOwner returns the cluster of an announced tunnel for label.
func (m *Memory) LabelOwner(label string) (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id := range m.tunnels[label] {
		return id.cluster, true
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
