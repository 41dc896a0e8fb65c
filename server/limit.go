package server

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// helloGate bounds the connections still sending their ClientHello, in
// total and per source address. Peeking costs a goroutine and a 16 KiB
// buffer for up to HelloTimeout, so without a cap a slowloris holding
// sockets open without a word could grow the relay without bound; the
// per-source cap keeps one address from using up the total. When the
// total is reached anyway (many sources: one IPv6 /64 is many addresses,
// though sourceOf counts it as one), a new connection is not refused:
// the oldest pending hello of the source holding the most is closed to
// make room, so a flood degrades itself rather than locking everyone out.
type helloGate struct {
	mu        sync.Mutex
	total     int
	perSource map[string][]*helloEntry // oldest first
	maxTotal  int
	maxSource int
}

// helloEntry is one admitted connection.
type helloEntry struct {
	src     string
	c       io.Closer
	evicted bool
}

func newHelloGate(maxTotal, maxSource int) *helloGate {
	return &helloGate{perSource: map[string][]*helloEntry{}, maxTotal: maxTotal, maxSource: maxSource}
}

// enter admits c from src, or says no at once (src has its share). To
// admit it past the total it closes another connection's hello and
// reports that one's source as evicted ("" when none was).
func (g *helloGate) enter(src string, c io.Closer) (e *helloEntry, evicted string, ok bool) {
	g.mu.Lock()
	if len(g.perSource[src]) >= g.maxSource {
		g.mu.Unlock()
		return nil, "", false
	}
	var victim *helloEntry
	if g.total >= g.maxTotal {
		victim = g.evictLocked()
		if victim == nil {
			g.mu.Unlock()
			return nil, "", false
		}
	}
	e = &helloEntry{src: src, c: c}
	g.perSource[src] = append(g.perSource[src], e)
	g.total++
	g.mu.Unlock()
	if victim != nil {
		victim.c.Close()
		return e, victim.src, true
	}
	return e, "", true
}

// evictLocked takes the oldest entry of the source with the most pending.
func (g *helloGate) evictLocked() *helloEntry {
	var most string
	for src, list := range g.perSource {
		if len(list) > len(g.perSource[most]) {
			most = src
		}
	}
	list := g.perSource[most]
	if len(list) == 0 {
		return nil
	}
	v := list[0]
	v.evicted = true
	g.removeLocked(v)
	return v
}

// leave ends an admission (nothing if it was evicted); the map only holds
// sources with hellos pending, so it is bounded by maxTotal.
func (g *helloGate) leave(e *helloEntry) (wasEvicted bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if e.evicted {
		return true
	}
	g.removeLocked(e)
	return false
}

func (g *helloGate) removeLocked(e *helloEntry) {
	list := g.perSource[e.src]
	for i, x := range list {
		if x == e {
			list = append(list[:i:i], list[i+1:]...)
			g.total--
			break
		}
	}
	if len(list) == 0 {
		delete(g.perSource, e.src)
	} else {
		g.perSource[e.src] = list
	}
}

// maxFailSources bounds the sources failLimiter remembers. Past it, new
// sources share one limiter: a flood from many addresses then slows itself
// without growing the relay's memory.
const maxFailSources = 10000

// failLimiter rate-limits failed tunnel registrations (bad or foreign
// tokens, labels a token does not allow, malformed headers) per source
// address. Only failures spend the budget, so a healthy agent behind the
// same address is untouched unless its neighbour keeps failing.
type failLimiter struct {
	every time.Duration
	burst int

	mu       sync.Mutex
	sources  map[string]*rate.Limiter
	overflow *rate.Limiter
	swept    time.Time
}

func newFailLimiter(perSecond float64, burst int) *failLimiter {
	return &failLimiter{
		every:    time.Duration(float64(time.Second) / perSecond),
		burst:    burst,
		sources:  map[string]*rate.Limiter{},
		overflow: rate.NewLimiter(rate.Limit(perSecond), burst),
	}
}

func (f *failLimiter) limiter(src string, create bool) *rate.Limiter {
	if l, ok := f.sources[src]; ok {
		return l
	}
	if !create {
		if len(f.sources) >= maxFailSources {
			return f.overflow // an unknown source in a flood shares its fate
		}
		return nil
	}
	if len(f.sources) >= maxFailSources {
		f.sweep()
	}
	if len(f.sources) >= maxFailSources {
		return f.overflow
	}
	l := rate.NewLimiter(rate.Every(f.every), f.burst)
	f.sources[src] = l
	return l
}

// sweep forgets sources whose budget has refilled: they are back where a
// new source starts. At most once a second, so a full map costs little.
func (f *failLimiter) sweep() {
	now := time.Now()
	if now.Sub(f.swept) < time.Second {
		return
	}
	f.swept = now
	for src, l := range f.sources {
		if l.TokensAt(now) >= float64(f.burst) {
			delete(f.sources, src)
		}
	}
}

