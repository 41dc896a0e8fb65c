package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubeconfig"
	"github.com/spectroproxy/spectro-proxy/internal/proctest"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

const kubeUID = "kube"

var (
	kubeOnce    sync.Once
	kubeCluster *testcluster.Cluster
	kubeErr     error
)

// kube returns the package's shared control plane (etcd, kube-apiserver
// and a kwok node), starting it on first use. Without the binaries the test
// is skipped locally and fails in CI, where .ci/run builds them.
func kube(t *testing.T) *testcluster.Cluster {
	t.Helper()
	if err := testcluster.CheckBinaries("", true); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must build the control plane first: %v", err)
		}
		t.Skipf("no control plane: %v", err)
	}
	kubeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		kubeCluster, kubeErr = testcluster.Start(ctx, testcluster.Options{
			Kwok:      true,
			ExtraSANs: []string{clusterHost(kubeUID)},
		})
	})
	require.NoError(t, kubeErr)
	return kubeCluster
}

func stopKube() {
	if kubeCluster != nil {
		kubeCluster.Stop()
	}
}

// kubectl runs the real kubectl with kubeconfig and extra env, as the shared
// cluster runs it.
func kubectl(ctx context.Context, kubeconfig string, env []string, stdin io.Reader, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := kubeCluster.KubectlCmd(ctx, kubeconfig, args...)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdin = stdin
	return proctest.Run(cmd)
}

// streamLines starts a long-running kubectl and returns its stdout lines.
func streamLines(t *testing.T, kubeconfig string, env []string, args ...string) (<-chan string, *exec.Cmd) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := kubeCluster.KubectlCmd(ctx, kubeconfig, args...)
	cmd.Env = append(cmd.Env, env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	lines := make(chan string, 100)
	go func() {
		defer close(lines)
		s := bufio.NewScanner(out)
		for s.Scan() {
			lines <- s.Text()
		}
	}()
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
		if t.Failed() {
			t.Logf("kubectl %v stderr: %s", args, stderr.String())
		}
	})
	return lines, cmd
}

func nextLine(t *testing.T, lines <-chan string, within time.Duration) string {
	t.Helper()
	select {
	case l, ok := <-lines:
		require.True(t, ok, "stream ended early")
		return l
	case <-time.After(within):
		t.Fatalf("no line within %v", within)
		return ""
	}
}

// proxied is a relay and agent in front of the shared cluster, and a
// kubeconfig that reaches it through them.
type proxied struct {
	relay      *relay
	agent      *agent
	kubeconfig string
	mode       tunnel.Mode
}

func setupProxied(t *testing.T, c *testcluster.Cluster, mode tunnel.Mode) *proxied {
	t.Helper()
	ctx := context.Background()
	r := startRelay(t, "127.0.0.1:0", "", nil)
	tok, _ := r.issue(t, kubeUID, "", time.Hour)
	a := startAgent(t, r, client.Config{ClusterUID: kubeUID, TokenFile: tok, Mode: mode,
		APIServer: c.URL, APIServerCAFile: c.CAFile, AgentID: "agent-" + string(mode)})
	a.waitReady(t)

	opts := kubeconfig.Options{Mode: mode, Server: domain, Port: 443, Subdomain: hostname.DefaultSubdomain(kubeUID), Connect: r.addr}
	relayCA, err := os.ReadFile(r.caFile())
	require.NoError(t, err)
	out, err := c.ProxiedKubeconfig(ctx, opts, relayCA, time.Hour)
	require.NoError(t, err)
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kc, out, 0o600))
	return &proxied{relay: r, agent: a, kubeconfig: kc, mode: mode}
}

