//go:build linux

package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/cli"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/rest"

	"github.com/spectroproxy/spectro-proxy/internal/pack"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// realNodeProxy is tinyproxy's port on the node IP.
const realNodeProxy = 3128

// packNode is a real node with a relay on its node IP, on which packs are
// installed as the platform installs them.
type packNode struct {
	c         *testcluster.Cluster
	srvBin    string
	cliBin    string
	state     string // the relay's state dir
	relayAddr string
	relayCA   string // PEM
	settings  *cli.EnvSettings
}

// startRelay runs the relay on the node IP inside the node's namespace.
func (n *packNode) startRelay(t *testing.T) {
	t.Helper()
	n.state = t.TempDir()
	n.relayAddr = net.JoinHostPort(n.c.NodeIP, fmt.Sprint(realNodeRelay))
	ctx, stop := context.WithCancel(context.Background())
	relay := n.c.NetnsCommand(ctx, n.srvBin, "--domain", domain, "--listen", n.relayAddr, "--state-dir", n.state,
		"--revocation-file", filepath.Join(n.state, "revoked"))
	out := &syncBuffer{}
	relay.Stdout, relay.Stderr = out, out
	require.NoError(t, relay.Start())
	t.Cleanup(func() {
		stop()
		_ = relay.Wait()
		if t.Failed() {
			t.Logf("relay output:\n%s", tailString(out.String(), 60))
		}
	})
	require.Eventually(t, func() bool {
		conn, err := n.c.DialContext(ctx, "tcp", n.relayAddr)
		if err != nil {
			return false
		}
		conn.Close()
		return true
	}, 20*time.Second, 50*time.Millisecond, "relay listening on %s", n.relayAddr)
	ca, err := os.ReadFile(filepath.Join(n.state, "ca.crt"))
	require.NoError(t, err)
	n.relayCA = string(ca)
}

func tailString(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// system is what the platform provides for cluster uid: its spectro.system
// values, with a tunnel token the relay issued for it.
func (n *packNode) system(t *testing.T, uid string) map[string]any {
	t.Helper()
	tok, err := exec.Command(n.srvBin, "token", "issue", "--state-dir", n.state, "--cluster-uid", uid, "--ttl", "2h").Output()
	require.NoError(t, err)
	_, port, _ := net.SplitHostPort(n.relayAddr)
	return map[string]any{
		"cluster": map[string]any{"uid": uid, "name": "real-" + uid},
		"reverseproxy": map[string]any{
			"server": domain, "port": port, "token": strings.TrimSpace(string(tok)), "caCert": n.relayCA,
		},
	}
}

// clusterOverride is the per-cluster override every install here needs:
// the relay's name does not resolve inside the node (no DNS out), so the
// agent is pointed at its address.
func (n *packNode) clusterOverride() map[string]any {
	return map[string]any{"extraArgs": []any{"--relay-address=" + n.relayAddr}}
}

// helm is the Helm SDK's configuration for namespace, reaching the API
// server inside the node's namespace.
func (n *packNode) helm(t *testing.T, namespace string) *action.Configuration {
	t.Helper()
	cfg := new(action.Configuration)
	require.NoError(t, cfg.Init(n.settings.RESTClientGetter(), namespace, "secret", t.Logf))
	return cfg
}

func (n *packNode) prepare(t *testing.T, version, uid string, overrides ...map[string]any) *pack.Prepared {
	t.Helper()
	p, err := pack.Prepare(filepath.Join("..", "packs", "spectro-proxy", version), n.system(t, uid),
		append([]map[string]any{n.clusterOverride()}, overrides...)...)
	require.NoError(t, err)
	return p
}

// install installs pack version for cluster uid as the platform does
// (namespace created with the restricted Pod Security profile enforced,
// then action.Install with the resolved values and the pack's tarball), and
// returns the prepared pack and the time until the agents were Available.
func (n *packNode) install(t *testing.T, version, uid string, overrides ...map[string]any) (*pack.Prepared, time.Duration) {
	t.Helper()
	p := n.prepare(t, version, uid, overrides...)
	ctx := context.Background()
	_, err := kubectlIn(ctx, n.c, "", nil, "create", "namespace", p.Namespace)
	require.NoError(t, err)
	_, err = kubectlIn(ctx, n.c, "", nil, "label", "namespace", p.Namespace,
		"pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted")
	require.NoError(t, err)
	start := time.Now()
	in := action.NewInstall(n.helm(t, p.Namespace))
	in.ReleaseName = "spectro-proxy"
	in.Namespace = p.Namespace
	in.Timeout = 2 * time.Minute
	rel, err := in.RunWithContext(ctx, p.Chart, p.Values)
	require.NoError(t, err)
	require.Equal(t, version, rel.Chart.Metadata.Version)
	waitReady(t, n.c, p.Namespace, "deployment/spectro-proxy")
	return p, time.Since(start)
}

// publishedMode polls the kubeconfig ConfigMap the agent publishes.
func (n *packNode) publishedMode(t *testing.T, ns string) string {
	t.Helper()
	var mode string
	require.Eventually(t, func() bool {
		out, err := kubectlIn(context.Background(), n.c, "", nil, "get", "configmap", "-n", ns, "spectro-proxy-kubeconfig",
			"-o", "jsonpath={.data.mode}")
		mode = out
		return err == nil && out != ""
	}, time.Minute, 200*time.Millisecond, "the agent publishes its kubeconfig ConfigMap")
	return mode
}

func (n *packNode) agentPods(t *testing.T, ns string) (uids []string, restarts int) {
	t.Helper()
	out, err := kubectlIn(context.Background(), n.c, "", nil, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/name=spectro-proxy",
		"-o", `jsonpath={range .items[*]}{.metadata.uid}{" "}{.status.containerStatuses[0].restartCount}{"\n"}{end}`)
	require.NoError(t, err)
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 2 {
			uids = append(uids, f[0])
			r, _ := strconv.Atoi(f[1])
			restarts += r
		}
	}
	return uids, restarts
}

