package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/proctest"
)

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// binaries builds the two shipped binaries once per test run.
func binaries(t *testing.T) (server, client string) {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "spectro-proxy-bin-")
		if binErr != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", binDir+"/",
			"../server/cmd/spectro-proxy-server", "../client/cmd/spectro-proxy-client").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	require.NoError(t, binErr)
	return filepath.Join(binDir, "spectro-proxy-server"), filepath.Join(binDir, "spectro-proxy-client")
}

// startProc starts bin with the parent's environment and env, keeping its
// output; the test's cleanup kills it and, when the test failed, logs it.
func startProc(t *testing.T, env []string, bin string, args ...string) *proctest.Process {
	t.Helper()
	p, err := proctest.Start(proctest.Options{Bin: bin, Args: args, Env: append(os.Environ(), env...)})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = p.Stop(0)
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(bin), p.Output())
		}
	})
	return p
}

// freeAddr is a port for a child process to listen on (see
// proctest.FreeAddr).
func freeAddr(t *testing.T) string {
	t.Helper()
	a, err := proctest.FreeAddr()
	require.NoError(t, err)
	return a
}

func waitHTTP(t *testing.T, url string, want int) {
	t.Helper()
	require.Eventually(t, func() bool {
		resp, err := http.Get(url)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == want
	}, 20*time.Second, 50*time.Millisecond, "waiting for %s to answer %d", url, want)
}

// TestShippedBinaries runs the real binaries as a chart would: the relay with
// flags, the agent configured through SPECTRO_PROXY_* variables, the token
// and kubeconfig from the CLIs, kubectl through it all, then SIGTERM.
func TestShippedBinaries(t *testing.T) {
	c := kube(t)
	srvBin, cliBin := binaries(t)
	state := t.TempDir()
	relayAddr := freeAddr(t)
	relay := startProc(t, nil, srvBin, "--domain", domain, "--listen", relayAddr, "--state-dir", state,
		"--revocation-file", filepath.Join(state, "revoked"), "--drain-timeout", "3s")
	require.Eventually(t, func() bool { _, err := os.Stat(filepath.Join(state, "signing.key")); return err == nil },
		10*time.Second, 20*time.Millisecond)

	tok, err := exec.Command(srvBin, "token", "issue", "--state-dir", state, "--cluster-uid", kubeUID, "--ttl", "1h").Output()
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(tok), "spx1."), "token issue prints the token: %q", tok)
	tokFile := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tokFile, tok, 0o600))

	health := freeAddr(t)
	agent := startProc(t, []string{
		"SPECTRO_PROXY_SERVER=" + domain,
		"SPECTRO_PROXY_RELAY_ADDRESS=" + relayAddr,
		"SPECTRO_PROXY_CLUSTER_UID=" + kubeUID,
		"SPECTRO_PROXY_TOKEN_FILE=" + tokFile,
		"SPECTRO_PROXY_RELAY_CA_FILE=" + filepath.Join(state, "ca.crt"),
		"SPECTRO_PROXY_API_SERVER=" + c.URL,
		"SPECTRO_PROXY_API_SERVER_CA_FILE=" + c.CAFile,
		"SPECTRO_PROXY_HEALTH_ADDR=" + health,
		"POD_NAME=spectro-proxy-0",
	}, cliBin)
	waitHTTP(t, "http://"+health+"/healthz", 200)
	waitHTTP(t, "http://"+health+"/readyz", 200)

	_, port, _ := net.SplitHostPort(relayAddr)
	kc, err := exec.Command(cliBin, "kubeconfig", "--mode", "passthrough", "--server", domain, "--port", port,
		"--cluster-uid", kubeUID, "--connect", relayAddr, "--from", c.AdminKubeconfig).Output()
	require.NoError(t, err)
	kcFile := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kcFile, kc, 0o600))
	out, err := kubectl(context.Background(), kcFile, nil, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, "admin", out)

	// Both shut down cleanly on SIGTERM, and the agent's readiness drops.
	require.NoError(t, agent.Signal(syscall.SIGTERM))
	select {
	case <-agent.Done():
		assert.NoError(t, agent.Err(), "agent exit status after SIGTERM")
	case <-time.After(15 * time.Second):
		t.Fatal("agent did not exit after SIGTERM")
	}
	assert.Contains(t, agent.Output(), `"msg":"draining tunnel"`)
	require.NoError(t, relay.Signal(syscall.SIGTERM))
	select {
	case <-relay.Done():
		assert.NoError(t, relay.Err(), "relay exit status after SIGTERM")
	case <-time.After(15 * time.Second):
		t.Fatal("relay did not exit after SIGTERM")
	}
	assert.Contains(t, relay.Output(), `"msg":"relay draining"`)
	assert.NotContains(t, relay.Output()+agent.Output(), strings.TrimSpace(string(tok)), "the token is never logged")
}

func TestCLIErrors(t *testing.T) {
	srvBin, cliBin := binaries(t)
	keyDir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(keyDir, "signing.key"), []byte(strings.Repeat("ab", 32)), 0o600))
	tests := []struct {
		name string
		bin  string
		args []string
		want string
	}{
		{"relay without domain", srvBin, []string{"--state-dir", t.TempDir()}, "domain is required"},
		{"token issue without key", srvBin, []string{"token", "issue", "--cluster-uid", "x"}, "--signing-key-file or --state-dir is required"},
		{"token issue without uid", srvBin, []string{"token", "issue", "--state-dir", t.TempDir()}, "reading signing key"},
		{"token issue with a negative ttl", srvBin, []string{"token", "issue", "--cluster-uid", "x", "--ttl", "-1h", "--state-dir", keyDir}, "is negative"},
		{"unknown token command", srvBin, []string{"token", "mint"}, `unknown token command "mint"`},
		{"agent without server", cliBin, []string{"--cluster-uid", "x", "--api-server", "https://127.0.0.1:1"}, "server is required"},
		{"agent bad mode", cliBin, []string{"--server", "p.test", "--cluster-uid", "x", "--api-server", "https://127.0.0.1:1", "--mode", "tcp"}, "unknown mode"},
		{"kubeconfig bad from", cliBin, []string{"kubeconfig", "--server", "p.test", "--cluster-uid", "x", "--from", "/nonexistent"}, "reading kubeconfig"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command(tc.bin, tc.args...).CombinedOutput()
			require.Error(t, err)
			assert.Contains(t, string(out), tc.want)
		})
	}
}
