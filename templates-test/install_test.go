package chart_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/cli"
	"helm.sh/helm/v3/pkg/release"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// installer installs charts with the Helm SDK into a real kube-apiserver
// (internal/testcluster).
type installer struct {
	ctx      context.Context
	settings *cli.EnvSettings
	restCfg  *rest.Config
	cs       kubernetes.Interface
}

func (in *installer) config(t *testing.T, namespace string) *action.Configuration {
	t.Helper()
	cfg := new(action.Configuration)
	require.NoError(t, cfg.Init(in.settings.RESTClientGetter(), namespace, "secret", t.Logf))
	return cfg
}

func (in *installer) install(t *testing.T, namespace, name string, ch *chart.Chart, values map[string]any) (*release.Release, error) {
	t.Helper()
	install := action.NewInstall(in.config(t, namespace))
	install.ReleaseName = name
	install.Namespace = namespace
	install.Timeout = time.Minute
	return install.RunWithContext(in.ctx, ch, values)
}

func (in *installer) uninstall(t *testing.T, namespace, name string) {
	t.Helper()
	_, err := action.NewUninstall(in.config(t, namespace)).Run(name)
	require.NoError(t, err)
}

// createNamespace creates a namespace, as the platform does for a pack's
// pack.namespace, enforcing Pod Security "restricted" so that the agent
// pods are judged by it.
func (in *installer) createNamespace(t *testing.T, name string) {
	t.Helper()
	_, err := in.cs.CoreV1().Namespaces().Create(in.ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name:   name,
		Labels: map[string]string{"pod-security.kubernetes.io/enforce": "restricted"},
	}}, metav1.CreateOptions{})
	require.NoError(t, err)
}

// objects returns the release's objects as they are on the API server,
// failing when one is missing.
func (in *installer) objects(t *testing.T, namespace string, rel *release.Release) []string {
	t.Helper()
	resources, err := in.config(t, namespace).KubeClient.Build(strings.NewReader(rel.Manifest), false)
	require.NoError(t, err)
	require.NotEmpty(t, resources)
	var kinds []string
	for _, info := range resources {
		require.NoError(t, info.Get(), "%s %s/%s", info.Mapping.GroupVersionKind.Kind, info.Namespace, info.Name)
		kinds = append(kinds, info.Mapping.GroupVersionKind.Kind+"/"+info.Name)
	}
	return kinds
}

// gone checks that the objects of an uninstalled release are gone, except
// what is kept on purpose.
func (in *installer) gone(t *testing.T, namespace string, rel *release.Release, kept ...string) {
	t.Helper()
	resources, err := in.config(t, namespace).KubeClient.Build(strings.NewReader(rel.Manifest), false)
	require.NoError(t, err)
	for _, info := range resources {
		key := info.Mapping.GroupVersionKind.Kind + "/" + info.Name
		err := info.Get()
		if contains(kept, key) {
			assert.NoError(t, err, "%s kept on uninstall", key)
			continue
		}
		if info.Mapping.GroupVersionKind.Kind == "Secret" && err == nil && strings.HasSuffix(info.Name, "-signing-key") {
			continue // helm.sh/resource-policy: keep (the relay's signing key) survives on purpose.
		}
		assert.True(t, apierrors.IsNotFound(err), "%s %s still there after uninstall (err %v)", key, info.Namespace, err)
	}
}

func contains(l []string, s string) bool {
	for _, e := range l {
		if e == s {
			return true
		}
	}
	return false
}