// checkAgentPods: restricted security context, the API server reached
// through the kubernetes Service (the agent's env), Ready, no restarts.
func (n *packNode) checkAgentPods(t *testing.T, ns, image, mode string) {
	t.Helper()
	// No --api-server: the agent takes the in-cluster address from
	// KUBERNETES_SERVICE_HOST, the kubernetes Service's ClusterIP.
	args, err := kubectlIn(context.Background(), n.c, "", nil, "get", "deployment", "-n", ns, "spectro-proxy",
		"-o", "jsonpath={.spec.template.spec.containers[0].args}")
	require.NoError(t, err)
	assert.NotContains(t, args, "--api-server")
	logs, err := kubectlIn(context.Background(), n.c, "", nil, "logs", "-n", ns, "deployment/spectro-proxy")
	require.NoError(t, err)
	assert.Contains(t, logs, "registering "+mode, "the agent checked the API server's certificate through the Service")
	out, err := kubectlIn(context.Background(), n.c, "", nil, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/name=spectro-proxy",
		"-o", `jsonpath={range .items[*]}{.spec.containers[0].image} {.spec.securityContext.runAsNonRoot} {.spec.containers[0].securityContext.readOnlyRootFilesystem} {.spec.containers[0].securityContext.allowPrivilegeEscalation} {.spec.securityContext.seccompProfile.type} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2, "two agent pods: %s", out)
	for _, l := range lines {
		assert.Equal(t, image+" true true false RuntimeDefault True", l)
	}
	_, restarts := n.agentPods(t, ns)
	assert.Zero(t, restarts)
}

// kubeconfig writes a kubeconfig through the relay for cluster uid: in
// passthrough the admin's client certificate; in terminate a TokenRequest
// token of the chart's kubeconfig service account.
func (n *packNode) kubeconfig(t *testing.T, mode, uid string) string {
	t.Helper()
	_, port, _ := net.SplitHostPort(n.relayAddr)
	args := []string{"kubeconfig", "--mode", mode, "--server", domain, "--port", port, "--cluster-uid", uid, "--connect", n.relayAddr}
	dir := t.TempDir()
	if mode == "passthrough" {
		args = append(args, "--from", n.c.AdminKubeconfig)
	} else {
		tok, err := kubectlIn(context.Background(), n.c, "", nil, "create", "token", "spectro-proxy-kubeconfig",
			"-n", "cluster-"+uid, "--duration", "1h")
		require.NoError(t, err)
		tokFile := filepath.Join(dir, "token")
		require.NoError(t, os.WriteFile(tokFile, []byte(strings.TrimSpace(tok)), 0o600))
		caFile := filepath.Join(dir, "relay-ca.crt")
		require.NoError(t, os.WriteFile(caFile, []byte(n.relayCA), 0o600))
		args = append(args, "--ca-file", caFile, "--user-token-file", tokFile)
	}
	kc, err := exec.Command(n.cliBin, args...).Output()
	require.NoError(t, err)
	f := filepath.Join(dir, "kubeconfig")
	require.NoError(t, os.WriteFile(f, kc, 0o600))
	return f
}

// tickerPod writes "tick N" once a second.
func tickerPod(name string) map[string]any {
	return map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": name, "namespace": "default"},
		"spec": map[string]any{
			"terminationGracePeriodSeconds": 1,
			"containers": []any{map[string]any{
				"name": "main", "image": testclusterBusybox(), "imagePullPolicy": "Never",
				"command": []string{"sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done"},
			}},
		},
	}
}

// verbsRole is what the verb tests need in terminate mode, set as the
// per-cluster override terminate.clusterRole (the chart default, view,
// allows none of exec, attach, port-forward, cp, run or debug).
func verbsRole() map[string]any {
	return map[string]any{
		"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
		"metadata": map[string]any{"name": "spectro-proxy-e2e-kubectl"},
		"rules": []any{
			map[string]any{"apiGroups": []string{""}, "resources": []string{"pods", "pods/log", "pods/exec", "pods/attach",
				"pods/portforward", "pods/ephemeralcontainers", "configmaps", "events", "namespaces"}, "verbs": []string{"*"}},
		},
	}
}

// kubectlLines starts a kubectl that streams lines and returns them on a
// channel (closed when kubectl ends).
func kubectlLines(t *testing.T, ctx context.Context, c *testcluster.Cluster, kc string, env []string, args ...string) (<-chan string, *syncBuffer) {
	t.Helper()
	cmd := c.KubectlCmd(ctx, kc, args...)
	cmd.Env = append(cmd.Env, env...)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	require.NoError(t, cmd.Start())
	ch := make(chan string, 100)
	go func() {
		defer close(ch)
		s := bufio.NewScanner(stdout)
		for s.Scan() {
			select {
			case ch <- s.Text():
			default:
			}
		}
		_ = cmd.Wait()
	}()
	return ch, stderr
}

// awaitLine waits (bounded) for a line matching re.
func awaitLine(t *testing.T, ch <-chan string, re *regexp.Regexp, within time.Duration, stderr *syncBuffer) []string {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case l, ok := <-ch:
			require.True(t, ok, "kubectl ended before a line matching %s: %s", re, stderr.String())
			if m := re.FindStringSubmatch(l); m != nil {
				return m
			}
		case <-deadline:
			t.Fatalf("no line matching %s within %v: %s", re, within, stderr.String())
		}
	}
}

// kubectlVerbs runs the kubectl verbs through the relay with kubeconfig kc
// against real containers (pods bb and ticker in default).
func kubectlVerbs(t *testing.T, n *packNode, kc, tag string) {
	c := n.c
	ctx := context.Background()
	t.Run("get", func(t *testing.T) {
		out, err := kubectlIn(ctx, c, kc, nil, "get", "pods", "-n", "default", "-o", "name")
		require.NoError(t, err)
		assert.Contains(t, out, "pod/bb\n")
	})
	t.Run("apply and watch", func(t *testing.T) {
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		ch, stderr := kubectlLines(t, wctx, c, kc, nil, "get", "configmaps", "-n", "default", "--watch", "-o", "name")
		cm := fmt.Sprintf(`{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"applied-%s","namespace":"default"},"data":{"a":"1"}}`, tag)
		// The watch is established when it has listed kube-root-ca.crt.
		awaitLine(t, ch, regexp.MustCompile(`^configmap/kube-root-ca\.crt$`), 30*time.Second, stderr)
		out, err := kubectlIn(ctx, c, kc, strings.NewReader(cm), "apply", "-f", "-")
		require.NoError(t, err)
		assert.Contains(t, out, "configmap/applied-"+tag+" created")
		awaitLine(t, ch, regexp.MustCompile(`^configmap/applied-`+tag+`$`), 30*time.Second, stderr)
		out, err = kubectlIn(ctx, c, kc, nil, "get", "configmap", "-n", "default", "applied-"+tag, "-o", "jsonpath={.data.a}")
		require.NoError(t, err)
		assert.Equal(t, "1", out)
	})
	t.Run("exec exit code", func(t *testing.T) {
		cmd := c.KubectlCmd(ctx, kc, "exec", "bb", "--", "sh", "-c", "exit 3")
		var ee *exec.ExitError
		require.ErrorAs(t, cmd.Run(), &ee)
		assert.Equal(t, 3, ee.ExitCode(), "exec through the relay keeps the exit code")
		out, err := kubectlIn(ctx, c, kc, strings.NewReader("via stdin\n"), "exec", "-i", "bb", "--", "cat")
		require.NoError(t, err)
		assert.Equal(t, "via stdin\n", out)
	})
	t.Run("cp both ways", func(t *testing.T) {
		dir := t.TempDir()
		in := filepath.Join(dir, "in.txt")
		require.NoError(t, os.WriteFile(in, []byte("copied in "+tag+"\n"), 0o644))
		_, err := kubectlIn(ctx, c, kc, nil, "cp", in, "default/bb:/tmp/in-"+tag+".txt")
		require.NoError(t, err)
		out, err := kubectlIn(ctx, c, kc, nil, "exec", "bb", "--", "cat", "/tmp/in-"+tag+".txt")
		require.NoError(t, err)
		assert.Equal(t, "copied in "+tag+"\n", out)
		back := filepath.Join(dir, "index.html")
		_, err = kubectlIn(ctx, c, kc, nil, "cp", "default/bb:/www/index.html", back)
		require.NoError(t, err)
		b, err := os.ReadFile(back)
		require.NoError(t, err)
		assert.Equal(t, busyboxIndex, string(b))
	})
	t.Run("attach", func(t *testing.T) {
		actx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		ch, stderr := kubectlLines(t, actx, c, kc, nil, "attach", "ticker")
		m1 := awaitLine(t, ch, regexp.MustCompile(`^tick (\d+)$`), 30*time.Second, stderr)
		m2 := awaitLine(t, ch, regexp.MustCompile(`^tick (\d+)$`), 10*time.Second, stderr)
		a, _ := strconv.Atoi(m1[1])
		b, _ := strconv.Atoi(m2[1])
		assert.Equal(t, a+1, b, "attach streams the container's output live")
	})
	t.Run("logs -f", func(t *testing.T) {
		lctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		ch, stderr := kubectlLines(t, lctx, c, kc, nil, "logs", "-f", "--tail=1", "ticker")
		re := regexp.MustCompile(`^tick (\d+)$`)
		first := awaitLine(t, ch, re, 30*time.Second, stderr)
		start := time.Now()
		var last []string
		for i := 0; i < 3; i++ {
			last = awaitLine(t, ch, re, 10*time.Second, stderr)
		}
		a, _ := strconv.Atoi(first[1])
		b, _ := strconv.Atoi(last[1])
		assert.Equal(t, a+3, b)
		assert.Greater(t, time.Since(start), 1500*time.Millisecond, "lines arrive as written, one a second")
	})
	t.Run("port-forward", func(t *testing.T) {
		for _, ws := range []string{"true", "false"} {
			pctx, cancel := context.WithTimeout(ctx, time.Minute)
			ch, stderr := kubectlLines(t, pctx, c, kc, []string{"KUBECTL_PORT_FORWARD_WEBSOCKETS=" + ws},
				"port-forward", "--address", "127.0.0.1", "pod/bb", ":8080")
			m := awaitLine(t, ch, regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+) -> 8080`), 30*time.Second, stderr)
			hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: c.DialContext}}
			for i := 0; i < 3; i++ {
				resp, err := hc.Get("http://127.0.0.1:" + m[1] + "/index.html")
				require.NoError(t, err, "websocket=%s", ws)
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				assert.Equal(t, busyboxIndex, string(body), "websocket=%s", ws)
			}
			hc.CloseIdleConnections()
			cancel()
		}
	})
	t.Run("run --rm -i", func(t *testing.T) {
		name := "run-" + tag
		out, err := kubectlIn(ctx, c, kc, strings.NewReader("through run\n"), "run", name, "-n", "default",
			"--image="+testclusterBusybox(), "--image-pull-policy=Never", "--restart=Never", "--rm", "-i",
			"--pod-running-timeout=2m", "--", "sh", "-c", "read l; echo got: $l")
		require.NoError(t, err)
		assert.Contains(t, out, "got: through run")
		require.Eventually(t, func() bool {
			_, err := kubectlIn(ctx, c, kc, nil, "get", "pod", "-n", "default", name)
			return err != nil && strings.Contains(err.Error(), "NotFound")
		}, time.Minute, 200*time.Millisecond, "run --rm removes its pod")
	})
	t.Run("debug ephemeral container", func(t *testing.T) {
		name := "dbg-" + tag
		_, err := kubectlIn(ctx, c, kc, nil, "debug", "bb", "-n", "default", "--image="+testclusterBusybox(),
			"--image-pull-policy=Never", "--container="+name, "--", "sh", "-c", "echo debug says hi; cat /proc/1/cmdline >/dev/null; sleep 3600")
		require.NoError(t, err)
		require.Eventually(t, func() bool {
			out, err := kubectlIn(ctx, c, kc, nil, "logs", "bb", "-c", name)
			return err == nil && strings.Contains(out, "debug says hi")
		}, time.Minute, 250*time.Millisecond, "the ephemeral container runs")
		out, err := kubectlIn(ctx, c, kc, nil, "exec", "bb", "-c", name, "--", "sh", "-c", "echo in-debug")
		require.NoError(t, err)
		assert.Equal(t, "in-debug\n", out)
	})
}

