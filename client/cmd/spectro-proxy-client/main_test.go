package main

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestSetProcs: --procs sets GOMAXPROCS unless the environment does, 0
// keeps Go's default, and a negative count is refused by name.
func TestSetProcs(t *testing.T) {
	orig := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(orig) })
	const unchanged = 5 // what each case starts from, none sets it
	tests := []struct {
		name    string
		procs   int
		env     string
		want    int
		wantErr string
	}{
		{name: "one", procs: 1, want: 1},
		{name: "three", procs: 3, want: 3},
		{name: "Go's default", procs: 0, want: unchanged},
		{name: "the environment wins", procs: 1, env: "5", want: unchanged},
		{name: "negative", procs: -1, want: unchanged, wantErr: "--procs -1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			runtime.GOMAXPROCS(unchanged)
			t.Setenv("GOMAXPROCS", tc.env)
			err := setProcs(tc.procs)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
			} else {
				require.NoError(t, err)
			}
			assert.Equal(t, tc.want, runtime.GOMAXPROCS(0))
		})
	}
}
