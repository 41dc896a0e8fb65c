package client

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	api "k8s.io/client-go/tools/clientcmd/api"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// startCluster starts a real kube-apiserver (internal/testcluster). Without
// the binaries the test is skipped locally and fails in CI.
func startCluster(t *testing.T) *testcluster.Cluster {
	t.Helper()
	if err := testcluster.CheckBinaries("", false); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must build the control plane first: %v", err)
		}
		t.Skipf("no control plane: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	c, err := testcluster.Start(ctx, testcluster.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { c.Stop() })
	return c
}

// TestPublishAgainstAPIServer writes the kubeconfig skeleton into a real
// API server as a service account holding exactly the chart's Role: get,
// update and patch on one ConfigMap.
func TestPublishAgainstAPIServer(t *testing.T) {
	cluster := startCluster(t)
	ctx := t.Context()
	const ns, cmName, sa = "cluster-abc", "spectro-proxy-kubeconfig", "spectro-proxy"
	rc, err := clientcmd.BuildConfigFromFlags("", cluster.AdminKubeconfig)
	require.NoError(t, err)
	admin, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)

	tok, err := cluster.ServiceAccountToken(ctx, ns, sa, time.Hour) // creates ns and SA
	require.NoError(t, err)
	tokFile := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tokFile, []byte(tok), 0o600))
	_, err = admin.RbacV1().Roles(ns).Create(ctx, &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeconfig-writer"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"},
			ResourceNames: []string{cmName}, Verbs: []string{"get", "update", "patch"}}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = admin.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeconfig-writer"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "kubeconfig-writer"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: ns}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, relayCAFile := newCertPair(t)
	relayCA, err := os.ReadFile(relayCAFile)
	require.NoError(t, err)

	// A proxy in the environment is for the relay only: the writer must
	// not use it (nothing listens there).
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:1")
	t.Setenv("NO_PROXY", "")
	newAgent := func(name string) (*Client, *syncWriter) {
		return newTestClient(t, Config{APIServer: cluster.URL, APIServerCAFile: cluster.CAFile, RelayCAFile: relayCAFile,
			Port: 8443, KubeconfigConfigMap: name, Namespace: ns, ServiceAccountTokenFile: tokFile})
	}
	read := func(name string) *corev1.ConfigMap {
		cm, err := admin.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		return cm
	}

	t.Run("missing ConfigMap is retried until the chart creates it", func(t *testing.T) {
		c, logs := newAgent(cmName)
		done := make(chan struct{})
		go func() { defer close(done); c.publish(ctx, tunnel.Terminate) }()
		require.Eventually(t, func() bool { return testutilCount(c.metrics.pubErrs) >= 2 }, 20*time.Second, 10*time.Millisecond)
		assert.Contains(t, logs.String(), "ConfigMap cluster-abc/spectro-proxy-kubeconfig does not exist (the chart creates it; the agent only updates it)")
		// As the chart creates it: no data, and a key of someone else's.
		_, err := admin.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: cmName},
			Data: map[string]string{"note": "kept"}}, metav1.CreateOptions{})
		require.NoError(t, err)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("publish did not finish after the ConfigMap appeared")
		}
		assert.Equal(t, 1.0, testutilGauge(c.metrics.published))
		cm := read(cmName)
		assert.Equal(t, "kept", cm.Data["note"])
		assert.Equal(t, "terminate", cm.Data[KeyMode])
		assert.Equal(t, "https://cluster-abc.proxy.test:8443", cm.Data[KeyServer])
		checkSkeleton(t, cm.Data[KeyKubeconfig], "https://cluster-abc.proxy.test:8443", relayCA)
	})

	t.Run("after a restart in another mode the ConfigMap follows", func(t *testing.T) {
		c, _ := newAgent(cmName)
		c.publish(ctx, tunnel.Passthrough)
		cm := read(cmName)
		assert.Equal(t, "passthrough", cm.Data[KeyMode])
		checkSkeleton(t, cm.Data[KeyKubeconfig], "https://cluster-abc.proxy.test:8443", cluster.CAPEM)
		rv := cm.ResourceVersion
		c.publish(ctx, tunnel.Passthrough)
		assert.Equal(t, rv, read(cmName).ResourceVersion, "nothing to change, nothing written")
	})

	t.Run("the Role allows that one ConfigMap only", func(t *testing.T) {
		_, err := admin.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "other"}}, metav1.CreateOptions{})
		require.NoError(t, err)
		c, logs := newAgent("other")
		pctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); c.publish(pctx, tunnel.Passthrough) }()
		require.Eventually(t, func() bool { return testutilCount(c.metrics.pubErrs) >= 1 }, 20*time.Second, 10*time.Millisecond)
		cancel()
		<-done
		assert.Contains(t, logs.String(), "reading ConfigMap cluster-abc/other (the agent's service account needs get and update on it)")
		assert.Empty(t, read("other").Data)
	})
}

// checkSkeleton asserts a kubeconfig with server and ca, and no credentials.
func checkSkeleton(t *testing.T, kc, server string, ca []byte) {
	t.Helper()
	cfg, err := clientcmd.Load([]byte(kc))
	require.NoError(t, err)
	require.Len(t, cfg.Contexts, 1)
	ctx := cfg.Contexts[cfg.CurrentContext]
	require.NotNil(t, ctx)
	cl := cfg.Clusters[ctx.Cluster]
	require.NotNil(t, cl)
	assert.Equal(t, server, cl.Server)
	assert.Equal(t, string(ca), string(cl.CertificateAuthorityData))
	u := cfg.AuthInfos[ctx.AuthInfo]
	require.NotNil(t, u)
	assert.Equal(t, api.AuthInfo{LocationOfOrigin: u.LocationOfOrigin, Extensions: u.Extensions}, *u, "no user credentials")
}
