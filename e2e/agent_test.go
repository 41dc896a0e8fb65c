package e2e

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
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"k8s.io/client-go/tools/clientcmd"
	api "k8s.io/client-go/tools/clientcmd/api"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/proctest"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Names the chart uses (release "spectro-proxy"): the agent's service
// account, and the ConfigMap it publishes the kubeconfig skeleton in.
const (
	chartSA        = "spectro-proxy"
	chartConfigMap = "spectro-proxy-kubeconfig"
)

// relayBinary is the shipped relay running on 127.0.0.1.
type relayBinary struct {
	addr, port, state string
}

func startRelayBinary(t *testing.T, srvBin string) *relayBinary {
	t.Helper()
	state := t.TempDir()
	addr := freeAddr(t)
	startProc(t, nil, srvBin, "--domain", domain, "--listen", addr, "--state-dir", state, "--drain-timeout", "1s")
	require.Eventually(t, func() bool { _, err := os.Stat(filepath.Join(state, "signing.key")); return err == nil },
		10*time.Second, 20*time.Millisecond)
	_, port, _ := net.SplitHostPort(addr)
	return &relayBinary{addr: addr, port: port, state: state}
}

func (r *relayBinary) caFile() string { return filepath.Join(r.state, "ca.crt") }

func (r *relayBinary) issue(t *testing.T, srvBin, uid string) string {
	t.Helper()
	tok, err := exec.Command(srvBin, "token", "issue", "--state-dir", r.state, "--cluster-uid", uid, "--ttl", "1h").Output()
	require.NoError(t, err)
	f := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(f, tok, 0o600))
	return f
}

// chartNamespace sets up what the chart creates in namespace ns before the
// agent starts: the agent's service account (its token written to a file,
// as the pod would mount it), the empty ConfigMap, and a Role allowing
// get, update and patch on that one ConfigMap. It returns the token file.
func chartNamespace(t *testing.T, c *testcluster.Cluster, ns string) string {
	t.Helper()
	ctx := context.Background()
	tok, err := c.ServiceAccountToken(ctx, ns, chartSA, time.Hour)
	require.NoError(t, err)
	// A fresh ConfigMap without data, as the chart creates it (an earlier
	// test may have left one behind for this namespace).
	_, err = c.Kubectl(ctx, "", "delete", "configmap", chartConfigMap, "-n", ns, "--ignore-not-found")
	require.NoError(t, err)
	for _, args := range [][]string{
		{"create", "configmap", chartConfigMap},
		{"create", "role", chartConfigMap, "--verb=get,update,patch", "--resource=configmaps", "--resource-name=" + chartConfigMap},
		{"create", "rolebinding", chartConfigMap, "--role=" + chartConfigMap, "--serviceaccount=" + ns + ":" + chartSA},
	} {
		if _, err := c.Kubectl(ctx, "", append(args, "-n", ns)...); err != nil && !strings.Contains(err.Error(), "already exists") {
			require.NoError(t, err)
		}
	}
	f := filepath.Join(t.TempDir(), "sa-token")
	require.NoError(t, os.WriteFile(f, []byte(tok), 0o600))
	return f
}

// chartAgent starts the shipped agent with the arguments the chart renders
// (mode auto, the kubeconfig ConfigMap, POD_NAME and POD_NAMESPACE), plus
// what a pod gets from its environment and a test must say: the API server
// and its CA, the service account token file, the relay's address (no DNS)
// and a health port on 127.0.0.1. It returns the process and its health
// address.
func chartAgent(t *testing.T, cliBin string, c *testcluster.Cluster, r *relayBinary, uid, tokenFile, saToken string, env ...string) (*proctest.Process, string) {
	t.Helper()
	health := freeAddr(t)
	ns := "cluster-" + uid
	// No proxy from the test's environment unless env says so (later
	// entries win).
	base := []string{"POD_NAME=spectro-proxy-" + uid + "-0", "POD_NAMESPACE=" + ns,
		"HTTPS_PROXY=", "https_proxy=", "HTTP_PROXY=", "http_proxy=", "NO_PROXY=", "no_proxy="}
	p := startProc(t, append(base, env...), cliBin,
		"--server="+domain, "--port="+r.port, "--cluster-uid="+uid, "--subdomain=cluster-"+uid, "--mode=auto",
		"--token-file="+tokenFile, "--relay-ca-file="+r.caFile(),
		"--health-addr="+health, "--agent-id=spectro-proxy-"+uid+"-0", "--log-level=info",
		"--kubeconfig-configmap="+chartConfigMap,
		// What KUBERNETES_SERVICE_HOST and the mounted service account give a pod:
		"--api-server="+c.URL, "--api-server-ca-file="+c.CAFile, "--service-account-token-file="+saToken,
		"--relay-address="+r.addr)
	waitHTTP(t, "http://"+health+"/healthz", 200)
	return p, health
}

