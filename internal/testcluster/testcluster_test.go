package testcluster_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/spectroproxy/spectro-proxy/internal/proctest"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// proxySAN is a name a proxy in front of the API server would be reached by.
const proxySAN = "cluster-abc.proxy.test"

var (
	cluster    *testcluster.Cluster // shared by all tests; started by TestMain
	skipReason string               // set when the binaries are missing outside CI
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if err := testcluster.CheckBinaries("", true); err != nil {
		if !isCI() {
			skipReason = err.Error()
			return m.Run()
		}
		fmt.Fprintln(os.Stderr, "CI is set, so missing binaries are a failure:", err)
		return 1
	}
	log := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	start := time.Now()
	c, err := testcluster.Start(context.Background(), testcluster.Options{
		Kwok:      true,
		ExtraSANs: []string{proxySAN},
		Log:       log,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "testcluster: started in %v (%s)\n", time.Since(start).Round(time.Millisecond), c.URL)
	cluster = c
	code := m.Run()
	start = time.Now()
	if err := c.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stopping cluster:", err)
		code = 1
	}
	fmt.Fprintf(os.Stderr, "testcluster: stopped in %v\n", time.Since(start).Round(time.Millisecond))
	if err := goleak.Find(); err != nil {
		fmt.Fprintln(os.Stderr, "leaked goroutines:", err)
		code = 1
	}
	return code
}

func isCI() bool {
	v := os.Getenv("CI")
	return v != "" && v != "0" && v != "false"
}

// need returns the shared cluster, or skips the test when the binaries are
// missing (outside CI).
func need(t *testing.T) *testcluster.Cluster {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	return cluster
}

// uniqueName returns prefix plus a random suffix: tests share one cluster,
// also across -count runs.
func uniqueName(prefix string) string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%s-%x", prefix, b)
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestMissingBinaries(t *testing.T) {
	_, err := testcluster.Start(t.Context(), testcluster.Options{BinDir: t.TempDir(), Kwok: true})
	require.ErrorIs(t, err, testcluster.ErrBinariesMissing)
	assert.Contains(t, err.Error(), "make kube-bins")
}