// can asks the API server whether a service account may do verb on
// resource (name optional) in namespace.
func (in *installer) can(t *testing.T, saNamespace, sa, verb, resource, namespace, name string) bool {
	t.Helper()
	resource, sub, _ := strings.Cut(resource, "/")
	r, err := in.cs.AuthorizationV1().SubjectAccessReviews().Create(in.ctx, &authorizationv1.SubjectAccessReview{
		Spec: authorizationv1.SubjectAccessReviewSpec{
			User:   "system:serviceaccount:" + saNamespace + ":" + sa,
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + saNamespace, "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Namespace: namespace, Verb: verb, Resource: resource, Subresource: sub, Name: name,
			},
		},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	return r.Status.Allowed
}

// TestHelmInstall installs the packs the way the platform does, the agent
// chart in the namespace cases, and the relay chart, with the Helm SDK into
// a real kube-apiserver; checks that the API server accepted every object
// (the agent pods against Pod Security "restricted" too) and what the
// service accounts may do; then uninstalls. It skips when the control-plane
// binaries are not cached (`make kube-bins`).
func TestHelmInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	c, err := testcluster.Start(ctx, testcluster.Options{})
	if errors.Is(err, testcluster.ErrBinariesMissing) {
		t.Skipf("no control plane: %v (run make kube-bins)", err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Stop() })

	restCfg, err := clientcmd.BuildConfigFromFlags("", c.AdminKubeconfig)
	require.NoError(t, err)
	cs, err := kubernetes.NewForConfig(restCfg)
	require.NoError(t, err)
	in := &installer{ctx: ctx, settings: cli.New(), restCfg: restCfg, cs: cs}
	in.settings.KubeConfig = c.AdminKubeconfig

	for i, v := range packVersions {
		t.Run("pack "+v+" unedited", func(t *testing.T) {
			// Each version on its own cluster UID, so that namespaces and
			// ClusterRoleBinding names do not collide.
			uid := fmt.Sprintf("%024d", i+1)
			system := merge(sampleSystem(t), map[string]any{"cluster": map[string]any{"uid": uid, "name": "c" + uid}})
			p := preparePack(t, v, system)
			require.Equal(t, "cluster-"+uid, p.namespace)
			in.createNamespace(t, p.namespace)

			rel, err := in.install(t, p.namespace, "spectro-proxy", p.chart, p.values)
			require.NoError(t, err)
			assert.Equal(t, "deployed", rel.Info.Status.String())
			assert.Equal(t, v, rel.Chart.Metadata.Version)
			kinds := in.objects(t, p.namespace, rel)
			t.Logf("installed %v", kinds)
			assert.NotContains(t, strings.Join(kinds, " "), "Namespace/")

			deps, err := cs.AppsV1().Deployments(p.namespace).List(ctx, metav1.ListOptions{})
			require.NoError(t, err)
			require.Len(t, deps.Items, 1)
			assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:"+v, deps.Items[0].Spec.Template.Spec.Containers[0].Image)
			assertPodAdmitted(ctx, t, cs, deps.Items[0])
			in.assertLeastPrivilege(t, p.namespace)

			in.uninstall(t, p.namespace, "spectro-proxy")
			in.gone(t, p.namespace, rel)
		})
	}

	t.Run("pack 1.3.0 upgrade keeps the agent's kubeconfig", func(t *testing.T) {
		uid := "aaaaaaaaaaaaaaaaaaaaaaaa"
		system := merge(sampleSystem(t), map[string]any{"cluster": map[string]any{"uid": uid}})
		p := preparePack(t, "1.3.0", system)
		in.createNamespace(t, p.namespace)
		_, err := in.install(t, p.namespace, "spectro-proxy", p.chart, p.values)
		require.NoError(t, err)

		// The agent, as its service account, writes the ConfigMap.
		agentCfg := rest.CopyConfig(restCfg)
		agentCfg.Impersonate = rest.ImpersonationConfig{
			UserName: "system:serviceaccount:" + p.namespace + ":spectro-proxy",
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + p.namespace, "system:authenticated"},
		}
		agent, err := kubernetes.NewForConfig(agentCfg)
		require.NoError(t, err)
		cms := agent.CoreV1().ConfigMaps(p.namespace)
		cm, err := cms.Get(ctx, "spectro-proxy-kubeconfig", metav1.GetOptions{})
		require.NoError(t, err)
		assert.Empty(t, cm.Data)
		cm.Data = map[string]string{"mode": "terminate", "server": "https://cluster-" + uid + "." + sampleServer, "kubeconfig": "apiVersion: v1\nkind: Config\n"}
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		require.NoError(t, err)
		_, err = cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "other"}}, metav1.CreateOptions{})
		assert.True(t, apierrors.IsForbidden(err), "the agent may only touch its ConfigMap: %v", err)
		_, err = cms.Get(ctx, "spectro-proxy-relay-ca", metav1.GetOptions{})
		assert.True(t, apierrors.IsForbidden(err), "%v", err)

		upgrade := action.NewUpgrade(in.config(t, p.namespace))
		upgrade.Namespace = p.namespace
		upgrade.Timeout = time.Minute
		p2 := preparePack(t, "1.3.0", system, vals(t, "{replicas: 3, mode: terminate}"))
		rel, err := upgrade.RunWithContext(ctx, "spectro-proxy", p2.chart, p2.values)
		require.NoError(t, err)
		assert.Equal(t, 2, rel.Version)
		cm, err = cs.CoreV1().ConfigMaps(p.namespace).Get(ctx, "spectro-proxy-kubeconfig", metav1.GetOptions{})
		require.NoError(t, err)
		assert.Equal(t, "terminate", cm.Data["mode"], "helm upgrade left the agent's data alone")
		in.uninstall(t, p.namespace, "spectro-proxy")
	})

	t.Run("token from the existing Secret", func(t *testing.T) {
		uid := "bbbbbbbbbbbbbbbbbbbbbbbb"
		system := merge(sampleSystem(t), map[string]any{"cluster": map[string]any{"uid": uid}, "reverseproxy": map[string]any{"token": nil}})
		p := preparePack(t, "1.3.0", system)
		in.createNamespace(t, p.namespace)

		_, err := in.install(t, p.namespace, "spectro-proxy", p.chart, p.values)
		require.Error(t, err, "neither a token value nor the Secret")
		assert.Contains(t, err.Error(), "spectro-proxy: no tunnel token: no token value is set and the Secret "+p.namespace+"/spectro-proxy-token does not exist: "+
			"set spectro.system.reverseproxy.token (Palette sets it for each cluster) or token.value, or create the Secret spectro-proxy-token with the key token in namespace "+p.namespace)

		secret, err := cs.CoreV1().Secrets(p.namespace).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: "spectro-proxy-token"},
			StringData: map[string]string{"tok": sampleToken},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		_, err = in.install(t, p.namespace, "spectro-proxy", p.chart, p.values)
		require.Error(t, err, "the Secret lacks the key")
		assert.Contains(t, err.Error(), "spectro-proxy: no tunnel token: the Secret "+p.namespace+"/spectro-proxy-token has no key token (set token.key to the key that holds the token)")

		secret.Data = map[string][]byte{"token": []byte(sampleToken)}
		_, err = cs.CoreV1().Secrets(p.namespace).Update(ctx, secret, metav1.UpdateOptions{})
		require.NoError(t, err)
		rel, err := in.install(t, p.namespace, "spectro-proxy", p.chart, p.values)
		require.NoError(t, err)
		d := releaseDeployment(t, rel)
		assert.Equal(t, "spectro-proxy-token", volumes(d.Spec.Template.Spec)["token"].Secret.SecretName)
		assert.NotContains(t, rel.Manifest, "kind: Secret")
		in.uninstall(t, p.namespace, "spectro-proxy")
		_, err = cs.CoreV1().Secrets(p.namespace).Get(ctx, "spectro-proxy-token", metav1.GetOptions{})
		assert.NoError(t, err, "the user's Secret stays")
	})

	agentValues := func(t *testing.T, extra string) map[string]any {
		return merge(packValues(t, "1.3.0"), sampleCluster(t), vals(t, extra))
	}
	t.Run("namespace that does not exist", func(t *testing.T) {
		_, err := in.install(t, releaseNamespace, "agent-missing", loadChart(t, agentChart), agentValues(t, "namespace: spectro-proxy-missing"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "spectro-proxy: namespace spectro-proxy-missing does not exist: install into it "+
			"(helm install --namespace spectro-proxy-missing --create-namespace), create it first (kubectl create namespace spectro-proxy-missing), or set createNamespace=true")
	})
	t.Run("createNamespace creates the namespace and uninstall keeps it", func(t *testing.T) {
		rel, err := in.install(t, releaseNamespace, "agent-ns", loadChart(t, agentChart), agentValues(t, "{namespace: spectro-proxy-created, createNamespace: true}"))
		require.NoError(t, err)
		kinds := in.objects(t, releaseNamespace, rel)
		assert.Contains(t, kinds, "Namespace/spectro-proxy-created")
		deps, err := cs.AppsV1().Deployments("spectro-proxy-created").List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		require.Len(t, deps.Items, 1)
		assertPodAdmitted(ctx, t, cs, deps.Items[0])

		// An upgrade that no longer asks for the namespace keeps it in the
		// release: dropping it would make Helm delete it with all it holds.
		upgrade := action.NewUpgrade(in.config(t, releaseNamespace))
		upgrade.Namespace = releaseNamespace
		rel, err = upgrade.RunWithContext(ctx, "agent-ns", loadChart(t, agentChart), agentValues(t, "{namespace: spectro-proxy-created, createNamespace: false}"))
		require.NoError(t, err)
		assert.Contains(t, in.objects(t, releaseNamespace, rel), "Namespace/spectro-proxy-created")

		in.uninstall(t, releaseNamespace, "agent-ns")
		in.gone(t, releaseNamespace, rel, "Namespace/spectro-proxy-created")
		ns, err := cs.CoreV1().Namespaces().Get(ctx, "spectro-proxy-created", metav1.GetOptions{})
		require.NoError(t, err)
		assert.Nil(t, ns.DeletionTimestamp, "helm.sh/resource-policy: keep")
	})
	t.Run("existing namespace", func(t *testing.T) {
		in.createNamespace(t, "spectro-proxy-existing")
		for _, create := range []string{"false", "true"} {
			rel, err := in.install(t, releaseNamespace, "agent-existing", loadChart(t, agentChart),
				agentValues(t, "{namespace: spectro-proxy-existing, createNamespace: "+create+"}"))
			require.NoError(t, err, "createNamespace=%s", create)
			assert.NotContains(t, in.objects(t, releaseNamespace, rel), "Namespace/spectro-proxy-existing", "not adopted")
			in.uninstall(t, releaseNamespace, "agent-existing")
			ns, err := cs.CoreV1().Namespaces().Get(ctx, "spectro-proxy-existing", metav1.GetOptions{})
			require.NoError(t, err)
			assert.Nil(t, ns.DeletionTimestamp)
		}
	})
	t.Run("kube-system is never rendered", func(t *testing.T) {
		rel, err := in.install(t, releaseNamespace, "agent-kube-system", loadChart(t, agentChart),
			agentValues(t, "{namespace: kube-system, createNamespace: true}"))
		require.NoError(t, err)
		assert.NotContains(t, in.objects(t, releaseNamespace, rel), "Namespace/kube-system")
		in.uninstall(t, releaseNamespace, "agent-kube-system")
		ns, err := cs.CoreV1().Namespaces().Get(ctx, "kube-system", metav1.GetOptions{})
		require.NoError(t, err)
		assert.Nil(t, ns.DeletionTimestamp)
	})

	t.Run("relay", func(t *testing.T) {
		rel, err := in.install(t, releaseNamespace, "relay", loadChart(t, relayChart), merge(vals(t, relayBase), vals(t, "signingKey: {value: ''}")))
		require.NoError(t, err)
		t.Logf("installed %v", in.objects(t, releaseNamespace, rel))
		in.uninstall(t, releaseNamespace, "relay")
		in.gone(t, releaseNamespace, rel)
	})
}