// buildAgentImages builds the agent binary once and an image archive for
// each reference (the one agent image under each pack version's tag).
func buildAgentImages(t *testing.T, refs ...string) []string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "spectro-proxy-client")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "../client/cmd/spectro-proxy-client")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	mk := filepath.Join(dir, "mkimage")
	out, err = exec.Command("go", "build", "-o", mk, "../hack/mkimage").CombinedOutput()
	require.NoError(t, err, "%s", out)
	var tars []string
	for i, ref := range refs {
		tar := filepath.Join(dir, fmt.Sprintf("agent-%d.tar", i))
		out, err = exec.Command(mk, "-arch", runtime.GOARCH, "-binary", bin, "-ref", ref, "-out", tar).CombinedOutput()
		require.NoError(t, err, "%s", out)
		tars = append(tars, tar)
	}
	return tars
}

// requestLoop runs kubectl get through the relay until stopped (bounded by
// max requests), counting failures.
type requestLoop struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
	stop       chan struct{}
	done       chan struct{}
	maxRSS     atomic.Int64
}

func startLoop(n *packNode, kc, ns string, max int) *requestLoop {
	l := &requestLoop{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for i := 0; i < max; i++ {
			select {
			case <-l.stop:
				return
			default:
			}
			_, err := kubectlIn(context.Background(), n.c, kc, nil, "get", "pods", "-n", "default", "bb", "-o", "name")
			if err != nil {
				l.failed.Add(1)
				l.mu.Lock()
				l.errs = append(l.errs, time.Now().Format("15:04:05.000")+" "+err.Error())
				l.mu.Unlock()
			} else {
				l.ok.Add(1)
			}
			if i%10 == 0 {
				if uids, err := agentUIDs(n, ns); err == nil {
					for _, uid := range uids {
						if rss := n.c.PodsRSS([]string{uid}); rss > l.maxRSS.Load() {
							l.maxRSS.Store(rss)
						}
					}
				}
			}
		}
	}()
	return l
}

