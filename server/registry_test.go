package server

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// fakeTunnel stands in for an agent's tunnel: it answers every stream
// with err, or 200 when err is nil.
type fakeTunnel struct {
	down   bool // CanTakeNewRequest says no (GOAWAY received, or closing)
	err    error
	opened int
	closed bool
}

func (f *fakeTunnel) RoundTrip(*http.Request) (*http.Response, error) {
	f.opened++
	if f.err != nil {
		return nil, f.err
	}
	return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader(""))}, nil
}
func (f *fakeTunnel) CanTakeNewRequest() bool { return !f.down }
func (f *fakeTunnel) GoingAway() bool         { return f.down }
func (f *fakeTunnel) Close() error            { f.closed = true; return nil }

// fakeSession is an agent replica of cluster serving labels (all
// passthrough), with a stream limit of maxStreams (1000 when 0).
func fakeSession(t *testing.T, cluster, agent string, labels ...string) *session {
	t.Helper()
	routes := map[string]tunnel.Mode{}
	for _, l := range labels {
		routes[l] = tunnel.Passthrough
	}
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	return &session{agentID: agent, clusterUID: cluster, routes: newRouteSet(routes), cc: &fakeTunnel{}, conn: a, maxStreams: 1000}
}

func agents(list []*session) []string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = s.clusterUID + "/" + s.agentID
	}
	return out
}

func TestRegistry(t *testing.T) {
	type step struct {
		op      string // add, remove
		sess    string // a key of the sessions below
		wantErr error
		replace string // the session add must say it replaced
	}
	tests := []struct {
		name  string
		steps []step
		label string
		// want lists the candidates for label, in order, from one call
		want  []string
		known bool
		count int
	}{
		{name: "empty", label: "a", known: false},
		{name: "add", steps: []step{{op: "add", sess: "a1"}}, label: "a", want: []string{"A/1"}, known: true, count: 1},
		{name: "dashboard label too", steps: []step{{op: "add", sess: "a1"}}, label: "a-dashboard", want: []string{"A/1"}, known: true, count: 1},
		{name: "replicas of one cluster share a label",
			steps: []step{{op: "add", sess: "a1"}, {op: "add", sess: "a2"}}, label: "a", want: []string{"A/1", "A/2"}, known: true, count: 2},
		{name: "same agent id replaces its stale session",
			steps: []step{{op: "add", sess: "a1"}, {op: "add", sess: "a1again", replace: "a1"}}, label: "a", want: []string{"A/1"}, known: true, count: 1},
		{name: "another cluster may not take a held label",
			steps: []step{{op: "add", sess: "a1"}, {op: "add", sess: "b-as-a", wantErr: errLabelHeld}}, label: "a", want: []string{"A/1"}, known: true, count: 1},
		{name: "remove keeps the label known",
			steps: []step{{op: "add", sess: "a1"}, {op: "remove", sess: "a1"}}, label: "a", want: []string{}, known: true, count: 0},
		{name: "removing twice is harmless",
			steps: []step{{op: "add", sess: "a1"}, {op: "remove", sess: "a1"}, {op: "remove", sess: "a1"}}, label: "a", want: []string{}, known: true, count: 0},
		{name: "removing a replaced session keeps its successor",
			steps: []step{{op: "add", sess: "a1"}, {op: "add", sess: "a1again", replace: "a1"}, {op: "remove", sess: "a1"}},
			label: "a", want: []string{"A/1"}, known: true, count: 1},
		{name: "after the last replica leaves, another cluster may take the label",
			steps: []step{{op: "add", sess: "a1"}, {op: "remove", sess: "a1"}, {op: "add", sess: "b-as-a"}}, label: "a", want: []string{"B/1"}, known: true, count: 1},
		{name: "failover skips a tunnel that takes no new streams",
			steps: []step{{op: "add", sess: "a1down"}, {op: "add", sess: "a2"}}, label: "a", want: []string{"A/2"}, known: true, count: 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sessions := map[string]*session{
				"a1":      fakeSession(t, "A", "1", "a", "a-dashboard"),
				"a1again": fakeSession(t, "A", "1", "a", "a-dashboard"),
				"a2":      fakeSession(t, "A", "2", "a", "a-dashboard"),
				"a1down":  fakeSession(t, "A", "1", "a"),
				"b-as-a":  fakeSession(t, "B", "1", "a"),
			}
			sessions["a1down"].cc.(*fakeTunnel).down = true
			r := newRegistry()
			for _, st := range tc.steps {
				s := sessions[st.sess]
				switch st.op {
				case "add":
					old, err := r.add(s, 0)
					require.ErrorIs(t, err, st.wantErr)
					if st.replace != "" {
						assert.Same(t, sessions[st.replace], old)
					} else {
						assert.Nil(t, old)
					}
				case "remove":
					r.remove(s)
				}
			}
			got, mode, known := r.candidates(tc.label)
			assert.Equal(t, tc.known, known)
			if tc.known {
				assert.Equal(t, tunnel.Passthrough, mode)
			}
			if tc.want != nil {
				assert.Equal(t, tc.want, agents(got))
			}
			assert.Equal(t, tc.count, r.count())
			assert.Len(t, r.all(), tc.count)
		})
	}
}

func TestRegistryRoundRobin(t *testing.T) {
	r := newRegistry()
	for _, id := range []string{"1", "2", "3"} {
		_, err := r.add(fakeSession(t, "A", id, "a"), 0)
		require.NoError(t, err)
	}
	var firsts []string
	for range 4 {
		list, _, _ := r.candidates("a")
		require.Len(t, list, 3, "every replica is a candidate, to fail over to")
		firsts = append(firsts, list[0].agentID)
	}
	assert.Equal(t, []string{"1", "2", "3", "1"}, firsts, "new streams are spread over the replicas")
}

