package server

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recovered runs f on p and returns what the caller's run panicked with.
func recovered(p *workers, f func()) (v any) {
	defer func() { v = recover() }()
	p.run(f)
	return nil
}

// runAtOnce runs n jobs on p at the same time (n workers), returns how
// many workers there were while all n ran, and returns once all n are
// done.
func runAtOnce(p *workers, n int) int32 {
	release := make(chan struct{})
	done := make(chan struct{}, n)
	for range n {
		started := make(chan struct{})
		go func() {
			p.run(func() { close(started); <-release })
			done <- struct{}{}
		}()
		<-started
	}
	busy := p.n.Load()
	close(release)
	for range n {
		<-done
	}
	return busy
}

func TestWorkers(t *testing.T) {
	t.Run("one worker serves requests one after another", func(t *testing.T) {
		stop := make(chan struct{})
		p := newWorkers(4, stop, time.Hour)
		for i := range 10 {
			ran := false
			p.run(func() { ran = true })
			assert.True(t, ran, "run %d returned before its function ran", i)
		}
		assert.EqualValues(t, 1, p.n.Load(), "workers made")
		close(stop)
		p.wait()
		assert.EqualValues(t, 0, p.n.Load())
	})

	t.Run("past max the caller runs it", func(t *testing.T) {
		stop := make(chan struct{})
		p := newWorkers(1, stop, time.Hour)
		release, started, firstDone := make(chan struct{}), make(chan struct{}), make(chan struct{})
		go func() {
			defer close(firstDone)
			p.run(func() { close(started); <-release })
		}()
		<-started
		ran := false
		p.run(func() { ran = true }) // the one worker is busy
		assert.True(t, ran)
		assert.EqualValues(t, 1, p.n.Load(), "no second worker")
		close(release)
		<-firstDone
		close(stop)
		p.wait()
	})

	t.Run("panics are the caller's", func(t *testing.T) {
		stop := make(chan struct{})
		p := newWorkers(4, stop, time.Hour)
		v := recovered(p, func() { panic(http.ErrAbortHandler) })
		assert.Equal(t, http.ErrAbortHandler, v, "net/http's abort reaches the handler as it is")
		v = recovered(p, func() { panic(errors.New("boom")) })
		require.IsType(t, "", v)
		assert.Contains(t, v, "boom")
		assert.Contains(t, v, "worker goroutine:", "the worker's stack comes along")
		ran := false
		p.run(func() { ran = true })
		assert.True(t, ran, "the worker lives on after a panic")
		assert.EqualValues(t, 1, p.n.Load())
		close(stop)
		p.wait()
	})

	t.Run("idle workers end at stop", func(t *testing.T) {
		stop := make(chan struct{})
		p := newWorkers(8, stop, time.Hour)
		assert.EqualValues(t, 3, runAtOnce(p, 3))
		close(stop)
		waited := make(chan struct{})
		go func() { p.wait(); close(waited) }()
		select {
		case <-waited:
		case <-time.After(10 * time.Second):
			t.Fatalf("workers still running: %d", p.n.Load())
		}
	})

	t.Run("idle workers end after two ticks", func(t *testing.T) {
		stop := make(chan struct{})
		defer close(stop)
		p := newWorkers(8, stop, 20*time.Millisecond)
		runAtOnce(p, 3)
		require.Eventually(t, func() bool { return p.n.Load() == 0 }, 10*time.Second, 5*time.Millisecond,
			"idle workers left: %d", p.n.Load())
		ran := false
		p.run(func() { ran = true }) // a new one comes when needed
		assert.True(t, ran)
	})

	t.Run("no pool runs inline", func(t *testing.T) {
		var p *workers
		ran := false
		p.run(func() { ran = true })
		assert.True(t, ran)
	})
}