func agentUIDs(n *packNode, ns string) ([]string, error) {
	out, err := kubectlIn(context.Background(), n.c, "", nil, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/name=spectro-proxy",
		"--field-selector=status.phase=Running", "-o", `jsonpath={range .items[*]}{.metadata.uid}{" "}{end}`)
	return strings.Fields(out), err
}

// finish stops the loop and checks that every request succeeded.
func (l *requestLoop) finish(t *testing.T, what string) (ok int64) {
	t.Helper()
	close(l.stop)
	select {
	case <-l.done:
	case <-time.After(3 * time.Minute):
		t.Fatalf("%s: the request loop did not stop", what)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	assert.Zero(t, l.failed.Load(), "%s: failed requests:\n%s", what, strings.Join(l.errs, "\n"))
	assert.NotZero(t, l.ok.Load(), "%s: no request ran", what)
	t.Logf("%s: %d requests, %d failed", what, l.ok.Load(), l.failed.Load())
	return l.ok.Load()
}

// waitRolled polls (bounded) until the Deployment's rollout is complete.
func waitRolled(t *testing.T, c *testcluster.Cluster, ns string) {
	t.Helper()
	_, err := kubectlIn(context.Background(), c, "", nil, "rollout", "status", "-n", ns, "deployment/spectro-proxy", "--timeout=150s")
	require.NoError(t, err)
}

// TestRealNodePack installs the Spectro Proxy pack on a real node as the
// platform does and uses kubectl through the relay against real containers,
// in passthrough (the API server certificate has the cluster's SAN) and in
// terminate (it does not), then Day 2 with a request loop running.
func TestRealNodePack(t *testing.T) {
	requireRealNode(t)
	srvBin, cliBin := binaries(t)
	tars := buildAgentImages(t, "ghcr.io/spectroproxy/spectro-proxy-client:1.0.0", "ghcr.io/spectroproxy/spectro-proxy-client:1.3.0")
	c := startRealNode(t) // the API server certificate has cluster-realnode.<domain>
	ctx := context.Background()
	n := &packNode{c: c, srvBin: srvBin, cliBin: cliBin, settings: cli.New()}
	n.settings.KubeConfig = c.AdminKubeconfig
	n.settings.RESTClientGetter().(*genericclioptions.ConfigFlags).WrapConfigFn = func(cfg *rest.Config) *rest.Config {
		cfg.Dial = c.DialContext
		return cfg
	}
	for _, tar := range tars {
		require.NoError(t, c.ImportImage(ctx, tar))
	}
	applyJSON(t, c, busyboxPod("bb"), tickerPod("ticker"), verbsRole())
	waitReady(t, c, "default", "pod/bb")
	n.startRelay(t)

	var fig packFigures
	// Passthrough: pack 1.0.0 for cluster realnode, whose name is in the
	// API server certificate. Terminate: pack 1.3.0 for cluster realnode2,
	// whose name is not.
	const ptUID, tmUID = realNodeUID, "realnode2"
	var pt, tm *pack.Prepared
	t.Run("install passthrough (SAN present)", func(t *testing.T) {
		pt, fig.installPassthrough = n.install(t, "1.0.0", ptUID)
		assert.Equal(t, "passthrough", n.publishedMode(t, pt.Namespace), "auto chose passthrough")
		n.checkAgentPods(t, pt.Namespace, "ghcr.io/spectroproxy/spectro-proxy-client:1.0.0", "passthrough")
	})
	t.Run("install terminate (SAN absent)", func(t *testing.T) {
		tm, fig.installTerminate = n.install(t, "1.3.0", tmUID,
			map[string]any{"terminate": map[string]any{"clusterRole": "spectro-proxy-e2e-kubectl"}})
		assert.Equal(t, "terminate", n.publishedMode(t, tm.Namespace), "auto chose terminate")
		n.checkAgentPods(t, tm.Namespace, "ghcr.io/spectroproxy/spectro-proxy-client:1.3.0", "terminate")
	})
	require.False(t, t.Failed())
	ptKC := n.kubeconfig(t, "passthrough", ptUID)
	tmKC := n.kubeconfig(t, "terminate", tmUID)
	out, err := kubectlIn(ctx, c, tmKC, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, "system:serviceaccount:"+tm.Namespace+":spectro-proxy-kubeconfig", out)
	out, err = kubectlIn(ctx, c, ptKC, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, "admin", out)

	// An exec session through the terminate cluster's agents, left idle for
	// 5 minutes while the rest runs (Day 2 rolls only the other cluster's agents).
	idle := startIdleExec(t, c, tmKC)

	t.Run("kubectl passthrough", func(t *testing.T) { kubectlVerbs(t, n, ptKC, "pt") })
	t.Run("kubectl terminate", func(t *testing.T) { kubectlVerbs(t, n, tmKC, "tm") })

	t.Run("day 2", func(t *testing.T) { day2(t, n, ptUID, ptKC, &fig) })

	t.Run("egress proxy on the node", func(t *testing.T) { egressProxy(t, n, &fig) })

	t.Run("exec idle 5 minutes", func(t *testing.T) { fig.idle = idle.check(t) })

	_, restarts := n.agentPods(t, tm.Namespace)
	fig.restarts += restarts
	assert.Zero(t, fig.restarts, "agent restarts")
	assert.NotZero(t, fig.maxRSS)
	assert.Less(t, fig.maxRSS, int64(128<<20), "agent RSS under the chart's memory limit")
	if !t.Failed() {
		require.NoError(t, writePackFigures(fig))
	}
}

// dashboardGet fetches /index.html from host through the relay, as a
// browser does (SNI host, the relay's CA).
func (n *packNode) dashboardGet(host string) (int, string, error) {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(n.relayCA))
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return n.c.DialContext(ctx, network, n.relayAddr)
		},
		TLSClientConfig:   &tls.Config{ServerName: host, RootCAs: pool},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: tr}
	resp, err := hc.Get("https://" + host + "/index.html")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// egressProxy is the egress proxy case of issue 10 with the proxy outside
