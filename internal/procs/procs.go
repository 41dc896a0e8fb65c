// Package procs runs a program on one Go processor (GOMAXPROCS=1) while
// it has next to nothing in flight, and on Go's default number once it has
// more.
//
// A request through the relay is handed from goroutine to goroutine
// (frame readers, serve loops, handlers, copiers); with more than one
// processor, each hand-off with a processor idle wakes another thread,
// which then mostly finds nothing to do and sleeps again. One request at a
// time has nothing to run in parallel, so those wake-ups are pure cost: on
// one processor the relay's context switches per small GET fell from 8-10
// to 3 (terminate) and from 5 to 2.6 (passthrough), and its CPU per
// request by a quarter (docs/performance.md, ninth pass). Under load the
// other processors are what carries it, so the switch back is made within
// one sample of the load's start.
//
// The signal is the program's own count of work in flight (open streams
// and connections, the relay's TLS handshakes), not CPU use: a relay at
// one request at a time and one at 64 concurrent small requests use about
// the same CPU on a small machine, and only the latter gains from more
// processors.
package procs

import (
	"context"
	"log/slog"
	"os"
	"runtime"
	"time"
)

// FlagUsage is the flag's help text, the same in every program.
const FlagUsage = "Run on one Go processor while at most a couple of streams are open, on Go's default number (the CPUs, or the container's CPU limit) otherwise: one request at a time costs fewer thread wake-ups. A GOMAXPROCS environment variable turns this off."

// Defaults of Config.
const (
	DefaultSample   = 10 * time.Millisecond
	DefaultQuiet    = time.Second
	DefaultQuietMax = 2
)

// Config is what Run adapts to.
type Config struct {
	// InFlight reports the work in flight now (open streams, connections).
	InFlight func() int
	// Sample is how often InFlight is read.
	Sample time.Duration
	// Quiet is how long InFlight must stay at or below QuietMax before
	// the program goes down to one processor.
	Quiet    time.Duration
	QuietMax int
	Logger   *slog.Logger

	// set applies the choice (nil: the runtime's); for tests.
	set func(one bool)
}

// Enabled reports whether Run would change anything here: more than one
// processor by default, and no GOMAXPROCS set by the operator.
func Enabled() bool {
	return os.Getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) > 1
}

// Start runs Run in a goroutine of its own until ctx ends or stop is
// called; stop returns once it has left Go's default.
func Start(ctx context.Context, c Config) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); Run(ctx, c) }()
	return func() { cancel(); <-done }
}

// Run adapts the processors until ctx ends, and leaves Go's default.
// It returns at once when the operator set GOMAXPROCS or the default is one.
func Run(ctx context.Context, c Config) {
	if c.set == nil {
		if !Enabled() {
			return
		}
		c.set = func(one bool) {
			if one {
				runtime.GOMAXPROCS(1)
			} else {
				runtime.SetDefaultGOMAXPROCS()
			}
		}
	}
	if c.Sample <= 0 {
		c.Sample = DefaultSample
	}
	if c.Quiet <= 0 {
		c.Quiet = DefaultQuiet
	}
	if c.QuietMax <= 0 {
		c.QuietMax = DefaultQuietMax
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	tick := time.NewTicker(c.Sample)
	defer tick.Stop()
	one, busyAt := false, time.Now()
	defer func() {
		if one {
			c.set(false)
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			// Now, not the tick's time: a tick can wait, and Quiet is
			// counted from the last reading that was busy.
			n, now := c.InFlight(), time.Now()
			switch {
			case n > c.QuietMax:
				busyAt = now
				if one {
					one = false
					c.set(false)
					c.Logger.Debug("go processors back to the default", "in_flight", n)
				}
			case !one && now.Sub(busyAt) >= c.Quiet:
				one = true
				c.set(true)
				c.Logger.Debug("one go processor while quiet", "in_flight", n)
			}
		}
	}
}
