package procs

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// switches records what Run chose, and when.
type switches struct {
	mu  sync.Mutex
	one []bool
	at  []time.Time
}

func (s *switches) set(one bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.one, s.at = append(s.one, one), append(s.at, time.Now())
}

func (s *switches) get() ([]bool, []time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]bool(nil), s.one...), append([]time.Time(nil), s.at...)
}

// Run goes down to one processor only after Quiet at or below QuietMax,
// back up as soon as more is in flight, and leaves the default when it
// ends.
func TestRun(t *testing.T) {
	const quiet, sample = 50 * time.Millisecond, time.Millisecond
	var inFlight atomic.Int64
	inFlight.Store(5)
	var lastBusy atomic.Pointer[time.Time] // when a reading last found more than QuietMax
	read := func() int {
		n := int(inFlight.Load())
		if n > DefaultQuietMax {
			now := time.Now()
			lastBusy.Store(&now)
		}
		return n
	}
	sw := &switches{}
	stop := Start(context.Background(), Config{InFlight: read, Sample: sample, Quiet: quiet, set: sw.set})
	defer stop()

	// Busy from the start: nothing to change, however long it lasts.
	require.Never(t, func() bool { one, _ := sw.get(); return len(one) > 0 }, 3*quiet, time.Millisecond, "switched while busy")

	// QuietMax (2) in flight counts as quiet; one processor after Quiet.
	inFlight.Store(DefaultQuietMax)
	require.Eventually(t, func() bool { one, _ := sw.get(); return len(one) == 1 }, 5*time.Second, time.Millisecond)
	one, at := sw.get()
	assert.Equal(t, []bool{true}, one)
	assert.GreaterOrEqual(t, at[0].Sub(*lastBusy.Load()), quiet, "went to one processor before Quiet had passed")

	// More in flight: back to the default at the next samples, not after Quiet.
	up := time.Now()
	inFlight.Store(DefaultQuietMax + 1)
	require.Eventually(t, func() bool { one, _ := sw.get(); return len(one) == 2 }, 5*time.Second, time.Millisecond)
	one, at = sw.get()
	assert.Equal(t, []bool{true, false}, one)
	assert.Less(t, at[1].Sub(up), quiet, "back to the default only after Quiet")

	// Quiet again, then the program ends: it ends on the default.
	inFlight.Store(0)
	require.Eventually(t, func() bool { one, _ := sw.get(); return len(one) == 3 }, 5*time.Second, time.Millisecond)
	stop()
	one, _ = sw.get()
	assert.Equal(t, []bool{true, false, true, false}, one)
}

func TestEnabled(t *testing.T) {
	t.Setenv("GOMAXPROCS", "3")
	assert.False(t, Enabled(), "an operator's GOMAXPROCS wins")
}
