package bench

import (
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestContextSwitches: the count covers the process's threads and grows
// when one of them sleeps; a process that is gone is an error naming it.
func TestContextSwitches(t *testing.T) {
	before, err := contextSwitches(os.Getpid())
	require.NoError(t, err)
	for range 10 {
		time.Sleep(time.Millisecond) // parks this goroutine's thread: a voluntary switch
	}
	after, err := contextSwitches(os.Getpid())
	require.NoError(t, err)
	assert.GreaterOrEqual(t, after-before, int64(10), "10 sleeps are at least 10 switches")

	_, err = contextSwitches(1 << 30) // above any pid_max
	require.Error(t, err)
	assert.Contains(t, err.Error(), "1073741824")
}
