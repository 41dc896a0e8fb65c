package testcluster

import (
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStartFailuresWorthARetry: a start is retried only for the failures
// a second start can fix (a port taken meanwhile, kwok's start-up map
// race), not for any exit.
func TestStartFailuresWorthARetry(t *testing.T) {
	tests := []struct {
		name            string
		script          string
		portInUse, race bool
	}{
		{"port taken", "echo 'listen tcp 127.0.0.1:9: bind: address already in use' >&2; exit 1", true, false},
		{"map race", "echo 'fatal error: concurrent map writes' >&2; echo 'goroutine 1 [running]:' >&2; exit 2", false, true},
		{"other failure", "echo 'failed to install crd' >&2; exit 1", false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p, err := startProcess("sh", "sh", []string{"-c", tc.script}, dir, filepath.Join(dir, "sh.log"), nil, slog.New(slog.DiscardHandler), nil)
			require.NoError(t, err)
			require.Eventually(t, func() bool { return p.exited() != nil }, 10*time.Second, 10*time.Millisecond)
			assert.Equal(t, tc.portInUse, p.portInUse(), "portInUse")
			assert.Equal(t, tc.race, p.raceAtStart(), "raceAtStart")
		})
	}
}
