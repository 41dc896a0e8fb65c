package chart_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// TestRelayChartRunsFleet runs the real relay binary as the chart's fleet
// Deployment starts it, twice (two pods of one Deployment), against a real
// etcd: the container's args and env with the Kubernetes $(VAR) expansion,
// its Secrets and ConfigMap laid out at their mount paths under a temporary
// root. Both replicas become ready, each sees the other in the registry, and
// each exits on SIGTERM within the pod's terminationGracePeriodSeconds.
// What changes from a pod: the listeners bind 127.0.0.1 on free ports (tests
// listen on loopback only) and POD_IP is 127.0.0.1.
func TestRelayChartRunsFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the relay and starts etcd")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	etcd, err := testcluster.StartEtcd(ctx, t.TempDir(), nil)
	if errors.Is(err, testcluster.ErrBinariesMissing) {
		t.Skipf("no etcd: %v (run hack/kube-bins.sh)", err)
	}
	require.NoError(t, err)
	t.Cleanup(etcd.Close)

	bin := filepath.Join(t.TempDir(), "spectro-proxy-server")
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "../server/cmd/spectro-proxy-server").CombinedOutput()
	require.NoError(t, err, "building the relay: %s", out)

	// One replica rendered (the test etcd speaks plain http, which the chart
	// allows only for replicas: 1); the Deployment's pods all run this spec.
	m := renderRelay(t, fmt.Sprintf("{etcd: {endpoints: [%q]}, peer: {ca: {existingSecret: peer-ca}}}", etcd.Endpoint()))
	d := decode[appsv1.Deployment](t, m, "Deployment/"+relayName)
	pod := d.Spec.Template.Spec
	grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second

	root := t.TempDir() // the pod's filesystem
	layOutVolumes(t, root, pod, m)

	type replica struct {
		name   string
		health string
		cmd    *exec.Cmd
		exited chan error
	}
	var replicas []*replica
	for _, name := range []string{relayName + "-7d9f-a", relayName + "-7d9f-b"} {
		r := &replica{name: name, exited: make(chan error, 1)}
		ports := map[string]string{}
		for _, p := range []string{":8443", ":8081", ":8444"} {
			ports[p] = fmt.Sprintf("127.0.0.1:%d", freeLoopbackPort(t))
		}
		r.health = ports[":8081"]
		env := map[string]string{"POD_IP": "127.0.0.1"}
		var environ []string
		for _, e := range pod.Containers[0].Env {
			v := e.Value
			if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
				v = map[string]string{"metadata.name": name, "status.podIP": "127.0.0.1"}[e.ValueFrom.FieldRef.FieldPath]
			}
			env[e.Name] = v
			environ = append(environ, e.Name+"="+v)
		}
		var args []string
		for _, a := range pod.Containers[0].Args {
			a = expandKubeVars(a, env)
			if flag, port, ok := strings.Cut(a, "="); ok && ports[port] != "" {
				a = flag + "=" + ports[port]
			}
			args = append(args, strings.ReplaceAll(a, "=/etc/spectro-proxy/", "="+root+"/etc/spectro-proxy/"))
		}
		r.cmd = exec.Command(bin, args...)
		r.cmd.Env = append(environ, "PATH="+os.Getenv("PATH"))
		logFile, err := os.Create(filepath.Join(t.TempDir(), "relay.log"))
		require.NoError(t, err)
		r.cmd.Stdout, r.cmd.Stderr = logFile, logFile
		require.NoError(t, r.cmd.Start(), "%v", args)
		go func() { r.exited <- r.cmd.Wait() }()
		t.Cleanup(func() {
			_ = r.cmd.Process.Kill()
			if t.Failed() {
				b, _ := os.ReadFile(logFile.Name())
				t.Logf("%s log:\n%s", r.name, b)
			}
		})
		replicas = append(replicas, r)
	}

	client := &http.Client{Timeout: 2 * time.Second}
	get := func(addr, path string) (int, string) {
		resp, err := client.Get("http://" + addr + path)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	replicasSeen := regexp.MustCompile(`(?m)^spectro_proxy_registry_replicas 2$`)
	for _, r := range replicas {
		require.Eventually(t, func() bool {
			code, _ := get(r.health, "/readyz")
			return code == http.StatusOK
		}, time.Minute, 100*time.Millisecond, "%s never ready", r.name)
		require.Eventually(t, func() bool {
			_, metrics := get(r.health, "/metrics")
			return replicasSeen.MatchString(metrics)
		}, 30*time.Second, 100*time.Millisecond, "%s does not see both replicas in etcd", r.name)
	}

	for _, r := range replicas {
		start := time.Now()
		require.NoError(t, r.cmd.Process.Signal(syscall.SIGTERM))
		select {
		case err := <-r.exited:
			require.NoError(t, err, "%s exit", r.name)
			t.Logf("%s exited %v after SIGTERM (grace period %v)", r.name, time.Since(start).Round(10*time.Millisecond), grace)
		case <-time.After(grace):
			t.Fatalf("%s still running %v after SIGTERM: kubelet would have killed it", r.name, grace)
		}
	}
}