// assertLeastPrivilege: the kubeconfig service account (terminate mode) may
// read but not everything, and the agent's own account may only update its
// kubeconfig ConfigMap.
func (in *installer) assertLeastPrivilege(t *testing.T, ns string) {
	t.Helper()
	const kc, agent = "spectro-proxy-kubeconfig", "spectro-proxy"
	assert.False(t, in.can(t, ns, kc, "*", "*", "", ""), "kubectl auth can-i '*' '*' answers no")
	assert.False(t, in.can(t, ns, kc, "get", "secrets", ns, ""), "view reads no Secrets")
	assert.False(t, in.can(t, ns, kc, "create", "serviceaccounts/token", ns, kc), "cannot mint its own tokens")
	// The built-in view role gets its rules from system:aggregate-to-view
	// through the aggregation controller of kube-controller-manager, which
	// this control plane does not run: check the positive case only when it
	// has them.
	view, err := in.cs.RbacV1().ClusterRoles().Get(in.ctx, "view", metav1.GetOptions{})
	require.NoError(t, err)
	if len(view.Rules) > 0 {
		assert.True(t, in.can(t, ns, kc, "list", "pods", "kube-system", ""), "view")
	} else {
		t.Logf("ClusterRole view has no rules here (no aggregation controller)")
	}

	assert.True(t, in.can(t, ns, agent, "update", "configmaps", ns, "spectro-proxy-kubeconfig"))
	assert.True(t, in.can(t, ns, agent, "get", "configmaps", ns, "spectro-proxy-kubeconfig"))
	assert.False(t, in.can(t, ns, agent, "update", "configmaps", ns, "other"))
	assert.False(t, in.can(t, ns, agent, "list", "configmaps", ns, ""))
	assert.False(t, in.can(t, ns, agent, "get", "secrets", ns, "spectro-proxy-agent-token"))
}