// assertMode checks that a ready agent says the mode it chose everywhere
// it says it: /readyz, /metrics and its log.
func assertMode(t *testing.T, agent *proctest.Process, health string, mode tunnel.Mode) {
	t.Helper()
	waitHTTP(t, "http://"+health+"/readyz", 200)
	_, body := httpGet(t, "http://"+health+"/readyz")
	assert.Equal(t, "ok mode="+string(mode)+"\n", body)
	_, metrics := httpGet(t, "http://"+health+"/metrics")
	assert.Contains(t, metrics, `spectro_proxy_agent_mode{mode="`+string(mode)+`"} 1`)
	assert.Contains(t, agent.Output(), "registering "+string(mode))
}

// adminKubeconfig writes the passthrough kubeconfig `kubeconfig --from`
// makes of the admin's, dialing the relay, and returns its path.
func (r *relayBinary) adminKubeconfig(t *testing.T, cliBin string, c *testcluster.Cluster) string {
	t.Helper()
	kc, err := exec.Command(cliBin, "kubeconfig", "--mode", "passthrough", "--server", domain, "--port", r.port,
		"--cluster-uid", kubeUID, "--connect", r.addr, "--from", c.AdminKubeconfig).Output()
	require.NoError(t, err)
	kcFile := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kcFile, kc, 0o600))
	return kcFile
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

// publishedConfigMap waits for the agent's ConfigMap to name a mode and
// returns its data.
func publishedConfigMap(t *testing.T, c *testcluster.Cluster, ns string) map[string]string {
	t.Helper()
	var data map[string]string
	require.Eventually(t, func() bool {
		out, err := c.Kubectl(context.Background(), "", "get", "configmap", chartConfigMap, "-n", ns,
			"-o", `go-template={{range $k, $v := .data}}{{$k}}{{"\x00"}}{{$v}}{{"\x00"}}{{end}}`)
		if err != nil {
			return false
		}
		parts := strings.Split(out, "\x00")
		data = map[string]string{}
		for i := 0; i+1 < len(parts); i += 2 {
			data[parts[i]] = parts[i+1]
		}
		return data["mode"] != ""
	}, 20*time.Second, 100*time.Millisecond, "the agent never published its kubeconfig")
	return data
}

// checkSkeleton asserts the published kubeconfig: the relay host name, the
// CA for the mode, one context and no credentials. It returns the file.
func checkSkeleton(t *testing.T, data map[string]string, uid, port string, ca []byte) string {
	t.Helper()
	server := "https://cluster-" + uid + "." + domain + ":" + port
	assert.Equal(t, server, data["server"])
	cfg, err := clientcmd.Load([]byte(data["kubeconfig"]))
	require.NoError(t, err)
	require.Len(t, cfg.Contexts, 1)
	ctx := cfg.Contexts[cfg.CurrentContext]
	require.NotNil(t, ctx)
	assert.Equal(t, server, cfg.Clusters[ctx.Cluster].Server)
	assert.Equal(t, string(ca), string(cfg.Clusters[ctx.Cluster].CertificateAuthorityData))
	u := cfg.AuthInfos[ctx.AuthInfo]
	require.NotNil(t, u)
	assert.Equal(t, api.AuthInfo{LocationOfOrigin: u.LocationOfOrigin, Extensions: u.Extensions}, *u, "no user credentials")
	for _, secret := range []string{"token", "client-key", "client-certificate", "password"} {
		assert.NotContains(t, data["kubeconfig"], secret)
	}
	f := filepath.Join(t.TempDir(), "skeleton")
	require.NoError(t, os.WriteFile(f, []byte(data["kubeconfig"]), 0o600))
	return f
}