// blocked reports whether src has no failures left to spend, and when it
// may try again.
func (f *failLimiter) blocked(src string) (bool, time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.limiter(src, false)
	if l == nil {
		return false, 0
	}
	now := time.Now()
	tokens := l.TokensAt(now)
	if tokens >= 1 {
		return false, 0
	}
	return true, time.Duration((1 - tokens) * float64(f.every))
}

// fail spends one of src's failures.
func (f *failLimiter) fail(src string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.limiter(src, true).Allow()
}

// sourceOf is the unit per-source limits count: the address of a remote
// address, or for IPv6 its /64 (one subscriber's usual allocation, so one
// attacker holds a whole /64 of addresses).
func sourceOf(remote string) string {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	if addr.Is4() {
		// An IPv4 address that parses has one spelling (leading zeros
		// are refused): the host as it came, without formatting it anew
		// on every request, which was 5% of a terminate-mode request's
		// allocations in the relay.
		return host
	}
	addr = addr.Unmap()
	if addr.Is6() {
		p, _ := addr.Prefix(64)
		return p.String()
	}
	return addr.String()
}

// sourceStreams counts the streams each source has open to each host
// name, up to a cap.
type sourceStreams struct {
	mu  sync.Mutex
	n   map[[2]string]int
	max int
}

func newSourceStreams(max int) *sourceStreams {
	return &sourceStreams{n: map[[2]string]int{}, max: max}
}

// enter takes a stream for src to label; release gives it back (once).
func (s *sourceStreams) enter(src, label string) (release func(), ok bool) {
	k := [2]string{src, label}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.n[k] >= s.max {
		return nil, false
	}
	s.n[k]++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.n[k]--; s.n[k] <= 0 {
				delete(s.n, k)
			}
		})
	}, true
}

// idleConns counts the idle keep-alive connections (HTTP/1 between
// requests, HTTP/2 without streams) each source holds on the relay's
// terminated side; past the cap the connection that just went idle is
// closed, which a client takes as an ordinary keep-alive close. Busy
// connections and hijacked ones (tunnels, upgrades) are not counted.
//
// A connection is recorded once, when it opens (add), with its source:
// going idle and busy again happens twice per HTTP/1 request, and
// formatting the remote address and moving the connection between maps
// each time was 3% of the relay's CPU for terminate-mode small GETs at 64
// concurrent (docs/performance.md, eighth pass).
type idleConns struct {
	mu    sync.Mutex
	conns map[net.Conn]*idleConn
	srcs  map[string]*idleSource
	max   int
}

// idleConn is one open connection.
type idleConn struct {
	src  *idleSource
	idle bool
	// fresh: added when it opened and not yet active, hijacked or
	// closed, which for a TLS connection is its handshake.
	fresh bool
}

// idleSource is one source's open connections: all, and the idle ones.
type idleSource struct {
	key        string
	open, idle int
}

func newIdleConns(max int) *idleConns {
	return &idleConns{conns: map[net.Conn]*idleConn{}, srcs: map[string]*idleSource{}, max: max}
}

// add records c, a new connection from src, as fresh, and reports
// whether it was new here.
func (ic *idleConns) add(c net.Conn, src string) bool {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	if ic.conns[c] != nil {
		return false
	}
	ic.addLocked(c, src).fresh = true
	return true
}

func (ic *idleConns) addLocked(c net.Conn, src string) *idleConn {
	if r := ic.conns[c]; r != nil {
		return r
	}
	s := ic.srcs[src]
	if s == nil {
		s = &idleSource{key: src}
		ic.srcs[src] = s
	}
	s.open++
	r := &idleConn{src: s}
	ic.conns[c] = r
	return r
}

// enter marks c idle and reports whether its source may keep it so. src
// is asked for only if c was not added when it opened.
func (ic *idleConns) enter(c net.Conn, src func() string) bool {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	r := ic.conns[c]
	if r == nil {
		r = ic.addLocked(c, src())
	}
	if r.idle {
		return true
	}
	if r.src.idle >= ic.max {
		return false
	}
	r.src.idle++
	r.idle = true
	return true
}

// leave marks c busy, and reports whether it was fresh until now.
func (ic *idleConns) leave(c net.Conn) (wasFresh bool) {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	r := ic.conns[c]
	if r == nil {
		return false
	}
	if r.idle {
		r.idle = false
		r.src.idle--
	}
	wasFresh, r.fresh = r.fresh, false
	return wasFresh
}

// remove forgets c (it was hijacked or closed), and reports whether it
// was still fresh.
func (ic *idleConns) remove(c net.Conn) (wasFresh bool) {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	r := ic.conns[c]
	if r == nil {
		return false
	}
	delete(ic.conns, c)
	if r.idle {
		r.src.idle--
	}
	if r.src.open--; r.src.open == 0 {
		delete(ic.srcs, r.src.key)
	}
	return r.fresh
}

// idleOf is how many idle connections src holds (for tests).
func (ic *idleConns) idleOf(src string) int {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	if s := ic.srcs[src]; s != nil {
		return s.idle
	}
	return 0
}