func releaseDeployment(t *testing.T, rel *release.Release) *appsv1.Deployment {
	t.Helper()
	for _, doc := range releaseutil.SplitManifests(rel.Manifest) {
		if strings.Contains(doc, "\nkind: Deployment\n") {
			d := new(appsv1.Deployment)
			require.NoError(t, yaml.Unmarshal([]byte(doc), d))
			return d
		}
	}
	t.Fatal("no Deployment in the release")
	return nil
}

func assertPodAdmitted(ctx context.Context, t *testing.T, cs kubernetes.Interface, d appsv1.Deployment) {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: d.Name + "-admission-check", Namespace: d.Namespace, Labels: d.Spec.Template.Labels},
		Spec:       d.Spec.Template.Spec,
	}
	created, err := cs.CoreV1().Pods(d.Namespace).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"})
	require.NoError(t, err, "pod of %s rejected", d.Name)
	out, _ := yaml.Marshal(created.Spec.SecurityContext)
	t.Logf("pod of %s admitted with securityContext %s", d.Name, out)

	// Control: the same pod without its seccomp profile is refused, so the
	// admission above was a real Pod Security check.
	bad := pod.DeepCopy()
	bad.Spec.SecurityContext.SeccompProfile = nil
	for i := range bad.Spec.Containers {
		bad.Spec.Containers[i].SecurityContext.SeccompProfile = nil
	}
	_, err = cs.CoreV1().Pods(d.Namespace).Create(ctx, bad, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
	require.Error(t, err, "Pod Security admission is not enforcing")
	assert.Contains(t, err.Error(), `violates PodSecurity "restricted:latest"`)
}
