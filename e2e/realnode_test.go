//go:build linux

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

const (
	realNodeUID   = "realnode"
	realNodeRelay = 7443 // the relay's port on the node IP
	agentNS       = "spectro-proxy-agent"
)

// requireRealNode skips the test where this machine cannot run a real node
// (no root, no network namespaces, no cgroups, packages missing), naming
// what is missing. Missing binaries are a failure in CI, which builds them.
func requireRealNode(t *testing.T) {
	t.Helper()
	err := testcluster.CheckRealNode("")
	if err == nil {
		return
	}
	if errors.Is(err, testcluster.ErrBinariesMissing) && os.Getenv("CI") != "" {
		t.Fatalf("CI must build the node binaries first (make kube-bins): %v", err)
	}
	t.Skipf("no real node on this machine: %v", err)
}

func startRealNode(t *testing.T) *testcluster.Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := testcluster.Start(ctx, testcluster.Options{
		RealNode:  true,
		ExtraSANs: []string{"cluster-" + realNodeUID + "." + domain},
		Log:       testLogger(t),
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Stop() })
	return c
}

// kubectlIn runs kubectl against the real node's API server directly.
func kubectlIn(ctx context.Context, c *testcluster.Cluster, kubeconfig string, stdin io.Reader, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := c.KubectlCmd(ctx, kubeconfig, args...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

func applyJSON(t *testing.T, c *testcluster.Cluster, objs ...map[string]any) {
	t.Helper()
	b, err := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "List", "items": objs})
	require.NoError(t, err)
	_, err = kubectlIn(context.Background(), c, "", bytes.NewReader(b), "apply", "-f", "-")
	require.NoError(t, err)
}

const busyboxIndex = "hello from a real busybox container\n"

// busyboxPod serves busyboxIndex with httpd on 8080 and logs "started".
func busyboxPod(name string) map[string]any {
	return map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": name, "namespace": "default"},
		"spec": map[string]any{
			"terminationGracePeriodSeconds": 1,
			"containers": []any{map[string]any{
				"name": "main", "image": testclusterBusybox(), "imagePullPolicy": "Never",
				"command": []string{"sh", "-c", "mkdir -p /www && printf '" + strings.TrimSuffix(busyboxIndex, "\n") +
					"\\n' > /www/index.html && echo started && exec httpd -f -p 8080 -h /www"},
				"ports":          []any{map[string]any{"containerPort": 8080}},
				"readinessProbe": map[string]any{"httpGet": map[string]any{"path": "/", "port": 8080}, "periodSeconds": 1},
			}},
		},
	}
}

// testclusterBusybox is the busybox image hack/kube-bins.sh built and the
// node imported.
func testclusterBusybox() string {
	link, err := os.Readlink(filepath.Join(testcluster.DefaultBinDir(), "images", "busybox.tar"))
	if err != nil {
		return "spectro-proxy.local/busybox:unknown"
	}
	return "spectro-proxy.local/busybox:" + strings.TrimSuffix(strings.TrimPrefix(filepath.Base(link), "busybox-"), ".tar")
}

func waitReady(t *testing.T, c *testcluster.Cluster, ns, what string) time.Duration {
	t.Helper()
	start := time.Now()
	cond := "condition=Ready"
	if strings.HasPrefix(what, "deployment/") {
		cond = "condition=Available"
	}
	out, err := kubectlIn(context.Background(), c, "", nil, "wait", "-n", ns, "--for="+cond, "--timeout=150s", what)
	if err != nil {
		desc, _ := kubectlIn(context.Background(), c, "", nil, "describe", "-n", ns, what)
		events, _ := kubectlIn(context.Background(), c, "", nil, "get", "events", "-A")
		t.Fatalf("%v\n%s\n%s\n%s\nkubelet log:\n%s", err, out, desc, events, tailFile(c.LogFile("kubelet"), 40))
	}
	return time.Since(start)
}

func tailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// realNodeFigures are written to docs/realnode.md.
type realNodeFigures struct {
	start, ready, stop, secondStart, secondStop time.Duration
	busyboxReady, agentImport, agentReady       time.Duration
	rss                                         map[string]int64
	agentRestarts                               int
}

