package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
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
	// frp's first build on a machine downloads and compiles it (about a
	// minute); later ones find it cached.
	bctx, bcancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer bcancel()
	frp, err := BuildFRP(bctx, "")
	require.NoError(t, err, "building frp")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := Run(ctx, Options{
		FRP:  frp,
		Reps: 1, GetDuration: 100 * time.Millisecond, ListSize: 1 << 20,
		EachSingle: 1, EachParallel: 1, Parallel: 4,
		WatchRate: 1000, WatchEvents: 50,
		IdleTunnels: []int{5, 20},
		WANDelay:    5 * time.Millisecond, WANTransfers: 1,
		Dir:      t.TempDir(),
		Progress: func(s string) { t.Log(s) },
	})
	require.NoError(t, err)

	proxied := append(slices.Clone(floorAndProxyModes), ModeFRP)
	// /proc counts CPU in 10 ms ticks, and one 100 ms load here may use
	// less than a tick in the processes between (CI: passthrough HTTP/2
	// read 0). All of them together used many.
	var cpu float64
	for _, f := range figures {
		if cpuFigure(f.key) {
			// Not measured for direct: it has no process in between.
			assert.Empty(t, res.Values[f.key][ModeDirect], f.key)
			for _, mode := range proxied {
				if assert.Len(t, res.Values[f.key][mode], 1, "%s %s measured once", f.key, mode) {
					assert.GreaterOrEqual(t, res.Values[f.key][mode][0], 0.0, "%s %s", f.key, mode)
					cpu += res.Values[f.key][mode][0]
				}
			}
			continue
		}
		for _, mode := range append([]string{ModeDirect}, proxied...) {
			assert.Len(t, res.Values[f.key][mode], 1, "%s %s measured once", f.key, mode)
		}
	}
	// Direct, passthrough, terminate, the three floors and frp each
	// checked four ways, plus the first three over the long link.
	assert.Positive(t, cpu, "CPU read for the processes between client and backend")
	assert.Len(t, res.Checks, 7*4+3)
	assert.Len(t, res.Values["rss_load_frps"][""], 1, "frps's peak memory")
	vsFRP := res.AgainstFRP()
	assert.Len(t, vsFRP, len(figures)+1, "every figure and the peak memory against frp")
	require.Len(t, res.WAN, 3)
	require.Len(t, res.Idle.Points, 2)
	assert.Equal(t, 20, res.Idle.Points[1].Tunnels)

	var md bytes.Buffer
	require.NoError(t, res.WriteMarkdown(&md, "go test ./bench"))
	for _, want := range []string{"## Targets", "small GET p50, HTTP/1.1, 1 concurrent", "Relay memory with idle tunnels", "Long link", "| floor | floor+TLS |", "| floor+terminate |",
		"## Against frp", "| relay + agent CPU per small GET, HTTP/2, 64 concurrent | µs |", "| frps |"} {
		assert.Contains(t, md.String(), want)
	}
	if os.Getenv("BENCH_SMOKE_PRINT") != "" {
		fmt.Println(md.String())
	}
}