// TestChartAgentAutoPassthrough: the API server certificate carries
// cluster-kube.proxy.test (kube() adds it), so the agent registers
// passthrough, and a client-certificate kubeconfig works through the relay.
func TestChartAgentAutoPassthrough(t *testing.T) {
	c := kube(t)
	srvBin, cliBin := binaries(t)
	r := startRelayBinary(t, srvBin)
	saToken := chartNamespace(t, c, "cluster-"+kubeUID)
	agent, health := chartAgent(t, cliBin, c, r, kubeUID, r.issue(t, srvBin, kubeUID), saToken)
	assertMode(t, agent, health, tunnel.Passthrough)

	// The user's client certificate, end to end.
	kcFile := r.adminKubeconfig(t, cliBin, c)
	out, err := kubectl(context.Background(), kcFile, nil, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, testcluster.AdminUser, out)

	data := publishedConfigMap(t, c, "cluster-"+kubeUID)
	assert.Equal(t, "passthrough", data["mode"])
	skel := checkSkeleton(t, data, kubeUID, r.port, c.CAPEM)
	// The skeleton plus the user's own certificate reaches the cluster
	// (--server and --tls-server-name stand in for DNS).
	out, err = kubectl(context.Background(), skel, nil, nil, "--server", "https://"+r.addr,
		"--tls-server-name", clusterHost(kubeUID), "--client-certificate", c.AdminCertFile, "--client-key", c.AdminKeyFile,
		"auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, testcluster.AdminUser, out)
}

// TestChartAgentAutoTerminate: the certificate lacks cluster-nosan.proxy.test
// (the same API server, another cluster uid), so the agent registers
// terminate, as on EKS or AKS; a TokenRequest token of a service account
// bound to ClusterRole view works through the relay, and is no admin.
func TestChartAgentAutoTerminate(t *testing.T) {
	c := kube(t)
	srvBin, cliBin := binaries(t)
	const uid = "nosan"
	ns := "cluster-" + uid
	r := startRelayBinary(t, srvBin)
	saToken := chartNamespace(t, c, ns)
	agent, health := chartAgent(t, cliBin, c, r, uid, r.issue(t, srvBin, uid), saToken)
	assertMode(t, agent, health, tunnel.Terminate)

	// What NOTES tells the user: a bounded token from the TokenRequest API.
	ctx := context.Background()
	for _, args := range [][]string{
		{"create", "serviceaccount", "viewer", "-n", ns},
		{"create", "clusterrolebinding", ns + "-viewer", "--clusterrole=view", "--serviceaccount=" + ns + ":viewer"},
	} {
		if _, err := c.Kubectl(ctx, "", args...); err != nil && !strings.Contains(err.Error(), "already exists") {
			require.NoError(t, err)
		}
	}
	tok, err := c.Kubectl(ctx, "", "create", "token", "viewer", "-n", ns, "--duration", "1h")
	require.NoError(t, err)
	tokFile := filepath.Join(t.TempDir(), "user-token")
	require.NoError(t, os.WriteFile(tokFile, []byte(strings.TrimSpace(tok)), 0o600))
	kc, err := exec.Command(cliBin, "kubeconfig", "--mode", "terminate", "--server", domain, "--port", r.port,
		"--cluster-uid", uid, "--connect", r.addr, "--ca-file", r.caFile(), "--user-token-file", tokFile).Output()
	require.NoError(t, err)
	kcFile := filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, os.WriteFile(kcFile, kc, 0o600))

	out, err := kubectl(ctx, kcFile, nil, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, "system:serviceaccount:"+ns+":viewer", out)
	// Without a controller-manager the aggregated ClusterRole view has no
	// rules here, so the requests below are those every authenticated
	// user may make: discovery, and the access review.
	out, err = kubectl(ctx, kcFile, nil, nil, "get", "--raw", "/version")
	require.NoError(t, err)
	assert.Contains(t, out, `"gitVersion"`)
	out, err = kubectl(ctx, kcFile, nil, nil, "auth", "can-i", "*", "*")
	var exitErr *exec.ExitError
	require.True(t, errors.As(err, &exitErr), "can-i exits 1 for no: %v", err)
	assert.Equal(t, "no", strings.TrimSpace(out))

	data := publishedConfigMap(t, c, ns)
	assert.Equal(t, "terminate", data["mode"])
	relayCA, err := os.ReadFile(r.caFile())
	require.NoError(t, err)
	skel := checkSkeleton(t, data, uid, r.port, relayCA)
	out, err = kubectl(ctx, skel, nil, nil, "--server", "https://"+r.addr, "--tls-server-name", clusterHost(uid),
		"--token", strings.TrimSpace(tok), "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
	require.NoError(t, err)
	assert.Equal(t, "system:serviceaccount:"+ns+":viewer", out)

	// The user's own client certificate cannot pass the relay: refused with the reason.
	cmdOut, err := exec.Command(cliBin, "kubeconfig", "--mode", "terminate", "--server", domain, "--port", r.port,
		"--cluster-uid", uid, "--connect", r.addr, "--ca-file", r.caFile(), "--from", c.AdminKubeconfig).CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(cmdOut), `user "admin" authenticates with a client certificate, which cannot pass a relay that terminates TLS`)
	assert.Contains(t, string(cmdOut), "use passthrough mode")
}

