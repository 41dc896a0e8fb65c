package chart_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/spectroproxy/spectro-proxy/internal/token"
)

// TestRelayNotesTokenIssue runs the `token issue` command the relay's NOTES
// print, as kubectl exec would in the relay container: the built binary, with
// the signing key where the chart mounts it. The token it prints verifies with
// that key for the cluster asked for.
func TestRelayNotesTokenIssue(t *testing.T) {
	m := renderRelay(t, "{}")
	var cmd []string
	for _, line := range strings.Split(m.notes, "\n") {
		if _, after, ok := strings.Cut(line, "exec deploy/"+relayName+" -c relay -- "); ok {
			cmd = strings.Fields(after)
		}
	}
	require.NotEmpty(t, cmd, "no token issue command in NOTES:\n%s", m.notes)
	require.Equal(t, []string{"spectro-proxy-server", "token", "issue"}, cmd[:3])

	dir := t.TempDir()
	out, err := exec.Command("go", "build", "-o", dir+"/", "../server/cmd/spectro-proxy-server").CombinedOutput()
	require.NoError(t, err, "building the relay: %s", out)
	key := decode[corev1.Secret](t, m, "Secret/"+relayName+"-signing-key").Data["signing.key"]
	const mounted = "/etc/spectro-proxy/signing-key/signing.key"
	keyFile := filepath.Join(dir, "signing.key")
	require.NoError(t, os.WriteFile(keyFile, key, 0o600))

	const uid = "0123456789abcdef01234567"
	args := cmd[3:]
	for i, a := range args {
		args[i] = strings.NewReplacer("<uid>", uid, mounted, keyFile).Replace(a)
	}
	run := exec.Command(filepath.Join(dir, cmd[0]), append([]string{"token", "issue"}, args...)...)
	var stderr strings.Builder
	run.Stderr = &stderr
	stdout, err := run.Output()
	require.NoError(t, err, "%v: %s", run.Args, stderr.String())
	assert.Contains(t, stderr.String(), "token id ", "the id to revoke with is on stderr")

	k, err := token.ReadKey(keyFile)
	require.NoError(t, err)
	claims, err := token.Verify(k, strings.TrimSpace(string(stdout)), time.Now())
	require.NoError(t, err)
	assert.Equal(t, uid, claims.ClusterUID)
}
