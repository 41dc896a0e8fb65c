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

// TestProcFields: integer fields of /proc/<pid>/io and status are read by
// name, and the rest (names, lists) left out.
func TestProcFields(t *testing.T) {
	io, err := procFields("/proc/self/io")
	require.NoError(t, err)
	assert.Contains(t, io, "syscr")
	assert.Contains(t, io, "syscw")
	st, err := procFields("/proc/self/status")
	require.NoError(t, err)
	assert.Contains(t, st, "voluntary_ctxt_switches")
	assert.NotContains(t, st, "Name", "a name is not a number")
	_, err = procFields("/proc/self/no-such-file")
	require.Error(t, err)
}