// tinyproxy is Debian's tinyproxy on 127.0.0.1.
type tinyproxy struct {
	p       *proctest.Process
	addr    string
	logFile string
}

// startTinyproxy runs tinyproxy in the foreground with a config that
// allows CONNECT to connectPort only. auth is "user password" or "".
func startTinyproxy(t *testing.T, connectPort, auth string) *tinyproxy {
	t.Helper()
	bin, err := exec.LookPath("tinyproxy")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must install tinyproxy (.ci/run does): %v", err)
		}
		t.Skipf("tinyproxy not installed: %v", err)
	}
	dir := t.TempDir()
	addr := freeAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	tp := &tinyproxy{addr: addr, logFile: filepath.Join(dir, "tinyproxy.log")}
	conf := fmt.Sprintf("Port %s\nListen 127.0.0.1\nTimeout 600\nAllow 127.0.0.1\nConnectPort %s\nLogLevel Connect\nLogFile %q\nMaxClients 50\n",
		port, connectPort, tp.logFile)
	if auth != "" {
		conf += "BasicAuth " + auth + "\n"
	}
	confFile := filepath.Join(dir, "tinyproxy.conf")
	require.NoError(t, os.WriteFile(confFile, []byte(conf), 0o600))
	tp.p = startProc(t, nil, bin, "-d", "-c", confFile)
	require.Eventually(t, func() bool {
		conn, err := net.Dial("tcp", addr)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}, 10*time.Second, 20*time.Millisecond, "tinyproxy never listened on %s", addr)
	return tp
}

// log is what tinyproxy logged: its log file, and its output (where some
// builds log in the foreground).
func (tp *tinyproxy) log() string {
	b, _ := os.ReadFile(tp.logFile)
	return string(b) + tp.p.Output()
}

