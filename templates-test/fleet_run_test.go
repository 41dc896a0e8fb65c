package chart_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
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

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// TestRelayChartRunsFleet runs the real relay binary as the chart's fleet
// Deployment (replicas: 2) starts it, once per pod, against a real etcd that
// requires client certificates: the container's args and env with the
// Kubernetes $(VAR) expansion, its Secrets (the etcd client TLS Secret with
// its three keys among them) and ConfigMap laid out at their mount paths
// under a temporary root. Both replicas become ready, each sees the other in
// the registry, and each exits on SIGTERM within the pod's
// terminationGracePeriodSeconds. What changes from a pod: the listeners bind
// 127.0.0.1 on free ports (tests listen on loopback only) and POD_IP is
// 127.0.0.1.
func TestRelayChartRunsFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the relay and starts etcd")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	etcdBin := filepath.Join(testcluster.DefaultBinDir(), "etcd")
	if _, err := os.Stat(etcdBin); err != nil {
		t.Skipf("no etcd: %v (run hack/kube-bins.sh)", err)
	}
	etcdCA, err := pki.NewCA("etcd-ca")
	require.NoError(t, err)
	endpoint, clientCert := startTLSEtcd(ctx, t, etcdBin, etcdCA)

	bin := filepath.Join(t.TempDir(), "spectro-proxy-server")
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "../server/cmd/spectro-proxy-server").CombinedOutput()
	require.NoError(t, err, "building the relay: %s", out)

	m := renderRelay(t, fmt.Sprintf("{replicas: 2, etcd: {endpoints: [%q], tls: {existingSecret: etcd-client}}, peer: {ca: {existingSecret: peer-ca}}}", endpoint))
	d := decode[appsv1.Deployment](t, m, "Deployment/"+relayName)
	pod := d.Spec.Template.Spec
	grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second

	root := t.TempDir() // the pod's filesystem
	layOutVolumes(t, root, pod, m, map[string][]byte{
		"ca.crt": etcdCA.CertPEM, "tls.crt": clientCert.CertPEM, "tls.key": clientCert.KeyPEM,
	})

	type replica struct {
		name   string
		health string
		public string
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
		r.health, r.public = ports[":8081"], ports[":8443"]
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

	// Every series the dashboard and the alerts read, with the labels they
	// group and match by, is one this relay exports. A refusal first (bytes
	// that are no TLS), so that the refusals family has a series.
	conn, err := net.DialTimeout("tcp", replicas[0].public, 5*time.Second)
	require.NoError(t, err)
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	_, _ = conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	_, _ = io.Copy(io.Discard, conn)
	conn.Close()
	var families map[string]map[string]bool
	require.Eventually(t, func() bool {
		_, text := get(replicas[0].health, "/metrics")
		families = parseExposition(text)
		return families["spectro_proxy_refusals_total"] != nil
	}, 10*time.Second, 100*time.Millisecond, "no refusal counted")
	assertQueriesExported(t, families, fleetQueries(t))

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
// signing key and revocations from the render, a fresh peer CA, and the
// etcd client Secret's keys.
func layOutVolumes(t *testing.T, root string, pod corev1.PodSpec, m manifest, etcdClient map[string][]byte) {
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
		"etcd-tls":    etcdClient,
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

// fleetQueries are the PromQL expressions of the Grafana dashboard and of
// the PrometheusRule of a fleet.
func fleetQueries(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(relayChart, "dashboards", "relay-fleet.json"))
	require.NoError(t, err)
	var dash struct {
		Panels []struct {
			Targets []struct{ Expr string } `json:"targets"`
		} `json:"panels"`
	}
	require.NoError(t, json.Unmarshal(raw, &dash))
	var exprs []string
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	m := renderFleet(t, "metrics: {prometheusRule: {enabled: true}}")
	var pr struct {
		Spec struct {
			Groups []struct {
				Rules []struct{ Expr string } `json:"rules"`
			} `json:"groups"`
		} `json:"spec"`
	}
	require.NoError(t, yaml.Unmarshal([]byte(m.objects["PrometheusRule/"+relayName]), &pr))
	for _, g := range pr.Spec.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
		}
	}
	require.Greater(t, len(exprs), 10)
	return exprs
}

