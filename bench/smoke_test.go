package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestSmoke runs the whole benchmark in miniature through the real relay
// and agent binaries. It checks that every path completes and moves the
// bytes intact; it asserts no timings (CI machines are noisy).
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the relay and agent binaries")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := Run(ctx, Options{
		Reps: 1, GetDuration: 100 * time.Millisecond, ListSize: 1 << 20,
		EachSingle: 1, EachParallel: 1, Parallel: 4,
		WatchRate: 1000, WatchEvents: 50,
		IdleTunnels: []int{5, 20},
		WANDelay:    5 * time.Millisecond, WANTransfers: 1,
		Dir:      t.TempDir(),
		Progress: func(s string) { t.Log(s) },
	})
	require.NoError(t, err)

	for _, f := range figures {
		if f.key == "cpu_s_per_gib" {
			continue // not measured for direct; checked below
		}
		for _, mode := range []string{ModeDirect, ModePassthrough, ModeTerminate, ModeFloor, ModeFloorTLS, ModeFloorTerminate} {
			assert.Len(t, res.Values[f.key][mode], 1, "%s %s measured once", f.key, mode)
		}
	}
	for _, mode := range []string{ModePassthrough, ModeTerminate, ModeFloor, ModeFloorTLS, ModeFloorTerminate} {
		assert.Len(t, res.Values["cpu_s_per_gib"][mode], 1, "CPU per GiB for %s", mode)
	}
	// Direct, passthrough, terminate and the three floors each checked
	// four ways, plus the first three over the long link.
	assert.Len(t, res.Checks, 6*4+3)
	require.Len(t, res.WAN, 3)
	require.Len(t, res.Idle.Points, 2)
	assert.Equal(t, 20, res.Idle.Points[1].Tunnels)

	var md bytes.Buffer
	require.NoError(t, res.WriteMarkdown(&md, "go test ./bench"))
	for _, want := range []string{"## Targets", "small GET p50, HTTP/1.1, 1 concurrent", "Relay memory with idle tunnels", "Long link", "| floor | floor+TLS |", "| floor+terminate |"} {
		assert.Contains(t, md.String(), want)
	}
	if os.Getenv("BENCH_SMOKE_PRINT") != "" {
		fmt.Println(md.String())
	}
}