// the pod network: Debian's tinyproxy on the node IP (in the node's network
// namespace, beside the relay), pack 1.3.0 for cluster realnode3 with the
// per-cluster override proxy.httpsProxy pointing at it. Killing tinyproxy
// takes the agents' tunnels down: proof that they went through it.
func egressProxy(t *testing.T, n *packNode, fig *packFigures) {
	ctx := context.Background()
	bin, err := exec.LookPath("tinyproxy")
	require.NoError(t, err, "tinyproxy (Debian's package) must be installed where the real node runs (.ci/run installs it)")
	dir := t.TempDir()
	_, relayPort, _ := net.SplitHostPort(n.relayAddr)
	addr := net.JoinHostPort(n.c.NodeIP, fmt.Sprint(realNodeProxy))
	logFile := filepath.Join(dir, "tinyproxy.log")
	conf := fmt.Sprintf("Port %d\nListen %s\nTimeout 600\nConnectPort %s\nLogLevel Connect\nLogFile %q\nMaxClients 50\n",
		realNodeProxy, n.c.NodeIP, relayPort, logFile)
	confFile := filepath.Join(dir, "tinyproxy.conf")
	require.NoError(t, os.WriteFile(confFile, []byte(conf), 0o600))
	pctx, stop := context.WithCancel(ctx)
	tp := n.c.NetnsCommand(pctx, bin, "-d", "-c", confFile)
	out := &syncBuffer{}
	tp.Stdout, tp.Stderr = out, out
	require.NoError(t, tp.Start())
	exited := make(chan struct{})
	go func() { _ = tp.Wait(); close(exited) }()
	t.Cleanup(func() { stop(); <-exited })
	tpLog := func() string {
		b, _ := os.ReadFile(logFile)
		return string(b) + out.String()
	}
	require.Eventually(t, func() bool {
		conn, err := n.c.DialContext(ctx, "tcp", addr)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}, 10*time.Second, 50*time.Millisecond, "tinyproxy listening on %s: %s", addr, out)

	const uid = "realnode3"
	p, took := n.install(t, "1.3.0", uid, map[string]any{"proxy": map[string]any{"httpsProxy": "http://" + addr}})
	fig.installProxy = took
	logs, err := kubectlIn(ctx, n.c, "", nil, "logs", "-n", p.Namespace, "deployment/spectro-proxy")
	require.NoError(t, err)
	assert.Contains(t, logs, "the relay connection goes through an HTTP proxy")
	connects := strings.Count(tpLog(), "CONNECT "+n.relayAddr)
	assert.GreaterOrEqual(t, connects, 2, "tinyproxy carried both agents' tunnels:\n%s", tpLog())
	assert.NotContains(t, tpLog(), "10.96.0.1", "in-cluster calls (the kubernetes Service) never use the proxy")
	kc := n.kubeconfig(t, "terminate", uid)
	who, err := kubectlIn(ctx, n.c, kc, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, "system:serviceaccount:"+p.Namespace+":spectro-proxy-kubeconfig", who)

	// Proof that the tunnels went through tinyproxy: without it, none.
	require.NoError(t, tp.Process.Signal(syscall.SIGKILL))
	<-exited
	killed := time.Now()
	var ready string
	require.Eventually(t, func() bool {
		ready, err = kubectlIn(ctx, n.c, "", nil, "get", "pods", "-n", p.Namespace, "-l", "app.kubernetes.io/name=spectro-proxy",
			"-o", `jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}`)
		return err == nil && strings.TrimSpace(ready) == "False False"
	}, 2*time.Minute, 250*time.Millisecond, "both agents unready once tinyproxy is gone: %q", ready)
	fig.proxyDown = time.Since(killed)
	_, err = kubectlIn(ctx, n.c, kc, nil, "auth", "whoami", "--request-timeout=10s")
	assert.Error(t, err, "no tunnel, no kubectl through the relay")
	fig.proxyConnects = connects
	t.Logf("tinyproxy: %d CONNECTs to %s; agents unready %v after it was killed", connects, n.relayAddr, fig.proxyDown.Round(100*time.Millisecond))
}

