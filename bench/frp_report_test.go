package bench

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAgainstFRP(t *testing.T) {
	r := &Results{Values: map[string]map[string][]float64{}}
	set := func(key, mode string, v ...float64) { r.add(key, mode, v[0]); r.Values[key][mode] = v }
	// Latency: lower is better. Passthrough 300 against frp's 600 is 2×
	// better; terminate at 800 is 0.75×, below the bar.
	set("get_h1_c1_p50", ModeFRP, 600, 500, 700)
	set("get_h1_c1_p50", ModePassthrough, 300, 310, 290)
	set("get_h1_c1_p50", ModeTerminate, 800)
	// Rate: higher is better. Passthrough behind, terminate exactly at the bar.
	set("get_h2_c64_rps", ModeFRP, 10000)
	set("get_h2_c64_rps", ModePassthrough, 9000)
	set("get_h2_c64_rps", ModeTerminate, 8000)
	// Bulk has no bar for terminate.
	set("dl_1_mibps", ModeFRP, 200)
	set("dl_1_mibps", ModePassthrough, 400)
	set("dl_1_mibps", ModeTerminate, 100)
	// Not measured for frp: left out.
	set("watch_p99", ModePassthrough, 700)
	r.add("rss_load_frps", "", 100<<20)
	r.add("rss_load_relay", "", 50<<20)

	got := map[string]FRPComparison{}
	for _, c := range r.AgainstFRP() {
		got[c.Key] = c
	}
	require.Len(t, got, 4)
	assert.NotContains(t, got, "watch_p99")

	lat := got["get_h1_c1_p50"]
	assert.Equal(t, 600.0, lat.FRP, "the median of frp's repetitions")
	assert.InDelta(t, 2.0, lat.PassthroughX, 1e-9)
	assert.InDelta(t, 0.75, lat.TerminateX, 1e-9)
	assert.True(t, lat.Small)
	assert.True(t, lat.PassthroughAhead())
	assert.False(t, lat.TerminateMet())

	rate := got["get_h2_c64_rps"]
	assert.InDelta(t, 0.9, rate.PassthroughX, 1e-9)
	assert.False(t, rate.PassthroughAhead())
	assert.True(t, rate.TerminateMet(), "0.8× is the bar itself")

	bulk := got["dl_1_mibps"]
	assert.False(t, bulk.Small)
	assert.True(t, bulk.TerminateMet(), "no bar for terminate on bulk")
	assert.InDelta(t, 2.0, bulk.PassthroughX, 1e-9)

	mem := got["rss_load"]
	assert.InDelta(t, 2.0, mem.PassthroughX, 1e-9, "the relay's peak at half frps's")
	assert.Equal(t, 100.0, mem.FRP)

	var b strings.Builder
	r.writeFRP(&b)
	assert.Contains(t, b.String(), "| small GET p50, HTTP/1.1, 1 concurrent | µs | 600 (500–700) | 300 (290–310) | 2.00 | yes | 800 | 0.75 | ≥ 0.8×: **not met** |")
	assert.Contains(t, b.String(), "| small GET req/s, HTTP/2, 64 concurrent | req/s | 10000 | 9000 | 0.90 | **no** | 8000 | 0.80 | ≥ 0.8×: met |")
	assert.Contains(t, b.String(), "| relay (frps) RSS peak under load | MiB | 100 | 50.0 | 2.00 | yes | 50.0 | 2.00 |  |")
}

func TestAgainstFRPWithoutFRP(t *testing.T) {
	r := &Results{Values: map[string]map[string][]float64{}}
	r.add("get_h1_c1_p50", ModePassthrough, 300)
	assert.Empty(t, r.AgainstFRP())
	var b strings.Builder
	r.writeFRP(&b)
	assert.Empty(t, b.String(), "no section when frp was not measured")
}