// TestChartAgentEgressProxy: with HTTPS_PROXY the agent reaches the relay
// only through a real HTTP proxy (tinyproxy), kubectl works through the
// relay, and stopping the proxy takes the tunnel down. Refusals by the
// proxy name it, never its password.
func TestChartAgentEgressProxy(t *testing.T) {
	c := kube(t)
	srvBin, cliBin := binaries(t)
	r := startRelayBinary(t, srvBin)
	tp := startTinyproxy(t, r.port, "")
	saToken := chartNamespace(t, c, "cluster-"+kubeUID)
	tokFile := r.issue(t, srvBin, kubeUID)
	proxyEnv := func(proxyURL string) []string {
		// As the chart renders proxy.httpsProxy / proxy.noProxy; the
		// in-cluster names in NO_PROXY do not match the relay.
		return []string{"HTTPS_PROXY=" + proxyURL, "NO_PROXY=.svc,.cluster.local,10.96.0.0/12", "https_proxy=", "no_proxy=", "HTTP_PROXY=", "http_proxy="}
	}
	agent, health := chartAgent(t, cliBin, c, r, kubeUID, tokFile, saToken, proxyEnv("http://"+tp.addr)...)
	waitHTTP(t, "http://"+health+"/readyz", 200)
	assert.Contains(t, agent.Output(), "the relay connection goes through an HTTP proxy")
	assert.Contains(t, tp.log(), "CONNECT "+r.addr, "tinyproxy carried the tunnel")
	assert.NotContains(t, tp.log(), strconv.Itoa(c.Port), "in-cluster calls never use the proxy")

	kcFile := r.adminKubeconfig(t, cliBin, c)
	out, err := kubectl(context.Background(), kcFile, nil, nil, "get", "namespaces", "-o", "name")
	require.NoError(t, err)
	assert.Contains(t, out, "namespace/kube-system")
	// The ConfigMap was written directly (the proxy allows the relay's
	// port only, so a proxied call would have failed).
	assert.Equal(t, "passthrough", publishedConfigMap(t, c, "cluster-"+kubeUID)["mode"])

	// Proof that the tunnel went through tinyproxy: without it, no tunnel.
	require.NoError(t, tp.p.Signal(syscall.SIGKILL))
	waitHTTP(t, "http://"+health+"/readyz", http.StatusServiceUnavailable)
	require.Eventually(t, func() bool {
		return strings.Contains(agent.Output(), "dialing proxy http://"+tp.addr+": ")
	}, 20*time.Second, 50*time.Millisecond, "the agent says it cannot reach the proxy")

	t.Run("proxy refuses the relay's port", func(t *testing.T) {
		other := startTinyproxy(t, "1", "")
		agent, health := chartAgent(t, cliBin, c, r, kubeUID, tokFile, saToken, proxyEnv("http://"+other.addr)...)
		require.Eventually(t, func() bool {
			return strings.Contains(agent.Output(), "proxy http://"+other.addr+" refused CONNECT "+r.addr+": 403 Access violation (the proxy does not allow CONNECT to the relay's address and port)")
		}, 20*time.Second, 50*time.Millisecond, "the agent names the proxy and its refusal")
		code, _ := httpGet(t, "http://"+health+"/readyz")
		assert.Equal(t, http.StatusServiceUnavailable, code)
	})

	t.Run("proxy with BasicAuth", func(t *testing.T) {
		authed := startTinyproxy(t, r.port, "agent s3cret-pw")
		wrong, wrongHealth := chartAgent(t, cliBin, c, r, kubeUID, tokFile, saToken, proxyEnv("http://agent:not-the-pw@"+authed.addr)...)
		require.Eventually(t, func() bool {
			return strings.Contains(wrong.Output(), "proxy http://agent:xxxxx@"+authed.addr+" refused CONNECT "+r.addr+
				": 401 Unauthorized (the proxy did not accept the credentials in the proxy URL)") // tinyproxy's answer
		}, 20*time.Second, 50*time.Millisecond, "the agent names the proxy and its refusal")
		code, _ := httpGet(t, "http://"+wrongHealth+"/readyz")
		assert.Equal(t, http.StatusServiceUnavailable, code)
		assert.NotContains(t, wrong.Output(), "not-the-pw", "the proxy password is never logged")
		require.NoError(t, wrong.Signal(syscall.SIGKILL))

		right, health := chartAgent(t, cliBin, c, r, kubeUID, tokFile, saToken, proxyEnv("http://agent:s3cret-pw@"+authed.addr)...)
		waitHTTP(t, "http://"+health+"/readyz", 200)
		assert.Contains(t, authed.log(), "CONNECT "+r.addr)
		assert.NotContains(t, right.Output(), "s3cret-pw", "the proxy password is never logged")
		out, err := kubectl(context.Background(), kcFile, nil, nil, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
		require.NoError(t, err)
		assert.Equal(t, testcluster.AdminUser, out)
	})
}

func TestAgentRefusals(t *testing.T) {
	_, cliBin := binaries(t)
	ca, err := pki.NewCA("test")
	require.NoError(t, err)
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	require.NoError(t, os.WriteFile(caFile, ca.CertPEM, 0o600))
	tests := []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"bad mode", []string{"--mode", "tcp"}, nil, `mode: unknown mode "tcp" (want "auto", "passthrough" or "terminate")`},
		{"proxy scheme", nil, []string{"HTTPS_PROXY=socks5://u:hunter2@127.0.0.1:1080"},
			`proxy socks5://u:xxxxx@127.0.0.1:1080: scheme "socks5" is not supported (want http:// or https://)`},
		{"configmap without namespace", []string{"--kubeconfig-configmap", "kc"}, []string{"POD_NAMESPACE="},
			"namespace is required for kubeconfig-configmap outside a pod"},
		{"configmap name", []string{"--kubeconfig-configmap", "Bad_Name", "--namespace", "ns"}, nil, `kubeconfig-configmap "Bad_Name"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--server", "p.test", "--cluster-uid", "x", "--api-server", "https://127.0.0.1:1",
				"--api-server-ca-file", caFile, "--mode", "terminate"}, tc.args...)
			cmd := exec.Command(cliBin, args...)
			cmd.Env = append(os.Environ(), tc.env...)
			out, err := cmd.CombinedOutput()
			require.Error(t, err)
			assert.Contains(t, string(out), tc.want)
			assert.NotContains(t, string(out), "hunter2")
		})
	}
}