type packFigures struct {
	installProxy, proxyDown              time.Duration
	proxyConnects                        int
	dashboard, dashboardGone             string
	installPassthrough, installTerminate time.Duration
	loopRequests                         int64
	maxRSS                               int64
	restarts                             int
	idle                                 time.Duration
	day2                                 []string
}

// idleExec is an interactive exec session left idle.
type idleExec struct {
	start time.Time
	stdin io.WriteCloser
	lines <-chan string
	err   *syncBuffer
}

func startIdleExec(t *testing.T, c *testcluster.Cluster, kc string) *idleExec {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	t.Cleanup(cancel)
	cmd := c.KubectlCmd(ctx, kc, "exec", "-i", "bb", "--", "sh", "-c", "echo ready; while read l; do echo got: $l; done")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	e := &idleExec{err: &syncBuffer{}, stdin: stdin}
	cmd.Stderr = e.err
	require.NoError(t, cmd.Start())
	ch := make(chan string, 10)
	go func() {
		defer close(ch)
		s := bufio.NewScanner(stdout)
		for s.Scan() {
			ch <- s.Text()
		}
		_ = cmd.Wait()
	}()
	e.lines = ch
	awaitLine(t, ch, regexp.MustCompile(`^ready$`), 30*time.Second, e.err)
	e.start = time.Now()
	return e
}

func (e *idleExec) check(t *testing.T) time.Duration {
	t.Helper()
	if wait := 5*time.Minute - time.Since(e.start); wait > 0 {
		// The session must stay idle for 5 minutes: nothing to poll for.
		select {
		case l, ok := <-e.lines:
			t.Fatalf("the idle session ended or wrote %q (%v): %s", l, ok, e.err.String())
		case <-time.After(wait):
		}
	}
	idle := time.Since(e.start)
	_, err := io.WriteString(e.stdin, "still here\n")
	require.NoError(t, err)
	awaitLine(t, e.lines, regexp.MustCompile(`^got: still here$`), 30*time.Second, e.err)
	e.stdin.Close()
	t.Logf("exec answered after %v idle", idle.Round(time.Second))
	return idle
}

