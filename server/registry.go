package server

import (
	"errors"
	"fmt"
	"iter"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// session is one connected agent replica.
type session struct {
	agentID    string
	clusterUID string
	tokenID    string
	// expires is the token's expiry (zero: never); the session ends then.
	expires time.Time
	routes  routeSet
	remote  string
	since   time.Time
	cc      tunnelClient
	conn    net.Conn
	// streams counts streams open on the tunnel, capped at maxStreams
	// (MaxStreamsPerTunnel) so that one busy or abused host name cannot
	// make its agent carry without limit.
	streams    atomic.Int32
	maxStreams int32
	// httpStreams: the agent serves tunnel.StreamHTTP.
	httpStreams bool
	// h2Streams: the agent serves tunnel.StreamH2; noH2: it refused one
	// (its API server does not speak HTTP/2).
	h2Streams bool
	noH2      atomic.Bool
	http      httpConns
}

func (s *session) close() { s.cc.Close(); s.conn.Close() }

// routeSet is a session's labels and their modes, sorted by label: an
// agent registers one to three, and a map for them cost a relay about
// 0.3 KiB per idle tunnel (make bench, relay heap profile at 10,000).
type routeSet []route

type route struct {
	label string
	mode  tunnel.Mode
}

func newRouteSet(m map[string]tunnel.Mode) routeSet {
	rs := make(routeSet, 0, len(m))
	for label, mode := range m {
		rs = append(rs, route{label, mode})
	}
	slices.SortFunc(rs, func(a, b route) int { return strings.Compare(a.label, b.label) })
	return rs
}

// all yields each label and its mode.
func (rs routeSet) all() iter.Seq2[string, tunnel.Mode] {
	return func(yield func(string, tunnel.Mode) bool) {
		for _, r := range rs {
			if !yield(r.label, r.mode) {
				return
			}
		}
	}
}

// mode returns label's mode, and whether the set has label.
func (rs routeSet) mode(label string) (tunnel.Mode, bool) {
	for _, r := range rs {
		if r.label == label {
			return r.mode, true
		}
	}
	return "", false
}

// tunnelClient is the relay's HTTP/2 client on one agent's tunnel: a
// *tunnel.LazyClientConn (a fake in unit tests).
type tunnelClient interface {
	http.RoundTripper
	// CanTakeNewRequest reports whether a new stream may go to the tunnel
	// (not after GOAWAY, nor once it is closing).
	CanTakeNewRequest() bool
	// GoingAway reports GOAWAY received, or the tunnel closing or closed.
	GoingAway() bool
	Close() error
}

var _ tunnelClient = (*tunnel.LazyClientConn)(nil)

// registry maps labels to the sessions serving them.
//
// The rule for duplicates: any number of replicas of one cluster may serve a
// label at once (new streams are spread round-robin over them), but one agent
// id has one session: a reconnect with the same id (same cluster) replaces
// the stale session, which is closed.
type registry struct {
	mu      sync.Mutex
	byLabel map[string][]*session
	byAgent map[string]*session
	// seen remembers labels that had an agent, so a request while the agent
	// is away gets "agent not connected" rather than "unknown host".
	seen map[string]tunnel.Mode
	next map[string]int
	// perCluster counts each cluster's sessions.
	perCluster map[string]int
}

func newRegistry() *registry {
	return &registry{
		byLabel: map[string][]*session{},
		byAgent: map[string]*session{},
		seen:    map[string]tunnel.Mode{},
		next:    map[string]int{},

		perCluster: map[string]int{},
	}
}

func agentKey(s *session) string { return s.clusterUID + "/" + s.agentID }

// heldByOther returns a label of routes that sessions of another cluster
// serve now, or "". Two clusters never share a host name: that would send
// one cluster's users to the other (it takes an operator issuing both
// tokens the same subdomain, but the relay still refuses it).
func (r *registry) heldByOther(routes routeSet, clusterUID string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.heldByOtherLocked(routes, clusterUID)
}

func (r *registry) heldByOtherLocked(routes routeSet, clusterUID string) string {
	for label := range routes.all() {
		for _, other := range r.byLabel[label] {
			if other.clusterUID != clusterUID {
				return label
			}
		}
	}
	return ""
}

// errLabelHeld is returned by add when another cluster serves a label.
var errLabelHeld = errors.New("host name is served by another cluster")

// clusterFull reports whether a new session of agentID would take the
// cluster over max sessions (a reconnect of a registered agent id would
// not: it replaces its old session).
func (r *registry) clusterFull(clusterUID, agentID string, max int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if max <= 0 {
		return false
	}
	if _, ok := r.byAgent[clusterUID+"/"+agentID]; ok {
		return false
	}
	return r.perCluster[clusterUID] >= max
}

// errTooManySessions is returned by add when the cluster has its
// maximum of sessions (agent replicas) already.
var errTooManySessions = errors.New("too many sessions for the cluster")

// add registers s and returns the session it replaced, if any. A cluster
// has at most maxPerCluster sessions (0: no limit); a session replacing
// one of the same agent id does not count twice.
func (r *registry) add(s *session, maxPerCluster int) (replaced *session, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if label := r.heldByOtherLocked(s.routes, s.clusterUID); label != "" {
		return nil, fmt.Errorf("%s: %w", label, errLabelHeld)
	}
	old, ok := r.byAgent[agentKey(s)]
	if !ok && maxPerCluster > 0 && r.perCluster[s.clusterUID] >= maxPerCluster {
		return nil, fmt.Errorf("cluster %s has %d: %w", s.clusterUID, maxPerCluster, errTooManySessions)
	}
	if ok {
		r.removeLocked(old)
		replaced = old
	}
	r.perCluster[s.clusterUID]++
	r.byAgent[agentKey(s)] = s
	for label, mode := range s.routes.all() {
		r.byLabel[label] = append(r.byLabel[label], s)
		r.seen[label] = mode
	}
	return replaced, nil
}

// remove unregisters s and reports whether it was registered; removing a
// session twice, or one that was replaced, is harmless.
func (r *registry) remove(s *session) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.removeLocked(s)
}

func (r *registry) removeLocked(s *session) bool {
	if r.byAgent[agentKey(s)] != s {
		return false // removed already, or replaced (which removed it)
	}
	delete(r.byAgent, agentKey(s))
	if r.perCluster[s.clusterUID]--; r.perCluster[s.clusterUID] <= 0 {
		delete(r.perCluster, s.clusterUID)
	}
	for label := range s.routes.all() {
		list := r.byLabel[label]
		for i, x := range list {
			if x == s {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(r.byLabel, label)
		} else {
			r.byLabel[label] = list
		}
	}
	return true
}

// candidates returns the sessions for label in the order to try them
// (round-robin start), the label's mode, and whether the label was ever
// registered.
func (r *registry) candidates(label string) (list []*session, mode tunnel.Mode, known bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	mode, known = r.seen[label]
	all := r.byLabel[label]
	if len(all) == 0 {
		return nil, mode, known
	}
	start := r.next[label] % len(all)
	r.next[label] = start + 1
	list = make([]*session, 0, len(all))
	for i := range all {
		s := all[(start+i)%len(all)]
		if s.cc.CanTakeNewRequest() {
			list = append(list, s)
		}
	}
	mode, _ = all[0].routes.mode(label)
	return list, mode, true
}

// count returns how many sessions are registered.
func (r *registry) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.byAgent)
}

// all returns every session.
func (r *registry) all() []*session {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*session, 0, len(r.byAgent))
	for _, s := range r.byAgent {
		out = append(out, s)
	}
	return out
}