func TestKubectlThroughProxy(t *testing.T) {
	c := kube(t)
	ctx := context.Background()
	for _, mode := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		t.Run(string(mode), func(t *testing.T) {
			p := setupProxied(t, c, mode)
			kc := p.kubeconfig
			ns := "e2e-" + string(mode)
			run := func(t *testing.T, args ...string) string {
				t.Helper()
				out, err := kubectl(ctx, kc, nil, nil, args...)
				require.NoError(t, err)
				return out
			}

			t.Run("auth whoami", func(t *testing.T) {
				out := run(t, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
				if mode == tunnel.Passthrough {
					assert.Equal(t, "admin", out, "client certificate reached the API server")
				} else {
					assert.Equal(t, "system:serviceaccount:"+testcluster.ProxyUserNamespace+":"+testcluster.ProxyUser, out)
				}
			})

			t.Run("get apply delete", func(t *testing.T) {
				run(t, "create", "namespace", ns)
				manifest := fmt.Sprintf("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: %s\ndata:\n  k: v\n", ns)
				out, err := kubectl(ctx, kc, nil, strings.NewReader(manifest), "apply", "-f", "-")
				require.NoError(t, err)
				assert.Contains(t, out, "configmap/applied created")
				assert.Equal(t, "v", run(t, "get", "configmap", "-n", ns, "applied", "-o", "jsonpath={.data.k}"))
				assert.Contains(t, run(t, "delete", "configmap", "-n", ns, "applied"), "deleted")
			})

			t.Run("watch gets each event as it happens", func(t *testing.T) {
				lines, _ := streamLines(t, kc, nil, "get", "configmaps", "-n", ns, "-w", "-o", "name", "--field-selector", "metadata.name!=kube-root-ca.crt")
				for i := range 3 {
					name := fmt.Sprintf("watched-%d", i)
					run(t, "create", "configmap", "-n", ns, name)
					// Until this line arrives no further event exists, so
					// it cannot be waiting for a buffer to fill.
					assert.Equal(t, "configmap/"+name, nextLine(t, lines, 15*time.Second))
				}
				if mode == tunnel.Terminate {
					// kubectl speaks HTTP/2: its connection, this watch's, is
					// carried as bytes onto the API server's (server/splice.go).
					assert.GreaterOrEqual(t, p.relay.metrics(t)[`spectro_proxy_streams_open{kind="spliced"}`], 1.0)
				}
			})

			t.Run("list of 10 MiB", func(t *testing.T) {
				big := strings.Repeat("x", 900<<10)
				for i := range 12 {
					f := filepath.Join(t.TempDir(), "v")
					require.NoError(t, os.WriteFile(f, []byte(big), 0o600))
					run(t, "create", "configmap", "-n", ns, fmt.Sprintf("big-%d", i), "--from-file=v="+f)
				}
				out := run(t, "get", "configmaps", "-n", ns, "-o", "json")
				assert.Greater(t, len(out), 10<<20)
				assert.Equal(t, 12, strings.Count(out, big), "every value arrived whole")
			})

			pod := "app"
			require.NoError(t, c.RunPod(ctx, ns, pod))
			for _, proto := range []struct {
				name string
				env  []string
			}{
				{"websocket", nil},
				{"spdy", []string{"KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false", "KUBECTL_PORT_FORWARD_WEBSOCKETS=false"}},
			} {
				t.Run("exec over "+proto.name, func(t *testing.T) {
					h1Splices := func() float64 {
						return p.relay.metrics(t)[`spectro_proxy_spliced_connections_total{protocol="http/1.1"}`]
					}
					before := h1Splices()
					out, err := kubectl(ctx, kc, proto.env, nil, "exec", "-n", ns, pod, "--", "echo", "hello from exec")
					require.NoError(t, err)
					assert.Equal(t, "hello from exec\n", out)
					if mode == tunnel.Terminate {
						// An upgrade is HTTP/1.1: its connection is carried as
						// bytes onto the API server's, raw after the 101.
						assert.Greater(t, h1Splices(), before)
					}

					out, err = kubectl(ctx, kc, proto.env, strings.NewReader("typed line\nmore\n"), "exec", "-i", "-n", ns, pod, "--", "head", "-n1")
					require.NoError(t, err)
					assert.Equal(t, "typed line\n", out, "stdin carried to the command")

					_, err = kubectl(ctx, kc, proto.env, nil, "exec", "-n", ns, pod, "--", "sh", "-c", "exit 3")
					var ee *exec.ExitError
					require.True(t, errors.As(err, &ee), "non-zero exit must reach kubectl: %v", err)
					assert.NotZero(t, ee.ExitCode())
					assert.Contains(t, err.Error(), "exit", "the failure is reported, not swallowed")
				})

				t.Run("port-forward 10 MiB each way over "+proto.name, func(t *testing.T) {
					portForward(t, c, kc, proto.env, ns, pod)
				})
			}

			t.Run("logs -f", func(t *testing.T) {
				lg, err := c.PodLog(ctx, ns, pod)
				require.NoError(t, err)
				require.NoError(t, lg.Append("first line"))
				assert.Equal(t, "first line\n", run(t, "logs", "-n", ns, pod))
				lines, _ := streamLines(t, kc, nil, "logs", "-f", "-n", ns, pod)
				assert.Equal(t, "first line", nextLine(t, lines, 15*time.Second))
				for i := range 3 {
					l := fmt.Sprintf("followed %d", i)
					require.NoError(t, lg.Append(l))
					assert.Equal(t, l, nextLine(t, lines, 15*time.Second))
				}
			})

			t.Run("cp", func(t *testing.T) {
				dir := t.TempDir()
				src := filepath.Join(dir, "src.bin")
				data := make([]byte, 1<<20)
				rand.Read(data)
				require.NoError(t, os.WriteFile(src, data, 0o600))
				// kwok runs exec (and so cp's tar) on this machine; copying
				// out of the "pod" reads src through the tunnel.
				dst := filepath.Join(dir, "dst.bin")
				run(t, "cp", ns+"/"+pod+":"+src, dst)
				got, err := os.ReadFile(dst)
				require.NoError(t, err)
				assert.Equal(t, sha256.Sum256(data), sha256.Sum256(got))
			})

			t.Run("agent down: clear error fast", func(t *testing.T) {
				p.agent.stop()
				require.Eventually(t, func() bool { return p.relay.srv.Tunnels() == 0 }, 10*time.Second, 20*time.Millisecond)
				start := time.Now()
				_, err := kubectl(ctx, kc, nil, nil, "get", "namespaces", "--request-timeout=20s")
				require.Error(t, err)
				if mode == tunnel.Passthrough {
					assert.Contains(t, err.Error(), "tls: internal error")
				} else {
					assert.Contains(t, err.Error(), "no agent connected for cluster-kube")
				}
				assert.Less(t, time.Since(start), 10*time.Second)
				t.Logf("agent down: kubectl failed after %v with: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(err.Error()))
			})
		})
	}
}

var forwarding = regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+) -> 8080`)

// portForward sends 10 MiB each way through kubectl port-forward to an echo
// server behind the kwok pod, and compares the bytes.
func portForward(t *testing.T, c *testcluster.Cluster, kc string, env []string, ns, pod string) {
	ctx := context.Background()
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer echo.Close()
	go func() {
		for {
			conn, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(conn, conn); conn.Close() }()
		}
	}()
	require.NoError(t, c.PortForward(ctx, ns, pod, 8080, echo.Addr().String()))

	payload := make([]byte, 10<<20)
	rand.Read(payload)
	// kwok picks up the forward rule asynchronously and kubectl gives up
	// after one failed backend dial, so retry the whole forward briefly.
	deadline := time.Now().Add(60 * time.Second)
	var lastErr error
	for time.Now().Before(deadline) {
		lastErr = func() error {
			lines, cmd := streamLines(t, kc, env, "port-forward", "--address", "127.0.0.1", "-n", ns, "pod/"+pod, ":8080")
			defer cmd.Process.Kill()
			var port string
			select {
			case l := <-lines:
				m := forwarding.FindStringSubmatch(l)
				if m == nil {
					return fmt.Errorf("unexpected port-forward output %q", l)
				}
				port = m[1]
			case <-time.After(30 * time.Second):
				return errors.New("port-forward printed nothing")
			}
			conn, err := net.Dial("tcp", "127.0.0.1:"+port)
			if err != nil {
				return err
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(60 * time.Second))
			go func() { conn.Write(payload) }()
			got := make([]byte, len(payload))
			if _, err := io.ReadFull(conn, got); err != nil {
				return fmt.Errorf("reading echo: %w", err)
			}
			if sha256.Sum256(got) != sha256.Sum256(payload) {
				return errors.New("bytes differ")
			}
			return nil
		}()
		if lastErr == nil {
			return
		}
		t.Logf("port-forward attempt: %v", lastErr)
	}
	t.Fatalf("port-forward never moved the bytes: %v", lastErr)
}
