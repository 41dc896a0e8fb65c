package chart_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/cli"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// TestRelayHelmInstallSigningKey drives the signing key through Helm's real
// lookup against a real kube-apiserver: generated on an install into a
// namespace that --create-namespace makes after the render, kept by upgrades
// and by uninstall plus reinstall, and refused by a client-only render (what
// `helm template` and GitOps tools do).
// relayCluster starts a control plane for a relay install test (skipping
// in -short mode and when its binaries are not cached) and returns a
// context bounding the test, an admin kubeconfig file and a client. The kubeconfig embeds its certificates rather than naming
// files: client-go watches certificate files with goroutines that outlive
// the test (goleak).
func relayCluster(t *testing.T) (ctx context.Context, kubeconfig string, cs *kubernetes.Clientset) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a control plane")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	t.Cleanup(cancel)
	c, err := testcluster.Start(ctx, testcluster.Options{})
	if errors.Is(err, testcluster.ErrBinariesMissing) {
		t.Skipf("no control plane: %v (run hack/kube-bins.sh)", err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Stop() })
	raw, err := clientcmd.LoadFromFile(c.AdminKubeconfig)
	require.NoError(t, err)
	require.NoError(t, clientcmdapi.FlattenConfig(raw))
	kubeconfig = filepath.Join(t.TempDir(), "kubeconfig")
	require.NoError(t, clientcmd.WriteToFile(*raw, kubeconfig))
	restCfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	require.NoError(t, err)
	cs, err = kubernetes.NewForConfig(restCfg)
	require.NoError(t, err)
	return ctx, kubeconfig, cs
}

func TestRelayHelmInstallSigningKey(t *testing.T) {
	ctx, kubeconfig, cs := relayCluster(t)

	const ns, release = "relay-new", "relay"
	secretName := release + "-spectro-proxy-server-signing-key"
	values := merge(vals(t, relayBase), vals(t, "signingKey: {value: ''}"))
	settings := cli.New()
	settings.KubeConfig = kubeconfig
	cfg := new(action.Configuration)
	require.NoError(t, cfg.Init(settings.RESTClientGetter(), ns, "secret", t.Logf))
	key := func() string {
		t.Helper()
		s, err := cs.CoreV1().Secrets(ns).Get(ctx, secretName, metav1.GetOptions{})
		require.NoError(t, err)
		return string(s.Data["signing.key"])
	}
	install := func() {
		t.Helper()
		in := action.NewInstall(cfg)
		in.ReleaseName, in.Namespace, in.CreateNamespace, in.Timeout = release, ns, true, time.Minute
		_, err := in.RunWithContext(ctx, loadChart(t, relayChart), values)
		require.NoError(t, err)
	}

	// helm template: no cluster, no key.
	// ClientOnly swaps the Configuration's clients for fakes: use another one.
	dryCfg := new(action.Configuration)
	require.NoError(t, dryCfg.Init(settings.RESTClientGetter(), ns, "secret", t.Logf))
	dry := action.NewInstall(dryCfg)
	dry.ReleaseName, dry.Namespace, dry.DryRun, dry.ClientOnly = release, ns, true, true
	dry.KubeVersion = &chartutil.KubeVersion{Version: "v1.34.0", Major: "1", Minor: "34"} // as --kube-version
	_, err := dry.RunWithContext(ctx, loadChart(t, relayChart), values)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "set signingKey.existingSecret=spectro-proxy-signing-key")

	install()
	first := key()
	assert.Len(t, first, 64)

	// The relay pod, with the chart's default security contexts, passes Pod
	// Security "restricted" admission.
	nsObj, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	require.NoError(t, err)
	nsObj.Labels["pod-security.kubernetes.io/enforce"] = "restricted"
	_, err = cs.CoreV1().Namespaces().Update(ctx, nsObj, metav1.UpdateOptions{})
	require.NoError(t, err)
	d, err := cs.AppsV1().Deployments(ns).Get(ctx, release+"-spectro-proxy-server", metav1.GetOptions{})
	require.NoError(t, err)
	assertPodAdmitted(ctx, t, cs, *d)

	up := action.NewUpgrade(cfg)
	up.Namespace, up.Timeout = ns, time.Minute
	for range 2 {
		_, err = up.RunWithContext(ctx, release, loadChart(t, relayChart), values)
		require.NoError(t, err)
		assert.Equal(t, first, key(), "upgrade changed the signing key")
	}

	_, err = action.NewUninstall(cfg).Run(release)
	require.NoError(t, err)
	assert.Equal(t, first, key(), "uninstall keeps the key (helm.sh/resource-policy: keep)")
	install()
	assert.Equal(t, first, key(), "reinstall reuses the kept key")
}

