package server

import (
	"fmt"
	"net"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type fakeCloser struct{ closed bool }

func (f *fakeCloser) Close() error { f.closed = true; return nil }

func TestHelloGate(t *testing.T) {
	type op struct {
		enter       bool // else leave the i-th entry
		src         string
		i           int
		want        bool   // enter's answer
		wantEvicted string // the source enter evicted
	}
	in := func(src string, want bool) op { return op{enter: true, src: src, want: want} }
	evict := func(src, victim string) op { return op{enter: true, src: src, want: true, wantEvicted: victim} }
	out := func(i int) op { return op{i: i} }
	tests := []struct {
		name            string
		total, perSrc   int
		ops             []op
		wantPending     int
		wantSourcesHeld int
		wantClosed      []int // entries closed by eviction
	}{
		{name: "admits up to the per-source cap", total: 10, perSrc: 2,
			ops:         []op{in("a", true), in("a", true), in("a", false), in("b", true)},
			wantPending: 3, wantSourcesHeld: 2},
		{name: "past the total, the oldest of the biggest source makes room", total: 3, perSrc: 3,
			ops:         []op{in("a", true), in("a", true), in("b", true), evict("c", "a")},
			wantPending: 3, wantSourcesHeld: 3, wantClosed: []int{0}},
		{name: "leaving frees a place", total: 1, perSrc: 1,
			ops:         []op{in("a", true), out(0), in("b", true)},
			wantPending: 1, wantSourcesHeld: 1},
		{name: "a source with nothing pending is forgotten", total: 4, perSrc: 2,
			ops:         []op{in("a", true), in("a", true), out(0), out(1)},
			wantPending: 0, wantSourcesHeld: 0},
		{name: "an evicted entry leaving changes nothing", total: 1, perSrc: 1,
			ops:         []op{in("a", true), evict("b", "a"), out(0)},
			wantPending: 1, wantSourcesHeld: 1, wantClosed: []int{0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g := newHelloGate(tc.total, tc.perSrc)
			var entries []*helloEntry
			var closers []*fakeCloser
			for i, o := range tc.ops {
				if !o.enter {
					g.leave(entries[o.i])
					continue
				}
				c := &fakeCloser{}
				e, evicted, ok := g.enter(o.src, c)
				assert.Equal(t, o.want, ok, "op %d: enter(%s)", i, o.src)
				assert.Equal(t, o.wantEvicted, evicted, "op %d: evicted", i)
				if ok {
					entries = append(entries, e)
					closers = append(closers, c)
				}
			}
			assert.Equal(t, tc.wantPending, g.total)
			assert.Len(t, g.perSource, tc.wantSourcesHeld)
			for i, c := range closers {
				assert.Equal(t, slices.Contains(tc.wantClosed, i), c.closed, "entry %d closed", i)
			}
		})
	}
}

// The failure limiter's windows, on synctest's fake clock: a source may
// fail burst times, then once per 1/perSecond.
func TestFailLimiterWindows(t *testing.T) {
	tests := []struct {
		name      string
		perSecond float64
		burst     int
		failures  int           // spent at once
		wait      time.Duration // then this passes
		blocked   bool          // and src is blocked or not
		retryIn   time.Duration // with this wait when blocked
	}{
		{name: "within the burst", perSecond: 0.2, burst: 10, failures: 9, blocked: false},
		{name: "burst spent", perSecond: 0.2, burst: 10, failures: 10, blocked: true, retryIn: 5 * time.Second},
		{name: "part of a window passed", perSecond: 0.2, burst: 10, failures: 10, wait: 2 * time.Second, blocked: true, retryIn: 3 * time.Second},
		{name: "one window passed", perSecond: 0.2, burst: 10, failures: 10, wait: 5 * time.Second, blocked: false},
		{name: "past the burst, failures keep it blocked", perSecond: 1, burst: 2, failures: 5, blocked: true, retryIn: time.Second},
		{name: "a faster rate", perSecond: 4, burst: 1, failures: 1, wait: 250 * time.Millisecond, blocked: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := newFailLimiter(tc.perSecond, tc.burst)
				blocked, _ := f.blocked("127.0.0.1")
				require.False(t, blocked, "a new source is not blocked")
				for range tc.failures {
					f.fail("127.0.0.1")
				}
				time.Sleep(tc.wait)
				blocked, retry := f.blocked("127.0.0.1")
				assert.Equal(t, tc.blocked, blocked)
				if tc.blocked {
					assert.InDelta(t, tc.retryIn.Seconds(), retry.Seconds(), 0.01, "retry in")
				}
				other, _ := f.blocked("127.0.0.2")
				assert.False(t, other, "another source is not affected")
			})
		})
	}
}

// Past maxFailSources, new sources share one limiter (memory stays
// bounded), and the sweep forgets sources whose budget has refilled.
func TestFailLimiterBoundedSources(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFailLimiter(1, 1)
		for i := range maxFailSources {
			f.fail(fmt.Sprintf("src%d", i))
		}
		assert.Len(t, f.sources, maxFailSources)
		f.fail("newcomer") // shares the overflow limiter
		assert.Len(t, f.sources, maxFailSources)
		blocked, _ := f.blocked("another newcomer")
		assert.True(t, blocked, "unknown sources in a flood share the overflow limiter's fate")

		time.Sleep(2 * time.Second) // every budget refills
		f.fail("late")              // the map is full: sweep, then remember it
		assert.Len(t, f.sources, 1, "refilled sources are forgotten")
		blocked, _ = f.blocked("src0")
		assert.False(t, blocked)
	})
}

