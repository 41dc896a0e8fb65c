package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

func TestSpliceScale(t *testing.T) {
	res := &Results{Scale: &ScaleResult{Tunnels: 10000, Replicas: []ScaleReplica{{ID: "r1", Held: 3334, PerTunnel: 20 << 10}},
		Killed: "r1", KilledHeld: 3334, Registered: 12 * time.Second}}
	var sec strings.Builder
	res.Scale.writeMarkdown(&sec)
	full := "# Benchmark results\n\n## Targets\n\n| figure | mode | target | measured | met | floor | with this mode's TLS |\n|---|---|---|---|---|---|---|\n" +
		"| small GET | passthrough | ≤ 1.60× | 2.00× | **no** | | |\n\nWhat the proxy adds.\n\n## Long link\n\ntext\n\n## Integrity checks\n\n- ok\n"
	tests := []struct {
		name string
		old  string
	}{
		{"no file yet", ""},
		{"a full run's file without the scale case", full},
		{"a file with an older scale case", string(SpliceScale([]byte(full), &Results{Scale: &ScaleResult{Tunnels: 10000,
			Replicas: []ScaleReplica{{ID: "r1", PerTunnel: 40 << 10}}, Registered: 90 * time.Second}}))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := string(SpliceScale([]byte(tc.old), res))
			assert.Equal(t, 1, strings.Count(got, "## Scale-out"), got)
			assert.Contains(t, got, strings.TrimPrefix(sec.String(), "\n"))
			assert.Equal(t, 2, strings.Count(got, "\n| relay RSS per idle tunnel, "),
				"one row for r1 in the Targets table, one in the section:\n%s", got)
			assert.NotContains(t, got, "40.00", "the older figures are gone")
			if tc.old != "" {
				assert.Contains(t, got, "| small GET | passthrough |", "the rest of the file is kept")
				assert.Contains(t, got, "## Long link\n\ntext\n\n## Scale-out", "the section goes before the integrity checks")
				assert.Contains(t, got, "\n## Integrity checks\n\n- ok\n")
				targets := got[strings.Index(got, "## Targets"):strings.Index(got, "What the proxy adds")]
				assert.Contains(t, targets, "| relay RSS per idle tunnel, 10000 tunnels over 1 replicas on etcd (KiB) | r1 | ≤ 32 KiB | 20.00 | met | | | |")
			}
		})
	}
}

// TestSmokeScale runs the scale case in miniature: three relay processes on
// a real etcd, a few idle tunnels, one replica killed. No timings asserted.
func TestSmokeScale(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the relay binary and etcd")
	}
	if err := testcluster.CheckBinaries("", false); err != nil {
		t.Skipf("no cached etcd: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bins, err := Build(ctx, dir)
	require.NoError(t, err)
	if help, _ := exec.Command(bins.Relay, "--help").CombinedOutput(); !strings.Contains(string(help), "-etcd-endpoints") {
		t.Skip("this relay has no --etcd-endpoints yet (issue 13 not merged)")
	}
	res, err := Run(ctx, Options{ScaleTunnels: 60, ScaleOnly: true, ScaleRest: 2 * time.Second, Dir: dir, Binaries: bins, Progress: func(s string) { t.Log(s) }})
	require.NoError(t, err)
	s := res.Scale
	require.NotNil(t, s)
	require.Len(t, s.Replicas, 3)
	held := 0
	for _, r := range s.Replicas {
		held += r.Held
	}
	assert.Equal(t, 60, held, "the replicas hold every tunnel")
	assert.Positive(t, s.KilledHeld)
	assert.Positive(t, s.Registered)
	assert.Positive(t, s.Expired)
	var md strings.Builder
	require.NoError(t, res.WriteMarkdown(&md, "go test ./bench"))
	assert.Contains(t, md.String(), "## Scale-out: 60 idle tunnels over 3 replicas on etcd")
	assert.Contains(t, md.String(), "| etcd puts + deletes per second at rest (keep-alives only) | etcd | 0 |", "a row in the Targets table")
	out := filepath.Join(dir, "results.md")
	require.NoError(t, os.WriteFile(out, SpliceScale([]byte(md.String()), res), 0o600))
	spliced, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, 1, strings.Count(string(spliced), "## Scale-out"))
}