// day2 does to cluster uid's release (pack 1.0.0) what a platform team
// does on Day 2, each step with a kubectl request loop through the relay.
func day2(t *testing.T, n *packNode, uid, kc string, fig *packFigures) {
	ctx := context.Background()
	ns := "cluster-" + uid
	override := map[string]any{"podAnnotations": map[string]any{"example.com/per-cluster": "day2"}}
	image := func() string {
		out, err := kubectlIn(ctx, n.c, "", nil, "get", "deployment", "-n", ns, "spectro-proxy",
			"-o", "jsonpath={.spec.template.spec.containers[0].image}")
		require.NoError(t, err)
		return out
	}
	step := func(name string, do func(t *testing.T)) {
		t.Run(name, func(t *testing.T) {
			before, _ := agentUIDs(n, ns)
			l := startLoop(n, kc, ns, 5000)
			defer func() {
				if rss := l.maxRSS.Load(); rss > fig.maxRSS {
					fig.maxRSS = rss
				}
			}()
			start := time.Now()
			do(t)
			waitRolled(t, n.c, ns)
			// A few more requests once the new agents serve alone.
			for target := l.ok.Load() + l.failed.Load() + 5; l.ok.Load()+l.failed.Load() < target; {
				select {
				case <-l.done:
					target = 0
				case <-time.After(50 * time.Millisecond):
				}
			}
			reqs := l.finish(t, name)
			fig.loopRequests += reqs
			after, _ := agentUIDs(n, ns)
			fig.day2 = append(fig.day2, fmt.Sprintf("| %s | %s | %d | %d |", name, time.Since(start).Round(100*time.Millisecond),
				reqs, l.failed.Load()))
			t.Logf("%s: agents %v -> %v", name, before, after)
		})
	}
	upgrade := func(t *testing.T, version string, more ...map[string]any) {
		p := n.prepare(t, version, uid, append([]map[string]any{override}, more...)...)
		up := action.NewUpgrade(n.helm(t, ns))
		up.Namespace = ns
		up.Timeout = 2 * time.Minute
		rel, err := up.RunWithContext(ctx, "spectro-proxy", p.Chart, p.Values)
		require.NoError(t, err)
		assert.Equal(t, version, rel.Chart.Metadata.Version)
	}
	step("helm upgrade with a per-cluster override", func(t *testing.T) {
		upgrade(t, "1.0.0")
		waitRolled(t, n.c, ns)
		out, err := kubectlIn(ctx, n.c, "", nil, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/name=spectro-proxy",
			"-o", `jsonpath={range .items[*]}{.metadata.annotations.example\.com/per-cluster}{" "}{end}`)
		require.NoError(t, err)
		assert.Equal(t, "day2 day2", strings.TrimSpace(out))
	})
	// The dashboard: busybox httpd in pod bb behind a Service, enabled with
	// the 1.3.0 upgrade as a per-cluster override.
	_, err := kubectlIn(ctx, n.c, "", nil, "label", "pod", "-n", "default", "bb", "app=bb-web", "--overwrite")
	require.NoError(t, err)
	applyJSON(t, n.c, map[string]any{
		"apiVersion": "v1", "kind": "Service",
		"metadata": map[string]any{"name": "bb-web", "namespace": "default"},
		"spec": map[string]any{"selector": map[string]any{"app": "bb-web"},
			"ports": []any{map[string]any{"port": 8080, "targetPort": 8080}}},
	})
	dashHost := "cluster-" + uid + "-dashboard." + domain
	dashboard := map[string]any{"k8sDashboardIntegration": map[string]any{
		"enabled": true, "useInsecurePort": true, "service": "bb-web", "namespace": "default", "port": 8080,
	}}
	step("pack upgrade 1.0.0 to 1.3.0, dashboard enabled", func(t *testing.T) {
		upgrade(t, "1.3.0", dashboard)
		assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:1.3.0", image())
		waitRolled(t, n.c, ns)
		var body string
		if !assert.Eventually(t, func() bool {
			code, b, err := n.dashboardGet(dashHost)
			body = fmt.Sprint(code, " ", b, " ", err)
			return err == nil && code == http.StatusOK && b == busyboxIndex
		}, time.Minute, 250*time.Millisecond) {
			t.Fatalf("https://%s does not serve bb's httpd through the relay: %s", dashHost, body)
		}
		fig.dashboard = "https://" + dashHost + "/index.html: 200, the in-cluster httpd's page"
	})
	step("rollback to 1.0.0", func(t *testing.T) {
		rb := action.NewRollback(n.helm(t, ns))
		rb.Version = 2
		rb.Timeout = 2 * time.Minute
		require.NoError(t, rb.Run("spectro-proxy"))
		assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:1.0.0", image())
		waitRolled(t, n.c, ns)
		// The relay remembers a host name that had an agent: once no agent
		// serves it, a request gets the documented 503 "no agent connected"
		// (README: troubleshooting); a relay that never saw it sends the TLS
		// alert unrecognized_name.
		gone := "no agent connected for cluster-" + uid + "-dashboard"
		var last string
		if !assert.Eventually(t, func() bool {
			code, body, err := n.dashboardGet(dashHost)
			if err != nil {
				last = err.Error()
				return strings.Contains(last, "unrecognized name")
			}
			last = fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
			if code == http.StatusServiceUnavailable && strings.Contains(body, gone) {
				last = fmt.Sprintf("%d %q", code, gone)
				return true
			}
			return false
		}, 2*time.Minute, 250*time.Millisecond) {
			t.Fatalf("the relay still serves %s after the rollback: %s", dashHost, last)
		}
		fig.dashboardGone = last
	})
	step("delete one agent pod", func(t *testing.T) {
		// The rollback's old agents may still be terminating: wait for the two.
		var names []string
		require.Eventually(t, func() bool {
			out, err := kubectlIn(ctx, n.c, "", nil, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/name=spectro-proxy",
				"-o", `jsonpath={range .items[*]}{.metadata.name}{" "}{end}`)
			names = strings.Fields(out)
			return err == nil && len(names) == 2
		}, 2*time.Minute, 250*time.Millisecond, "two agent pods")
		_, err := kubectlIn(ctx, n.c, "", nil, "delete", "pod", "-n", ns, names[0], "--wait=true")
		require.NoError(t, err)
		_, err = kubectlIn(ctx, n.c, "", nil, "wait", "-n", ns, "--for=jsonpath={.status.readyReplicas}=2",
			"--timeout=150s", "deployment/spectro-proxy")
		require.NoError(t, err)
	})
	_, restarts := n.agentPods(t, ns)
	fig.restarts += restarts
	t.Run("helm uninstall", func(t *testing.T) {
		rel, err := action.NewGet(n.helm(t, ns)).Run("spectro-proxy")
		require.NoError(t, err)
		var objs []string
		for _, doc := range strings.Split(rel.Manifest, "\n---") {
			kind := regexp.MustCompile(`(?m)^kind: (\S+)`).FindStringSubmatch(doc)
			name := regexp.MustCompile(`(?m)^  name: (\S+)`).FindStringSubmatch(doc)
			if kind != nil && name != nil {
				objs = append(objs, kind[1]+"/"+strings.Trim(name[1], `"`))
			}
		}
		require.NotEmpty(t, objs)
		_, err = action.NewUninstall(n.helm(t, ns)).Run("spectro-proxy")
		require.NoError(t, err)
		for _, o := range objs {
			require.Eventually(t, func() bool {
				_, err := kubectlIn(ctx, n.c, "", nil, "get", "-n", ns, o)
				return err != nil && strings.Contains(err.Error(), "NotFound")
			}, time.Minute, 200*time.Millisecond, "%s removed by helm uninstall", o)
		}
		require.Eventually(t, func() bool {
			out, err := kubectlIn(ctx, n.c, "", nil, "get", "pods", "-n", ns, "-o", "name")
			return err == nil && strings.TrimSpace(out) == ""
		}, 2*time.Minute, 250*time.Millisecond, "the agent pods are gone")
		out, err := kubectlIn(ctx, n.c, "", nil, "get", "namespace", ns, "-o", "jsonpath={.status.phase}")
		require.NoError(t, err)
		assert.Equal(t, "Active", out, "helm uninstall keeps the namespace")
		t.Logf("removed %v", objs)
	})
}