// parseExposition reads Prometheus text exposition into metric family →
// label names seen on its samples (a histogram's _bucket, _sum and _count
// samples count for the family).
func parseExposition(text string) map[string]map[string]bool {
	families := map[string]map[string]bool{}
	histograms := map[string]bool{}
	sample := regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? `)
	label := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="`)
	for _, line := range strings.Split(text, "\n") {
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			if f[3] == "histogram" || f[3] == "summary" {
				histograms[f[2]] = true
			}
			continue
		}
		m := sample.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		name := m[1]
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && histograms[base] {
				name = base
			}
		}
		if families[name] == nil {
			families[name] = map[string]bool{}
		}
		for _, l := range label.FindAllStringSubmatch(m[2], -1) {
			families[name][l[1]] = true
		}
	}
	return families
}

// assertQueriesExported checks each expression against what the relay
// exports: every metric it reads that the code defines is exported, and
// every label it groups or matches by is on one of those metrics (or is a
// label Prometheus adds to the target). Metrics only the contract names yet
// (code not merged) are logged.
func assertQueriesExported(t *testing.T, families map[string]map[string]bool, exprs []string) {
	t.Helper()
	inCode := codeMetrics(t)
	target := map[string]bool{"namespace": true, "pod": true, "job": true, "instance": true, "service": true}
	grouping := regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	matcher := regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"`)
	for _, e := range exprs {
		var read []string
		for _, n := range queriedMetrics(e) {
			if !inCode[n] {
				t.Logf("%s: not defined by the relay's code yet (contract name)", n)
				continue
			}
			if assert.Contains(t, families, n, "the relay does not export %s (%s)", n, e) {
				read = append(read, n)
			}
		}
		if len(read) == 0 {
			continue
		}
		var labels []string
		for _, g := range grouping.FindAllStringSubmatch(e, -1) {
			for _, l := range strings.Split(g[1], ",") {
				labels = append(labels, strings.TrimSpace(l))
			}
		}
		for _, m := range matcher.FindAllStringSubmatch(e, -1) {
			labels = append(labels, m[1])
		}
		for _, l := range labels {
			if l == "" || target[l] {
				continue
			}
			found := false
			for _, n := range read {
				found = found || families[n][l]
			}
			assert.True(t, found, "label %q is on none of %v (%s)", l, read, e)
		}
	}
}

// startTLSEtcd starts a lone etcd member on 127.0.0.1 that serves clients
// over TLS with a certificate from ca and requires client certificates from
// ca (--client-cert-auth), as a production etcd does. It returns the client
// URL and a client certificate for the relay, once etcd answers /health.
func startTLSEtcd(ctx context.Context, t *testing.T, bin string, ca *pki.CA) (string, *pki.Leaf) {
	t.Helper()
	dir := t.TempDir()
	server, err := ca.Issue("127.0.0.1", []string{"127.0.0.1", "localhost"}, nil, false)
	require.NoError(t, err)
	client, err := ca.Issue("spectro-proxy", nil, nil, true)
	require.NoError(t, err)
	for name, b := range map[string][]byte{"ca.crt": ca.CertPEM, "server.crt": server.CertPEM, "server.key": server.KeyPEM} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), b, 0o600))
	}
	clientURL := fmt.Sprintf("https://127.0.0.1:%d", freeLoopbackPort(t))
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", freeLoopbackPort(t))
	cmd := exec.Command(bin,
		"--name=chart-test", "--data-dir="+filepath.Join(dir, "data"),
		"--listen-client-urls="+clientURL, "--advertise-client-urls="+clientURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=chart-test="+peerURL,
		"--cert-file="+filepath.Join(dir, "server.crt"), "--key-file="+filepath.Join(dir, "server.key"),
		"--client-cert-auth", "--trusted-ca-file="+filepath.Join(dir, "ca.crt"),
		"--log-outputs="+filepath.Join(dir, "etcd.log"))
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "etcd.log"))
			t.Logf("etcd log:\n%s", b)
		}
	})

	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	pair, err := client.TLSCertificate()
	require.NoError(t, err)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}},
	}}
	defer hc.CloseIdleConnections()
	require.Eventually(t, func() bool {
		select {
		case <-exited:
			return true // reported below
		default:
		}
		resp, err := hc.Get(clientURL + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 30*time.Second, 100*time.Millisecond, "etcd never healthy")
	select {
	case <-exited:
		t.Fatal("etcd exited at start (a port taken?)")
	default:
	}
	require.NoError(t, ctx.Err())
	return clientURL, client
}