func TestRegistryHeldByOther(t *testing.T) {
	r := newRegistry()
	_, err := r.add(fakeSession(t, "A", "1", "a"), 0)
	require.NoError(t, err)
	assert.Equal(t, "a", r.heldByOther(newRouteSet(map[string]tunnel.Mode{"a": tunnel.Terminate}), "B"))
	assert.Equal(t, "", r.heldByOther(newRouteSet(map[string]tunnel.Mode{"a": tunnel.Terminate}), "A"), "the cluster's own replicas may join")
	assert.Equal(t, "", r.heldByOther(newRouteSet(map[string]tunnel.Mode{"b": tunnel.Terminate}), "B"))
}

// openStream tries the candidates in order: past a full tunnel and a
// broken one, but not past an agent that refused (it could not reach its
// target, and another replica would not either).
func TestOpenStreamFailover(t *testing.T) {
	refused := errors.New("no route")
	tests := []struct {
		name       string
		errs       []error // per candidate: what its tunnel answers
		full       []bool  // per candidate: all stream slots taken
		wantOpened []int   // streams each candidate was asked for
		wantErr    error
		wantFrom   int // the candidate the stream came from
	}{
		{name: "first", errs: []error{nil, nil}, wantOpened: []int{1, 0}, wantFrom: 0},
		{name: "past a broken tunnel", errs: []error{io.ErrUnexpectedEOF, nil}, wantOpened: []int{1, 1}, wantFrom: 1},
		{name: "past a full tunnel", errs: []error{nil, nil}, full: []bool{true, false}, wantOpened: []int{0, 1}, wantFrom: 1},
		{name: "all full", errs: []error{nil, nil}, full: []bool{true, true}, wantOpened: []int{0, 0}, wantErr: errTooManyStreams},
		{name: "not past a refusal", errs: []error{refused, nil}, wantOpened: []int{1, 0}, wantErr: tunnel.ErrRefused},
		{name: "none", wantErr: nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := &Server{cfg: Config{StreamTimeout: DefaultStreamTimeout}}
			var cands []*session
			for i, err := range tc.errs {
				sess := fakeSession(t, "A", string(rune('1'+i)), "a")
				ft := sess.cc.(*fakeTunnel)
				if errors.Is(err, refused) {
					sess.cc = refusingTunnel{ft}
				} else {
					ft.err = err
				}
				if tc.full != nil && tc.full[i] {
					sess.maxStreams = 0
				}
				cands = append(cands, sess)
			}
			st, err := s.openStream(context.Background(), "a", tunnel.StreamTCP, cands)
			for i, sess := range cands {
				var opened int
				switch cc := sess.cc.(type) {
				case *fakeTunnel:
					opened = cc.opened
				case refusingTunnel:
					opened = cc.opened
				}
				assert.Equal(t, tc.wantOpened[i], opened, "streams asked of candidate %d", i)
			}
			if len(cands) == 0 || tc.wantErr != nil {
				require.Error(t, err)
				if tc.wantErr != nil {
					assert.ErrorIs(t, err, tc.wantErr)
				}
				for _, sess := range cands {
					assert.Zero(t, sess.streams.Load(), "a failed open gives its slot back")
				}
				return
			}
			require.NoError(t, err)
			assert.Equal(t, int32(1), cands[tc.wantFrom].streams.Load(), "the stream holds a slot")
			require.NoError(t, st.Close())
			require.NoError(t, st.Close())
			assert.Zero(t, cands[tc.wantFrom].streams.Load(), "closing gives the slot back, once")
		})
	}
}

// refusingTunnel is an agent that answers every stream with 502.
type refusingTunnel struct{ *fakeTunnel }

func (r refusingTunnel) RoundTrip(*http.Request) (*http.Response, error) {
	r.opened++
	return &http.Response{StatusCode: http.StatusBadGateway, Status: "502 Bad Gateway", Header: http.Header{},
		Body: io.NopCloser(strings.NewReader(""))}, nil
}

func TestRegistrySessionsPerCluster(t *testing.T) {
	r := newRegistry()
	_, err := r.add(fakeSession(t, "A", "1", "a"), 2)
	require.NoError(t, err)
	_, err = r.add(fakeSession(t, "A", "2", "a"), 2)
	require.NoError(t, err)
	assert.True(t, r.clusterFull("A", "3", 2))
	_, err = r.add(fakeSession(t, "A", "3", "a"), 2)
	assert.ErrorIs(t, err, errTooManySessions)
	assert.False(t, r.clusterFull("A", "1", 2), "a reconnect replaces")
	old, err := r.add(fakeSession(t, "A", "1", "a"), 2)
	require.NoError(t, err)
	require.NotNil(t, old)
	r.remove(old) // harmless
	assert.True(t, r.clusterFull("A", "3", 2))
	assert.False(t, r.clusterFull("B", "1", 2), "another cluster")
}

func TestRouteSet(t *testing.T) {
	rs := newRouteSet(map[string]tunnel.Mode{"b": tunnel.Terminate, "a": tunnel.Passthrough, "c": tunnel.Terminate})
	var labels []string
	for label := range rs.all() {
		labels = append(labels, label)
	}
	assert.Equal(t, []string{"a", "b", "c"}, labels, "every label, in order")
	m, ok := rs.mode("a")
	assert.True(t, ok)
	assert.Equal(t, tunnel.Passthrough, m)
	_, ok = rs.mode("d")
	assert.False(t, ok, "a label the set does not have")
	for range rs.all() {
		break // stopping early is safe
	}
}
