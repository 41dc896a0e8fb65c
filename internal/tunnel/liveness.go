package tunnel

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// How a tunnel notices a dead peer, on either side: HTTP/2 pings once
// HTTP/2 runs (ReadIdleTimeout and PingTimeout of x/net's server and
// transport), WebSocket pings before (AwaitData). One heartbeat at a time.

// Liveness is how a tunnel notices a dead peer: after ReadIdle without a
// frame it sends a ping and gives up if no answer comes within Ping.
type Liveness struct {
	ReadIdle time.Duration
	Ping     time.Duration
}

// Defaults of Liveness, the one place they are written (the relay's and
// the agent's flags and configs take them from here).
const (
	DefaultReadIdle = 5 * time.Second
	DefaultPing     = 5 * time.Second
)

// DefaultLiveness detects a dead tunnel within 10 s, inside the 15 s promise.
var DefaultLiveness = Liveness{ReadIdle: DefaultReadIdle, Ping: DefaultPing}

// WithDefaults returns l with each zero field set to its default.
func (l Liveness) WithDefaults() Liveness {
	if l.ReadIdle == 0 {
		l.ReadIdle = DefaultReadIdle
	}
	if l.Ping == 0 {
		l.Ping = DefaultPing
	}
	return l
}

// AwaitData blocks until the peer's first data message has arrived (Read
// then returns it) and keeps the quiet connection honest meanwhile: a
// WebSocket ping every live.ReadIdle, and Close if its pong does not come
// within live.Ping. It returns at once if Read has already run. It lets a
// tunnel idle before either side starts HTTP/2, whose buffers, framer and
// read loop are most of what an idle tunnel would cost the relay. The
// error is why the connection ended; Close has been called.
func (c *Conn) AwaitData(ctx context.Context, live Liveness) error {
	if ctx.Done() != nil { // the relay's lazy client passes Background: nothing to hold per tunnel
		stop := context.AfterFunc(ctx, func() { c.Close() })
		defer stop()
	}
	c.readMu.Lock()
	defer c.readMu.Unlock()
	if c.reading || c.r != nil {
		return nil // HTTP/2 owns the connection, and its pings watch it
	}
	p := c.startPinger(live)
	defer p.stop()
	if err := c.nextMessage(); err != nil {
		c.Close()
		return c.ReadErr() // the cause (a ping timeout), not its effect
	}
	return nil
}

// pinger sends AwaitData's pings from a timer, so a waiting tunnel costs
// no goroutine beyond the one blocked reading.
type pinger struct {
	c        *Conn
	live     Liveness
	mu       sync.Mutex
	t        *time.Timer
	awaiting bool   // a ping is out; the timer next checks for its pong
	pongs    uint64 // c.pongs when it was sent
	stopped  bool
}

func (c *Conn) startPinger(live Liveness) *pinger {
	p := &pinger{c: c, live: live}
	if live.Ping <= 0 {
		p.live.Ping = 15 * time.Second // as x/net's PingTimeout
	}
	if live.ReadIdle > 0 { // 0 turns pings off, as with HTTP/2
		p.t = time.AfterFunc(live.ReadIdle, p.fire)
	}
	return p
}

func (p *pinger) fire() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	if p.awaiting {
		if p.c.pongs.Load() == p.pongs {
			p.c.readFailed(errPingTimeout)
			p.c.Close()
			return
		}
		p.awaiting = false
		p.t.Reset(p.live.ReadIdle)
		return
	}
	p.pongs = p.c.pongs.Load()
	if err := p.c.ws.WriteControl(websocket.PingMessage, nil, time.Now().Add(p.live.Ping)); err != nil {
		p.c.readFailed(fmt.Errorf("sending websocket ping: %w", err))
		p.c.Close()
		return
	}
	p.awaiting = true
	p.t.Reset(p.live.Ping)
}

func (p *pinger) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopped = true
	if p.t != nil {
		p.t.Stop()
	}
}

// errPingTimeout ends a tunnel whose peer stopped answering pings.
var errPingTimeout = errors.New("tunnel: no answer to websocket ping")

// HTTP/2 settings both roles share.

// Flow-control windows. The HTTP/2 defaults (64 KiB per stream on the
// server side, 1 MiB per connection) cap a single stream at window/RTT, which
// is what makes other multiplexing tunnels crawl on long links. A stream's
// window is also what a client that stops reading pins in memory (with its
// copy buffers) and takes from its tunnel's window, until the write-stall
// timeout cuts it. One source may hold MaxStreamsPerSource streams (32 by
// default) and issue 11 bounds what one source may pin at 64 MiB: 32
// never-reading streams held 80 MiB at 2 MiB windows and 256 KiB copy
// buffers, and hold about 32 MiB at 1 MiB and 128 KiB
// (TestAbuseClientsThatNeverRead). 1 MiB still carries a stream at
// 20 MiB/s on a 50 ms link, 50 on a 20 ms one; a connection's streams
// share the tunnel's window, 256 MiB of downloads (relayConnWindow) and
// 128 MiB of uploads (agent side).
const (
	streamWindow = 1 << 20
	connWindow   = 128 << 20
	// frameSize is the largest DATA frame the relay accepts (downloads).
	// Bigger frames mean fewer WebSocket messages and fewer syscalls per
	// byte.
	frameSize = 256 << 10
	// uploadFrameSize is the largest DATA frame the agent accepts
	// (uploads). x/net's client holds a scratch buffer of the peer's frame
	// size for as long as a request body is open, and on the relay that is
	// every passthrough connection and every exec, attach and port-forward
	// for its whole life, idle or not: 256 KiB each at frameSize. 64 KiB
	// frames moved uploads no more than the noise (make bench, bulk, 3
	// repetitions A/B: passthrough 1 stream 344 against 341 MiB/s,
	// terminate 229 against 246); 16 KiB frames cost a quarter of them.
	uploadFrameSize = 64 << 10
)