func writePackFigures(f packFigures) error {
	var b strings.Builder
	fmt.Fprintf(&b, `# The pack on a real node

Written by `+"`TestRealNodePack`"+` (e2e/realnode_pack_test.go) on its last green run; do not edit by hand.

The pack is installed as the platform installs it (internal/pack.Prepare: values.yaml's `+"`{{ .spectro.system.* }}`"+`
resolved as text from the cluster's system values, `+"`charts.spectro-proxy`"+` taken as the chart's values, a
per-cluster override, the tarball that pack.json names; Helm SDK action.Install), on a real kubelet node
(docs/realnode.md). The per-cluster override every install needs is `+"`extraArgs: [--relay-address=<node IP>:%d]`"+`:
the relay's name does not resolve inside the node, which has no DNS out. Pack 1.0.0 for a cluster whose name is
in the API server certificate (auto chose passthrough); pack 1.3.0 for one whose name is not (auto chose
terminate), with the per-cluster override `+"`terminate.clusterRole: spectro-proxy-e2e-kubectl`"+` (pods and their
subresources, ConfigMaps: what the kubectl verbs need; the default `+"`view`"+` allows none of exec, attach,
port-forward, cp, run or debug) and a TokenRequest token (`+"`kubectl create token spectro-proxy-kubeconfig`"+`).

Through the relay with the real kubectl, both modes: get, apply, watch, exec (exit code 3), exec -i, cp both
ways, attach, logs -f of a container writing a line a second, port-forward to busybox httpd over WebSocket and
SPDY, run --rm -i, debug with an ephemeral container; an exec session idle for %s, then answering.

## Figures (%d cores, %s, load average %s at the end)

| what | value |
| --- | --- |
| install to agents Available, pack 1.0.0, passthrough | %s |
| install to agents Available, pack 1.3.0, terminate | %s |
| highest RSS of one agent pod under the kubectl loops | %d MiB (chart limit 128 MiB) |
| agent restarts | %d |
| kubectl requests in the Day 2 loops | %d |

Day 2 (pack 1.0.0, passthrough), a kubectl loop through the relay during each step:

| step | time | requests | failed |
| --- | --- | --- | --- |
%s

The upgrade to 1.3.0 carries the per-cluster override `+"`k8sDashboardIntegration: {enabled: true, useInsecurePort: true, service: bb-web, namespace: default, port: 8080}`"+`
(busybox httpd in a real pod behind a Service):
%s. After the rollback to 1.0.0 no agent serves the host name; the relay, which had seen it, answers %s.

Egress proxy outside the pod network: Debian's tinyproxy on the node IP (port %d, CONNECT allowed to the relay's
port only), pack 1.3.0 for a third cluster with the per-cluster override `+"`proxy.httpsProxy: http://<node IP>:%d`"+`.
Install to agents Available through the proxy: %s; tinyproxy logged %d CONNECTs to the relay; kubectl through the
relay works; once tinyproxy is killed both agents are unready after %s.
`, realNodeRelay, f.idle.Round(time.Second), runtime.NumCPU(), time.Now().UTC().Format("2006-01-02"), loadAvg(),
		f.installPassthrough.Round(100*time.Millisecond), f.installTerminate.Round(100*time.Millisecond),
		f.maxRSS>>20, f.restarts, f.loopRequests, strings.Join(f.day2, "\n"), f.dashboard, "`"+f.dashboardGone+"`",
		realNodeProxy, realNodeProxy, f.installProxy.Round(100*time.Millisecond), f.proxyConnects, f.proxyDown.Round(100*time.Millisecond))
	return os.WriteFile("../docs/realnode-pack.md", []byte(b.String()), 0o644)
}