// TestRelayHelmInstallFleet installs a relay fleet with Helm's real lookup
// against a real kube-apiserver: the peer CA is generated once, is one the
// relay can issue its peer certificates from, and stays the same across
// upgrades; the API server takes the fleet's objects as rendered (spread
// constraints with matchLabelKeys, the headless peer Service, the PDB), and
// the pod passes Pod Security "restricted".
func TestRelayHelmInstallFleet(t *testing.T) {
	ctx, kubeconfig, cs := relayCluster(t)

	const ns, release = "relay-fleet", "fleet"
	name := release + "-spectro-proxy-server"
	values := merge(vals(t, relayBase), vals(t, fleetBase), vals(t, "{peer: {ca: {existingSecret: ''}}, metrics: {grafanaDashboard: {enabled: true}}}"))
	settings := cli.New()
	settings.KubeConfig = kubeconfig
	cfg := new(action.Configuration)
	require.NoError(t, cfg.Init(settings.RESTClientGetter(), ns, "secret", t.Logf))

	// helm template: no cluster to keep the CA in.
	dryCfg := new(action.Configuration)
	require.NoError(t, dryCfg.Init(settings.RESTClientGetter(), ns, "secret", t.Logf))
	dry := action.NewInstall(dryCfg)
	dry.ReleaseName, dry.Namespace, dry.DryRun, dry.ClientOnly = release, ns, true, true
	dry.KubeVersion = &chartutil.KubeVersion{Version: "v1.34.0", Major: "1", Minor: "34"}
	_, err := dry.RunWithContext(ctx, loadChart(t, relayChart), values)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no peer CA: rendered without a cluster")

	in := action.NewInstall(cfg)
	in.ReleaseName, in.Namespace, in.CreateNamespace, in.Timeout = release, ns, true, time.Minute
	_, err = in.RunWithContext(ctx, loadChart(t, relayChart), values)
	require.NoError(t, err)

	peerCA := func() map[string][]byte {
		t.Helper()
		s, err := cs.CoreV1().Secrets(ns).Get(ctx, name+"-peer-ca", metav1.GetOptions{})
		require.NoError(t, err)
		return s.Data
	}
	first := peerCA()
	dir := t.TempDir()
	for _, k := range []string{"ca.crt", "ca.key"} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, k), first[k], 0o600))
	}
	assertUsableCA(t, dir)

	d, err := cs.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Len(t, d.Spec.Template.Spec.TopologySpreadConstraints, 2)
	assert.Equal(t, []string{"pod-template-hash"}, d.Spec.Template.Spec.TopologySpreadConstraints[0].MatchLabelKeys, "the API server kept matchLabelKeys")
	peer, err := cs.CoreV1().Services(ns).Get(ctx, name+"-peer", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, corev1.ClusterIPNone, peer.Spec.ClusterIP)
	pdb, err := cs.PolicyV1().PodDisruptionBudgets(ns).Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, 1, pdb.Spec.MaxUnavailable.IntValue())
	cm, err := cs.CoreV1().ConfigMaps(ns).Get(ctx, name+"-dashboard", metav1.GetOptions{})
	require.NoError(t, err)
	assert.True(t, json.Valid([]byte(cm.Data["spectro-proxy-relay-fleet.json"])))

	nsObj, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
	require.NoError(t, err)
	nsObj.Labels["pod-security.kubernetes.io/enforce"] = "restricted"
	_, err = cs.CoreV1().Namespaces().Update(ctx, nsObj, metav1.UpdateOptions{})
	require.NoError(t, err)
	assertPodAdmitted(ctx, t, cs, *d)

	up := action.NewUpgrade(cfg)
	up.Namespace, up.Timeout = ns, time.Minute
	for range 2 {
		_, err = up.RunWithContext(ctx, release, loadChart(t, relayChart), values)
		require.NoError(t, err)
		assert.Equal(t, first, peerCA(), "upgrade changed the peer CA")
	}
}
