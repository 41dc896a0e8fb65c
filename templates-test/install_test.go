package chart_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/cli"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"

	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// TestHelmInstall installs both charts with the Helm SDK into a real
// kube-apiserver (internal/testcluster), checks that the API server accepted
// every object (the agent pods against the namespace's Pod Security
// "restricted" enforcement too), then uninstalls and checks they are gone.
// It skips when the control-plane binaries are not cached (`hack/kube-bins.sh`).
func TestHelmInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	c, err := testcluster.Start(ctx, testcluster.Options{})
	if errors.Is(err, testcluster.ErrBinariesMissing) {
		t.Skipf("no control plane: %v (run hack/kube-bins.sh)", err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Stop() })

	restCfg, err := clientcmd.BuildConfigFromFlags("", c.AdminKubeconfig)
	require.NoError(t, err)
	cs, err := kubernetes.NewForConfig(restCfg)
	require.NoError(t, err)

	cases := []struct {
		name, release, chart string
		values               map[string]any
		podNamespace         string // namespace whose pods must pass Pod Security "restricted"
	}{
		{
			name: "agent passthrough, pack 1.3.0, dashboards", release: "agent-pt", chart: agentChart,
			values:       merge(packValues(t, "1.3.0"), sampleCluster(t), vals(t, "{k8sDashboardIntegration: {enabled: true}, vmwareDashboard: {enabled: true}}")),
			podNamespace: sampleNS,
		},
		{
			name: "agent terminate, pack 1.0.0", release: "agent-term", chart: agentChart,
			values: merge(packValues(t, "1.0.0"), sampleCluster(t), vals(t, `
mode: terminate
relayCA: {pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}
spectro: {system: {cluster: {uid: 0123456789abcdef01234567}}}
`)),
			podNamespace: "cluster-0123456789abcdef01234567",
		},
		{
			name: "relay", release: "relay", chart: relayChart,
			values: merge(vals(t, relayBase), vals(t, "signingKey: {value: ''}")),
		},
	}
	settings := cli.New()
	settings.KubeConfig = c.AdminKubeconfig
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := new(action.Configuration)
			require.NoError(t, cfg.Init(settings.RESTClientGetter(), releaseNamespace, "secret", t.Logf))

			install := action.NewInstall(cfg)
			install.ReleaseName = tc.release
			install.Namespace = releaseNamespace
			install.Timeout = time.Minute
			rel, err := install.RunWithContext(ctx, loadChart(t, tc.chart), tc.values)
			require.NoError(t, err)
			assert.Equal(t, "deployed", rel.Info.Status.String())

			// Every object of the release exists on the API server.
			resources, err := cfg.KubeClient.Build(strings.NewReader(rel.Manifest), false)
			require.NoError(t, err)
			require.NotEmpty(t, resources)
			var kinds []string
			for _, info := range resources {
				require.NoError(t, info.Get(), "%s %s/%s", info.Mapping.GroupVersionKind.Kind, info.Namespace, info.Name)
				kinds = append(kinds, info.Mapping.GroupVersionKind.Kind+"/"+info.Name)
			}
			t.Logf("installed %v", kinds)

			if tc.podNamespace != "" {
				ns, err := cs.CoreV1().Namespaces().Get(ctx, tc.podNamespace, metav1.GetOptions{})
				require.NoError(t, err)
				assert.Equal(t, "restricted", ns.Labels["pod-security.kubernetes.io/enforce"])
				// No controller-manager runs here, so no pod is created from the
				// Deployment: create one from its template, as a server-side dry
				// run, so that Pod Security admission judges it.
				deps, err := cs.AppsV1().Deployments(tc.podNamespace).List(ctx, metav1.ListOptions{})
				require.NoError(t, err)
				require.Len(t, deps.Items, 1)
				assertPodAdmitted(ctx, t, cs, deps.Items[0])
			}

			_, err = action.NewUninstall(cfg).Run(tc.release)
			require.NoError(t, err)
			for _, info := range resources {
				err := info.Get()
				if info.Mapping.GroupVersionKind.Kind == "Namespace" && err == nil {
					// Without a namespace controller a deleted namespace stays Terminating.
					ns := info.Object.(interface{ GetDeletionTimestamp() *metav1.Time })
					assert.NotNil(t, ns.GetDeletionTimestamp(), "namespace %s not deleted", info.Name)
					continue
				}
				if info.Mapping.GroupVersionKind.Kind == "Secret" && err == nil {
					// helm.sh/resource-policy: keep (the relay's signing key) survives on purpose.
					assert.True(t, strings.HasSuffix(info.Name, "-signing-key"), "secret %s left behind", info.Name)
					continue
				}
				assert.True(t, apierrors.IsNotFound(err), "%s %s/%s still there after uninstall (err %v)",
					info.Mapping.GroupVersionKind.Kind, info.Namespace, info.Name, err)
			}
		})
	}
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
