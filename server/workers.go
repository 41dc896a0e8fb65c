package server

import (
	"fmt"
	"net/http"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// workers run HTTP/2 requests' proxying on goroutines that outlive the
// request.
//
// net/http runs each HTTP/2 request in a new goroutine, whose stack starts
// small and must grow to what proxying a request needs. A grown stack is
// given back when its goroutine ends, and at 64 concurrent requests the
// runtime hands the spans they came from back to the heap and takes new
// ones for the next requests: that growth was 5-7% of the relay's CPU per
// small HTTP/2 request even done in one step (growStack;
// docs/performance.md, tenth pass). A worker keeps its stack from one
// request to the next (the GC shrinks it when it stays idle), and costs a
// hand-off to it and back. Workers idle for a second or two end.
type workers struct {
	jobs chan *job
	stop <-chan struct{} // idle workers end when it closes
	max  int32           // more requests at once run on their own goroutine
	n    atomic.Int32
	wg   sync.WaitGroup
	// tick is closed and replaced every idleTick: a worker that saw two
	// ticks go by without a job ends, so a burst's workers do not
	// outlive it by more than two ticks.
	tick atomic.Pointer[chan struct{}]
}

// idleTick is the period of workers' idle check.
const idleTick = time.Second

type job struct {
	f    func()
	done chan any // what f panicked with, or nil
}

var jobs = sync.Pool{New: func() any { return &job{done: make(chan any, 1)} }}

// maxWorkers bounds the workers: enough for a busy relay's concurrent
// HTTP/2 requests, each idle one a few KiB once the GC has shrunk its
// stack.
const maxWorkers = 256

func newWorkers(max int32, stop <-chan struct{}, tick time.Duration) *workers {
	p := &workers{jobs: make(chan *job), stop: stop, max: max}
	ch := make(chan struct{})
	p.tick.Store(&ch)
	p.wg.Add(1)
	go p.ticks(tick)
	return p
}

// ticks closes and replaces tick every period until stop.
func (p *workers) ticks(period time.Duration) {
	defer p.wg.Done()
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		ch := make(chan struct{})
		close(*p.tick.Swap(&ch))
	}
}

// run calls f on a worker and returns when f has: an idle worker takes
// it, or a new one while there are fewer than max, or else the caller
// runs it. A panic in f is the caller's panic (net/http's
// http.ErrAbortHandler must reach the server from the handler's own
// goroutine).
func (p *workers) run(f func()) {
	if p == nil {
		f()
		return
	}
	j := jobs.Get().(*job)
	j.f = f
	select {
	case p.jobs <- j:
	default:
		if p.n.Add(1) > p.max {
			p.n.Add(-1)
			j.f = nil
			jobs.Put(j)
			growStack()
			f()
			return
		}
		p.wg.Add(1)
		go p.work(j)
	}
	v := <-j.done
	j.f = nil
	jobs.Put(j)
	if v != nil {
		panic(v)
	}
}

// work runs j, then the jobs it is given, until stop or until it has
// been idle for two ticks.
func (p *workers) work(j *job) {
	defer p.wg.Done()
	defer p.n.Add(-1)
	for {
		j.done <- do(j.f)
		j = nil
		for ticks := 0; j == nil; {
			select {
			case j = <-p.jobs:
			case <-p.stop:
				return
			case <-*p.tick.Load():
				if ticks++; ticks == 2 {
					return
				}
			}
		}
	}
}

// do calls f and returns what it panicked with. A panic other than
// net/http's abort carries the worker's stack, which the caller's
// re-panic would otherwise lose.
func do(f func()) (v any) {
	defer func() {
		if r := recover(); r != nil {
			v = r
			if r != http.ErrAbortHandler { // compared as net/http compares it
				v = fmt.Sprintf("%v\n\nworker goroutine:\n%s", r, debug.Stack())
			}
		}
	}()
	f()
	return nil
}

// wait waits for the workers to end, once stop has closed and their jobs
// are done.
func (p *workers) wait() { p.wg.Wait() }