// TestRealNode runs a real kubelet node (containerd, runc, CNI bridge,
// kube-proxy, CoreDNS) in a network namespace of its own: a busybox pod,
// the real kubectl's exec (with the command's exit code), logs, cp and
// port-forward against it, and the agent image with the chart's restricted
// security context, Ready through kubelet's probes, tunnelled to a relay on
// the node IP, with kubectl through that relay. Then a teardown that must
// leave nothing behind, and a second start on the same machine.
func TestRealNode(t *testing.T) {
	requireRealNode(t)
	srvBin, cliBin := binaries(t)
	agentImage, agentRef := buildAgentImage(t)
	var fig realNodeFigures

	c := startRealNode(t)
	fig.start, fig.ready = c.Figures.Start, c.Figures.NodeReady
	t.Logf("node Ready %v after start; start took %v", fig.ready.Round(time.Millisecond), fig.start.Round(time.Millisecond))
	ctx := context.Background()

	applyJSON(t, c, busyboxPod("bb"))
	fig.busyboxReady = waitReady(t, c, "default", "pod/bb")
	// The pod's address came from CNI host-local, whose allocations Stop
	// checks are released (CNI DEL) before it stops kubelet.
	ips, _ := filepath.Glob(filepath.Join(c.Dir, "cni", "ipam", "*", "10.244.*"))
	require.NotEmpty(t, ips, "host-local allocations under %s", c.Dir)

	t.Run("exec exit code", func(t *testing.T) {
		cmd := c.KubectlCmd(ctx, "", "exec", "bb", "--", "sh", "-c", "exit 3")
		err := cmd.Run()
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
		assert.Equal(t, 3, ee.ExitCode(), "kubectl exec passes the command's exit code on")
		out, err := kubectlIn(ctx, c, "", nil, "exec", "bb", "--", "cat", "/www/index.html")
		require.NoError(t, err)
		assert.Equal(t, busyboxIndex, out)
		out, err = kubectlIn(ctx, c, "", strings.NewReader("from stdin\n"), "exec", "-i", "bb", "--", "cat")
		require.NoError(t, err)
		assert.Equal(t, "from stdin\n", out)
	})

	t.Run("cluster DNS", func(t *testing.T) {
		// The pod's resolv.conf names CoreDNS on the node IP, with the
		// cluster's search path; the kubernetes Service's name resolves.
		out, err := kubectlIn(ctx, c, "", nil, "exec", "bb", "--", "cat", "/etc/resolv.conf")
		require.NoError(t, err)
		assert.Contains(t, out, "nameserver "+c.NodeIP)
		assert.Contains(t, out, "search default.svc.cluster.local svc.cluster.local cluster.local")
		// (busybox's nslookup does not apply the search path: a full name.)
		out, err = kubectlIn(ctx, c, "", nil, "exec", "bb", "--", "nslookup", "-type=a", "kubernetes.default.svc.cluster.local")
		require.NoError(t, err)
		assert.Contains(t, out, "Address: 10.96.0.1")
		// Nothing outside the cluster resolves: no upstream, no way out.
		out, err = kubectlIn(ctx, c, "", nil, "exec", "bb", "--", "nslookup", "-type=a", "example.com.")
		assert.Error(t, err)
		assert.Contains(t, out, "NXDOMAIN")
	})

	t.Run("logs", func(t *testing.T) {
		out, err := kubectlIn(ctx, c, "", nil, "logs", "bb")
		require.NoError(t, err)
		assert.Equal(t, "started\n", out)
	})

	t.Run("cp both ways", func(t *testing.T) {
		dir := t.TempDir()
		in := filepath.Join(dir, "in.txt")
		require.NoError(t, os.WriteFile(in, []byte("copied into the pod\n"), 0o644))
		_, err := kubectlIn(ctx, c, "", nil, "cp", in, "default/bb:/tmp/in.txt")
		require.NoError(t, err)
		out, err := kubectlIn(ctx, c, "", nil, "exec", "bb", "--", "cat", "/tmp/in.txt")
		require.NoError(t, err)
		assert.Equal(t, "copied into the pod\n", out)
		back := filepath.Join(dir, "index.html")
		_, err = kubectlIn(ctx, c, "", nil, "cp", "default/bb:/www/index.html", back)
		require.NoError(t, err)
		b, err := os.ReadFile(back)
		require.NoError(t, err)
		assert.Equal(t, busyboxIndex, string(b))
	})

	t.Run("port-forward", func(t *testing.T) {
		for _, ws := range []string{"true", "false"} {
			pfCtx, cancel := context.WithCancel(ctx)
			cmd := c.KubectlCmd(pfCtx, "", "port-forward", "--address", "127.0.0.1", "pod/bb", ":8080")
			cmd.Env = append(cmd.Env, "KUBECTL_PORT_FORWARD_WEBSOCKETS="+ws)
			stdout, err := cmd.StdoutPipe()
			require.NoError(t, err)
			stderr := &syncBuffer{} // read below while kubectl writes
			cmd.Stderr = stderr
			require.NoError(t, cmd.Start())
			lines := bufio.NewScanner(stdout)
			re := regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+) -> 8080`)
			var port string
			for port == "" && lines.Scan() {
				if m := re.FindStringSubmatch(lines.Text()); m != nil {
					port = m[1]
				}
			}
			require.NotEmpty(t, port, "port-forward printed no port: %s", stderr.String())
			go func() { _, _ = io.Copy(io.Discard, stdout) }()
			hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: c.DialContext}}
			resp, err := hc.Get("http://127.0.0.1:" + port + "/index.html")
			require.NoError(t, err, "websocket=%s", ws)
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			assert.Equal(t, busyboxIndex, string(body), "websocket=%s", ws)
			hc.CloseIdleConnections()
			cancel()
			_ = cmd.Wait()
		}
	})

	t.Run("agent image Ready through kubelet probes", func(t *testing.T) {
		start := time.Now()
		require.NoError(t, c.ImportImage(ctx, agentImage))
		fig.agentImport = time.Since(start)

		// The relay, on the node IP inside the namespace.
		state := t.TempDir()
		relayAddr := net.JoinHostPort(c.NodeIP, fmt.Sprint(realNodeRelay))
		relayCtx, stopRelay := context.WithCancel(ctx)
		defer stopRelay()
		relay := c.NetnsCommand(relayCtx, srvBin, "--domain", domain, "--listen", relayAddr, "--state-dir", state,
			"--revocation-file", filepath.Join(state, "revoked"))
		relayOut := &syncBuffer{}
		relay.Stdout, relay.Stderr = relayOut, relayOut
		require.NoError(t, relay.Start())
		defer func() {
			stopRelay()
			_ = relay.Wait()
			if t.Failed() {
				t.Logf("relay output:\n%s", relayOut.String())
			}
		}()
		require.Eventually(t, func() bool {
			conn, err := c.DialContext(ctx, "tcp", relayAddr)
			if err != nil {
				return false
			}
			conn.Close()
			return true
		}, 20*time.Second, 50*time.Millisecond, "relay listening on %s", relayAddr)
		tok, err := exec.Command(srvBin, "token", "issue", "--state-dir", state, "--cluster-uid", realNodeUID, "--ttl", "1h").Output()
		require.NoError(t, err)
		relayCA, err := os.ReadFile(filepath.Join(state, "ca.crt"))
		require.NoError(t, err)

		start = time.Now()
		applyJSON(t, c, agentObjects(agentRef, strings.TrimSpace(string(tok)), string(relayCA), relayAddr)...)
		waitReady(t, c, agentNS, "deployment/spectro-proxy")
		fig.agentReady = time.Since(start)

		out, err := kubectlIn(ctx, c, "", nil, "get", "pods", "-n", agentNS, "-o",
			`jsonpath={range .items[*]}{.status.containerStatuses[0].restartCount}{" "}{end}`)
		require.NoError(t, err)
		for _, r := range strings.Fields(out) {
			if r != "0" {
				fig.agentRestarts++
			}
		}
		assert.Zero(t, fig.agentRestarts, "agent restarts: %s", out)

		// kubectl through the relay and the agents, which reach the API
		// server through the kubernetes Service (kube-proxy's DNAT).
		_, port, _ := net.SplitHostPort(relayAddr)
		kc, err := exec.Command(cliBin, "kubeconfig", "--mode", "passthrough", "--server", domain, "--port", port,
			"--cluster-uid", realNodeUID, "--connect", relayAddr, "--from", c.AdminKubeconfig).Output()
		require.NoError(t, err)
		kcFile := filepath.Join(t.TempDir(), "kubeconfig")
		require.NoError(t, os.WriteFile(kcFile, kc, 0o600))
		out, err = kubectlIn(ctx, c, kcFile, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
		require.NoError(t, err)
		assert.Equal(t, "admin", out)
		cmd := c.KubectlCmd(ctx, kcFile, "exec", "bb", "--", "sh", "-c", "exit 3")
		var ee *exec.ExitError
		require.ErrorAs(t, cmd.Run(), &ee)
		assert.Equal(t, 3, ee.ExitCode(), "exec through the relay keeps the exit code")
		fig.rss = c.ProcessRSS()
		fig.rss["relay"] = procRSS(relay.Process.Pid)
		pods, _ := kubectlIn(ctx, c, "", nil, "get", "pods", "-n", agentNS, "-o", `jsonpath={range .items[*]}{.metadata.uid}{" "}{end}`)
		fig.rss["agent pods (2)"] = c.PodsRSS(strings.Fields(pods))
	})
	if t.Failed() {
		return
	}

	// Teardown, then a second start on the same machine.
	require.NoError(t, c.Stop(), "teardown")
	fig.stop = c.Figures.Stop
	t.Logf("teardown took %v", fig.stop.Round(time.Millisecond))

	c2 := startRealNode(t)
	fig.secondStart = c2.Figures.Start
	applyJSON(t, c2, busyboxPod("bb2"))
	waitReady(t, c2, "default", "pod/bb2")
	out, err := kubectlIn(ctx, c2, "", nil, "exec", "bb2", "--", "cat", "/www/index.html")
	require.NoError(t, err)
	assert.Equal(t, busyboxIndex, out)
	require.NoError(t, c2.Stop(), "second teardown")
	fig.secondStop = c2.Figures.Stop

	if !t.Failed() {
		require.NoError(t, writeRealNodeDoc(fig))
	}
}

// agentObjects mirror what charts/spectro-proxy installs in passthrough
// mode (templates/deployment.yaml): the namespace labelled for the
// restricted Pod Security profile, the token Secret, the relay CA
// ConfigMap, the ServiceAccount and the Deployment with the chart's
// security contexts, probes and volumes. The relay is reached at its node
// IP address (--relay-address, through extraArgs in the chart).
func agentObjects(image, token, relayCA, relayAddr string) []map[string]any {
	labels := map[string]any{"app.kubernetes.io/name": "spectro-proxy", "app.kubernetes.io/instance": "spectro-proxy"}
	meta := func(name string) map[string]any {
		return map[string]any{"name": name, "namespace": agentNS, "labels": labels}
	}
	_, port, _ := net.SplitHostPort(relayAddr)
	return []map[string]any{
		{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": agentNS, "labels": map[string]any{
			"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}}},
		{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("spectro-proxy")},
		{"apiVersion": "v1", "kind": "Secret", "metadata": meta("spectro-proxy-token"), "stringData": map[string]any{"token": token}},
		{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("spectro-proxy-relay-ca"), "data": map[string]any{"ca.crt": relayCA}},
		{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("spectro-proxy"), "spec": map[string]any{
			"replicas":             2,
			"revisionHistoryLimit": 3,
			"strategy": map[string]any{"type": "RollingUpdate",
				"rollingUpdate": map[string]any{"maxSurge": 1, "maxUnavailable": 0}},
			"selector": map[string]any{"matchLabels": labels},
			"template": map[string]any{
				"metadata": map[string]any{"labels": labels},
				"spec": map[string]any{
					"serviceAccountName":            "spectro-proxy",
					"terminationGracePeriodSeconds": 35,
					"automountServiceAccountToken":  false,
					"securityContext": map[string]any{
						"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
						"seccompProfile": map[string]any{"type": "RuntimeDefault"},
					},
					"containers": []any{map[string]any{
						"name": "agent", "image": image, "imagePullPolicy": "IfNotPresent",
						"args": []string{
							"--server=" + domain, "--port=" + port, "--cluster-uid=" + realNodeUID,
							"--subdomain=cluster-" + realNodeUID, "--mode=passthrough",
							"--token-file=/etc/spectro-proxy/token/token",
							"--relay-ca-file=/etc/spectro-proxy/relay-ca/ca.crt",
							"--health-addr=:8081", "--agent-id=$(POD_NAME)", "--log-level=info",
							"--relay-address=" + relayAddr,
						},
						"env": []any{map[string]any{"name": "POD_NAME",
							"valueFrom": map[string]any{"fieldRef": map[string]any{"fieldPath": "metadata.name"}}}},
						"ports": []any{map[string]any{"name": "health", "containerPort": 8081, "protocol": "TCP"}},
						"livenessProbe": map[string]any{"httpGet": map[string]any{"path": "/healthz", "port": "health"},
							"periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
						"readinessProbe": map[string]any{"httpGet": map[string]any{"path": "/readyz", "port": "health"},
							"periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
						"resources": map[string]any{"requests": map[string]any{"cpu": "10m", "memory": "32Mi"},
							"limits": map[string]any{"memory": "128Mi"}},
						"securityContext": map[string]any{
							"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
							"capabilities":   map[string]any{"drop": []string{"ALL"}},
							"seccompProfile": map[string]any{"type": "RuntimeDefault"},
						},
						"volumeMounts": []any{
							map[string]any{"name": "token", "mountPath": "/etc/spectro-proxy/token", "readOnly": true},
							map[string]any{"name": "relay-ca", "mountPath": "/etc/spectro-proxy/relay-ca", "readOnly": true},
							map[string]any{"name": "tmp", "mountPath": "/tmp"},
						},
					}},
					"volumes": []any{
						map[string]any{"name": "token", "secret": map[string]any{"secretName": "spectro-proxy-token",
							"items": []any{map[string]any{"key": "token", "path": "token"}}}},
						map[string]any{"name": "relay-ca", "configMap": map[string]any{"name": "spectro-proxy-relay-ca",
							"items": []any{map[string]any{"key": "ca.crt", "path": "ca.crt"}}}},
						map[string]any{"name": "tmp", "emptyDir": map[string]any{"sizeLimit": "16Mi"}},
					},
					"affinity": map[string]any{"podAntiAffinity": map[string]any{
						"preferredDuringSchedulingIgnoredDuringExecution": []any{map[string]any{
							"weight": 100, "podAffinityTerm": map[string]any{
								"topologyKey": "kubernetes.io/hostname", "labelSelector": map[string]any{"matchLabels": labels}}}}}},
				},
			},
		}},
	}
}

// buildAgentImage builds the agent image as `make image` does (static
// binary, hack/mkimage) and returns the archive and its reference.
func buildAgentImage(t *testing.T) (tarball, ref string) {
	t.Helper()
	chart, err := os.ReadFile("../charts/spectro-proxy/Chart.yaml")
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^appVersion:\s*"?([^"\s]+)"?`).FindSubmatch(chart)
	require.NotNil(t, m, "appVersion in Chart.yaml")
	ref = "ghcr.io/spectroproxy/spectro-proxy-client:" + string(m[1])
	dir := t.TempDir()
	bin := filepath.Join(dir, "spectro-proxy-client")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "../client/cmd/spectro-proxy-client")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	tarball = filepath.Join(dir, "agent.tar")
	out, err = exec.Command("go", "run", "../hack/mkimage", "-arch", runtime.GOARCH, "-binary", bin, "-ref", ref,
		"-out", tarball).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return tarball, ref
}

func procRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	re := regexp.MustCompile(`VmRSS:\s+(\d+) kB`)
	if m := re.FindSubmatch(b); m != nil {
		var kb int64
		fmt.Sscan(string(m[1]), &kb)
		return kb << 10
	}
	return 0
}

func writeRealNodeDoc(f realNodeFigures) error {
	ms := func(d time.Duration) string { return d.Round(100 * time.Millisecond).String() }
	var b strings.Builder
	fmt.Fprintf(&b, `# A real node in the tests

Written by `+"`TestRealNode`"+` (e2e/realnode_test.go) on its last green run; do not edit by hand.

`+"`testcluster.Start`"+` with `+"`Options.RealNode`"+` (internal/testcluster/node_linux.go) runs etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, containerd (Debian's, with runc and the CNI bridge plugin), kubelet,
kube-proxy (iptables) and CoreDNS inside a network namespace it creates, whose only addresses are 127.0.0.1
and the node IP %s on lo and whose default route is a blackhole: no packet leaves the machine. The images are
built without Docker (pause from Kubernetes' pause.c, busybox from Debian's busybox-static, the agent as
`+"`make image`"+` builds it) and imported with `+"`ctr images import`"+`; nothing is pulled. Stop deletes the pods through
kubelet (so CNI cleans up), kills the processes and containerd's shims by PID, removes the cgroups, mounts and
files outside its directory, restores the kernel settings kubelet changes and deletes the namespace, then fails
if anything is left.

The test: node Ready; a busybox pod (cluster DNS: its resolv.conf, the `+"`kubernetes`"+` Service by name, NXDOMAIN for
anything else); the real kubectl against the API server: `+"`exec`"+` (exit code 3 from
`+"`sh -c 'exit 3'`"+`), `+"`exec -i`"+`, `+"`logs`"+`, `+"`cp`"+` both ways, `+"`port-forward`"+` over WebSocket and SPDY to busybox httpd; the agent
image in a Deployment mirroring the chart (restricted Pod Security, read-only root, RuntimeDefault seccomp),
Ready through kubelet's probes, tunnelled to a relay on the node IP; kubectl `+"`auth whoami`"+` and `+"`exec`"+` through the
relay (the agents reach the API server through the `+"`kubernetes`"+` Service); teardown; a second start.

Run it: `+"`go test -count=1 -run TestRealNode ./e2e`"+` (root; after `+"`make kube-bins`"+`). It skips, naming what is
missing, where the machine cannot run a node. The pack installed on the node as the platform does, kubectl
through the relay in both modes and Day 2: docs/realnode-pack.md (`+"`TestRealNodePack`"+`).

## Figures (%d cores, %s, load average %s at the end)

| what | time |
| --- | --- |
| start (etcd to node Ready, DNS answering) | %s |
| node Ready after start began | %s |
| busybox pod Ready after create | %s |
| agent image import | %s |
| agent Deployment (2 replicas) Available after apply | %s |
| agent restarts | %d |
| teardown | %s |
| second start after teardown | %s |
| second teardown | %s |

Resident memory with the busybox pod, 2 agent pods and the relay:

| process | RSS |
| --- | --- |
`, testcluster.DefaultNodeIP, runtime.NumCPU(), time.Now().UTC().Format("2006-01-02"), loadAvg(), ms(f.start), ms(f.ready),
		ms(f.busyboxReady), ms(f.agentImport), ms(f.agentReady), f.agentRestarts, ms(f.stop), ms(f.secondStart),
		ms(f.secondStop))
	names := make([]string, 0, len(f.rss))
	var total int64
	for n, v := range f.rss {
		names = append(names, n)
		total += v
	}
	sort.Slice(names, func(i, j int) bool { return f.rss[names[i]] > f.rss[names[j]] })
	for _, n := range names {
		fmt.Fprintf(&b, "| %s | %d MiB |\n", n, f.rss[n]>>20)
	}
	fmt.Fprintf(&b, "| total | %d MiB |\n", total>>20)
	return os.WriteFile("../docs/realnode.md", []byte(b.String()), 0o644)
}

// loadAvg is the 1-minute load average: the figures depend on what else
// the machine runs.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Fields(string(b))[0]
}