func TestNodeIsReady(t *testing.T) {
	c := need(t)
	ctx := testContext(t)

	out, err := c.Kubectl(ctx, "", "get", "nodes", "-o", "jsonpath={.items[*].metadata.name}")
	require.NoError(t, err)
	assert.Equal(t, c.NodeName, out)

	out, err = c.Kubectl(ctx, "", "get", "node", c.NodeName, "-o",
		`jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
	require.NoError(t, err)
	assert.Equal(t, "True", out)

	out, err = c.Kubectl(ctx, "", "get", "--raw", "/readyz")
	require.NoError(t, err)
	assert.Equal(t, "ok", out)
}

func TestServingCertificate(t *testing.T) {
	c := need(t)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(c.CAPEM))
	addr := fmt.Sprintf("127.0.0.1:%d", c.Port)

	for _, name := range []string{proxySAN, "localhost", "kubernetes.default.svc", ""} {
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: name})
		if assert.NoError(t, err, "server name %q", name) {
			conn.Close()
		}
	}
	_, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, ServerName: "cluster-other.proxy.test"})
	assert.ErrorContains(t, err, "certificate is valid for")

	// A kubeconfig that dials the address and verifies the proxy's name, as
	// a kubeconfig pointing at the relay would.
	kc := t.TempDir() + "/sni.kubeconfig"
	require.NoError(t, testcluster.WriteKubeconfig(kc, testcluster.Kubeconfig{
		Server: c.URL, TLSServerName: proxySAN, CAFile: c.CAFile, CertFile: c.AdminCertFile, KeyFile: c.AdminKeyFile,
	}))
	out, err := c.Kubectl(testContext(t), kc, "get", "--raw", "/readyz")
	require.NoError(t, err)
	assert.Equal(t, "ok", out)
}

func TestExec(t *testing.T) {
	c := need(t)
	ctx := testContext(t)
	ns, pod := uniqueName("exec-test"), "shell"
	require.NoError(t, c.RunPod(ctx, ns, pod))

	for _, tc := range []struct {
		name string
		env  []string
	}{
		{"websocket", nil},
		{"spdy", []string{"KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kubectl := func(stdin string, args ...string) (string, string, error) {
				cmd := c.KubectlCmd(ctx, "", append([]string{"exec", "-n", ns, pod}, args...)...)
				cmd.Env = append(cmd.Env, tc.env...)
				var stdout, stderr bytes.Buffer
				cmd.Stdout, cmd.Stderr = &stdout, &stderr
				if stdin != "" {
					cmd.Stdin = strings.NewReader(stdin)
				}
				err := cmd.Run()
				return stdout.String(), stderr.String(), err
			}

			out, _, err := kubectl("", "--", "echo", "hello from kwok")
			require.NoError(t, err)
			assert.Equal(t, "hello from kwok\n", out)

			// kwok runs the command on this machine, in the cluster's Dir.
			out, _, err = kubectl("", "--", "pwd")
			require.NoError(t, err)
			assert.Equal(t, c.Dir+"\n", out)

			// kwok never closes the command's stdin: use a command that
			// ends by itself.
			out, _, err = kubectl("line one\nline two\n", "-i", "--", "head", "-n1")
			require.NoError(t, err)
			assert.Equal(t, "line one\n", out)

			// A failing command fails kubectl (kwok does not pass the exit
			// code through: kubectl exits 1, not 3).
			out, stderr, err := kubectl("", "--", "sh", "-c", "echo partial; echo oops >&2; exit 3")
			var exitErr *exec.ExitError
			require.ErrorAs(t, err, &exitErr)
			assert.NotZero(t, exitErr.ExitCode())
			assert.Equal(t, "partial\n", out)
			assert.Contains(t, stderr, "oops")
		})
	}
}

func TestLogs(t *testing.T) {
	c := need(t)
	ctx := testContext(t)
	ns, pod := uniqueName("logs-test"), "writer"
	require.NoError(t, c.RunPod(ctx, ns, pod))
	podLog, err := c.PodLog(ctx, ns, pod)
	require.NoError(t, err)
	require.NoError(t, podLog.Append("first line"))
	require.NoError(t, podLog.AppendStderr("to stderr"))

	out, err := c.Kubectl(ctx, "", "logs", "-n", ns, pod)
	require.NoError(t, err)
	assert.Equal(t, "first line\nto stderr\n", out)

	followCtx, stopFollow := context.WithCancel(ctx)
	defer stopFollow()
	cmd := c.KubectlCmd(followCtx, "", "logs", "-f", "-n", ns, pod)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr syncBuffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	lines := make(chan string)
	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	})
	next := func() string {
		t.Helper()
		select {
		case l, ok := <-lines:
			require.True(t, ok, "kubectl logs -f ended: %s", stderr.String())
			return l
		case <-time.After(15 * time.Second):
			require.FailNow(t, "no log line within 15s", "stderr: %s", stderr.String())
			return ""
		}
	}
	assert.Equal(t, "first line", next())
	assert.Equal(t, "to stderr", next())
	require.NoError(t, podLog.Append("appended while following"))
	assert.Equal(t, "appended while following", next())
	require.NoError(t, podLog.Append("one more", "and another"))
	assert.Equal(t, "one more", next())
	assert.Equal(t, "and another", next())

	stopFollow()
	_ = cmd.Wait() // killed by the context
	for range lines {
	}
	wg.Wait()
}

func TestPortForward(t *testing.T) {
	c := need(t)
	ctx := testContext(t)
	ns, pod := uniqueName("pf-test"), "web"
	backend := startEchoServer(t)
	require.NoError(t, c.RunPod(ctx, ns, pod))
	require.NoError(t, c.PortForward(ctx, ns, pod, 8080, backend))

	for _, tc := range []struct {
		name string
		env  []string
	}{
		{"websocket", nil},
		{"spdy", []string{"KUBECTL_PORT_FORWARD_WEBSOCKETS=false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pfCtx, stop := context.WithCancel(ctx)
			defer stop()
			cmd := c.KubectlCmd(pfCtx, "", "port-forward", "-n", ns, "--address", "127.0.0.1", "pod/"+pod, ":8080")
			cmd.Env = append(cmd.Env, tc.env...)
			stdout, err := cmd.StdoutPipe()
			require.NoError(t, err)
			var stderr syncBuffer
			cmd.Stderr = &stderr
			require.NoError(t, cmd.Start())
			defer func() { stop(); _ = cmd.Wait() }()

			// "Forwarding from 127.0.0.1:41234 -> 8080"
			line, err := bufio.NewReader(stdout).ReadString('\n')
			require.NoError(t, err, "stderr: %s", stderr.String())
			m := regexp.MustCompile(`Forwarding from (127\.0\.0\.1:\d+) -> 8080`).FindStringSubmatch(line)
			require.NotNil(t, m, "unexpected output %q, stderr: %s", line, stderr.String())

			for i := range 2 { // two connections through one port-forward
				conn, err := net.Dial("tcp", m[1])
				require.NoError(t, err)
				payload := make([]byte, 256<<10)
				_, _ = rand.Read(payload)
				errc := make(chan error, 1)
				go func() {
					_, err := conn.Write(payload)
					errc <- err
				}()
				got := make([]byte, len(payload))
				require.NoError(t, conn.SetReadDeadline(time.Now().Add(20*time.Second)))
				_, err = io.ReadFull(conn, got)
				require.NoError(t, err, "connection %d, kubectl stderr: %s", i, stderr.String())
				require.NoError(t, <-errc)
				assert.True(t, bytes.Equal(payload, got), "echoed bytes differ")
				conn.Close()
			}
		})
	}
}

// startEchoServer serves TCP echo on 127.0.0.1 until the test ends.
func startEchoServer(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Go(func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[conn] = true
			mu.Unlock()
			wg.Go(func() {
				defer conn.Close()
				_, _ = io.Copy(conn, conn)
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for conn := range conns {
			conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return l.Addr().String()
}

func TestServiceAccountToken(t *testing.T) {
	c := need(t)
	ctx := testContext(t)
	ns, sa := uniqueName("sa-test"), "robot"
	token, err := c.ServiceAccountToken(ctx, ns, sa, 15*time.Minute)
	require.NoError(t, err)
	kc, err := c.TokenKubeconfig("robot", token)
	require.NoError(t, err)

	out, err := c.Kubectl(ctx, kc, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, "system:serviceaccount:"+ns+":"+sa, out)

	_, err = c.Kubectl(ctx, kc, "get", "pods", "-n", ns)
	require.ErrorContains(t, err, "Forbidden")

	require.NoError(t, c.BindClusterRole(ctx, ns, sa, "cluster-admin"))
	deadline := time.Now().Add(10 * time.Second) // RBAC's informer needs a moment
	for {
		_, err = c.Kubectl(ctx, kc, "get", "pods", "-n", ns)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	require.NoError(t, err)
}

func TestAdminCredentials(t *testing.T) {
	c := need(t)
	ctx := testContext(t)
	tokenKC, err := c.TokenKubeconfig("admin-token", c.AdminToken)
	require.NoError(t, err)
	for _, kc := range []string{c.AdminKubeconfig, tokenKC} {
		out, err := c.Kubectl(ctx, kc, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}")
		require.NoError(t, err)
		assert.Equal(t, `admin ["system:masters","system:authenticated"]`, out)
	}

	resp, err := c.HTTPClient().Get(c.URL + "/version")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, "HTTP/2.0", resp.Proto)
}

// syncBuffer collects output written while the test reads it.
type syncBuffer = proctest.Buffer