func TestSourceOf(t *testing.T) {
	for _, tc := range []struct{ remote, want string }{
		{"192.0.2.7:443", "192.0.2.7"},
		{"[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:ffff::1]:9", "2001:db8:1:2::/64"},
		{"[::ffff:192.0.2.7]:443", "192.0.2.7"},
		{"127.0.0.1:443", "127.0.0.1"},
		{"[::1]:8443", "::/64"},
		{"not-a-hostport", "not-a-hostport"},
		{"192.0.2.7", "192.0.2.7"},
		{"192.000.2.7:443", "192.000.2.7"}, // not an address: as it came, as before
	} {
		assert.Equal(t, tc.want, sourceOf(tc.remote), tc.remote)
	}
	assert.Zero(t, testing.AllocsPerRun(100, func() { sourceOf("192.0.2.7:443") }), "an IPv4 source costs no allocation")
}

func TestSourceStreams(t *testing.T) {
	s := newSourceStreams(2)
	r1, ok := s.enter("a", "x")
	require.True(t, ok)
	_, ok = s.enter("a", "x")
	require.True(t, ok)
	_, ok = s.enter("a", "x")
	assert.False(t, ok, "third from one source")
	_, ok = s.enter("b", "x")
	assert.True(t, ok, "another source")
	_, ok = s.enter("a", "y")
	assert.True(t, ok, "another host name")
	r1()
	r1() // twice is once
	_, ok = s.enter("a", "x")
	assert.True(t, ok)
	_, ok = s.enter("a", "x")
	assert.False(t, ok)
}

func TestIdleConns(t *testing.T) {
	conns := pipeConns(t, 4)
	src := func(s string) func() string { return func() string { return s } }
	ic := newIdleConns(2)
	ic.add(conns[0], "10.0.0.1")
	ic.add(conns[1], "10.0.0.1")
	ic.add(conns[2], "10.0.0.1")

	assert.True(t, ic.enter(conns[0], src("unused")))
	assert.True(t, ic.enter(conns[0], src("unused")), "idle twice counts once")
	assert.True(t, ic.enter(conns[1], src("unused")))
	assert.False(t, ic.enter(conns[2], src("unused")), "a third idle connection of one source")
	assert.Equal(t, 2, ic.idleOf("10.0.0.1"))

	// Another source has its own count; a connection not added when it
	// opened is recorded under the source it gives.
	assert.True(t, ic.enter(conns[3], src("10.0.0.2")))
	assert.Equal(t, 1, ic.idleOf("10.0.0.2"))

	ic.leave(conns[0]) // busy again
	ic.leave(conns[0])
	assert.Equal(t, 1, ic.idleOf("10.0.0.1"))
	assert.True(t, ic.enter(conns[2], src("unused")), "room after one went busy")
	assert.False(t, ic.enter(conns[0], src("unused")))

	ic.remove(conns[1]) // closed while idle
	assert.Equal(t, 1, ic.idleOf("10.0.0.1"))
	assert.True(t, ic.enter(conns[0], src("unused")))

	for _, c := range conns {
		ic.remove(c)
		ic.remove(c)
	}
	assert.Empty(t, ic.conns, "closed connections are forgotten")
	assert.Empty(t, ic.srcs, "sources without connections are forgotten")
}

// A connection is fresh (counted in flight, for its TLS handshake) from
// its opening until it first goes busy, is hijacked or closes, and counts
// as fresh once whatever follows.
func TestIdleConnsFresh(t *testing.T) {
	conns := pipeConns(t, 4)
	ic := newIdleConns(2)
	assert.True(t, ic.add(conns[0], "10.0.0.1"))
	assert.False(t, ic.add(conns[0], "10.0.0.1"), "added twice")
	assert.True(t, ic.leave(conns[0]), "its first request")
	assert.False(t, ic.leave(conns[0]), "its second")
	assert.False(t, ic.remove(conns[0]), "closed after requests")

	assert.True(t, ic.add(conns[1], "10.0.0.1"))
	assert.True(t, ic.remove(conns[1]), "closed in its handshake")
	assert.False(t, ic.remove(conns[1]))

	assert.True(t, ic.add(conns[2], "10.0.0.1"))
	assert.True(t, ic.enter(conns[2], func() string { return "unused" }))
	assert.True(t, ic.leave(conns[2]), "idle does not end freshness; the first request does")

	assert.True(t, ic.enter(conns[3], func() string { return "10.0.0.2" }))
	assert.False(t, ic.leave(conns[3]), "not seen opening: never fresh")
}

// pipeConns returns n connections (one end of a net.Pipe each) for
// tables keyed by connection.
func pipeConns(t *testing.T, n int) []net.Conn {
	conns := make([]net.Conn, n)
	for i := range conns {
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		conns[i] = a
	}
	return conns
}