// layOutVolumes writes what the pod's Secret and ConfigMap volumes would
// hold at their mount paths under root: a certificate for the domain, the
// signing key and revocations from the render, and a fresh peer CA.
func layOutVolumes(t *testing.T, root string, pod corev1.PodSpec, m manifest) {
	t.Helper()
	ca, err := pki.NewCA("test-ca")
	require.NoError(t, err)
	leaf, err := ca.Issue("proxy.example.com", []string{"proxy.example.com", "*.proxy.example.com"}, nil, false)
	require.NoError(t, err)
	peerCA, err := pki.NewCA("spectro-proxy-peer-ca")
	require.NoError(t, err)
	signing := decode[corev1.Secret](t, m, "Secret/"+relayName+"-signing-key")
	revocations := decode[corev1.ConfigMap](t, m, "ConfigMap/"+relayName+"-revocations")
	content := map[string]map[string][]byte{
		"tls":         {"tls.crt": leaf.CertPEM, "tls.key": leaf.KeyPEM},
		"signing-key": {"signing.key": signing.Data["signing.key"]},
		"revocations": {"revoked": []byte(revocations.Data["revoked"])},
		"peer-ca":     {"ca.crt": peerCA.CertPEM, "ca.key": peerCA.KeyPEM},
	}
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	for _, vm := range pod.Containers[0].VolumeMounts {
		dir := filepath.Join(root, vm.MountPath)
		require.NoError(t, os.MkdirAll(dir, 0o700))
		v := vols[vm.Name]
		if v.EmptyDir != nil {
			continue
		}
		data, ok := content[vm.Name]
		require.True(t, ok, "the test has no content for volume %s", vm.Name)
		var items []corev1.KeyToPath
		if v.Secret != nil {
			items = v.Secret.Items
		}
		if len(items) == 0 {
			for k := range data {
				items = append(items, corev1.KeyToPath{Key: k, Path: k})
			}
		}
		for _, it := range items {
			b, ok := data[it.Key]
			require.True(t, ok, "volume %s: no key %s", vm.Name, it.Key)
			require.NoError(t, os.WriteFile(filepath.Join(dir, it.Path), b, 0o600))
		}
	}
}

// expandKubeVars expands $(VAR) in a container arg as the kubelet does, for
// variables the container defines; others stay as written.
func expandKubeVars(s string, env map[string]string) string {
	return regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).ReplaceAllStringFunc(s, func(ref string) string {
		if v, ok := env[ref[2:len(ref)-1]]; ok {
			return v
		}
		return ref
	})
}

// freeLoopbackPort is a port on 127.0.0.1 that was free a moment ago.
func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
