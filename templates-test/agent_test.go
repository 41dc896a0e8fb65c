package chart_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/chart"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
)

// packVersions are the documented pack versions under packs/spectro-proxy/.
var packVersions = []string{"1.0.0", "1.1.0", "1.2.0", "1.3.0"}

const (
	sampleUID    = "6582c4a5d1e2b3f4a5b6c7d8"
	sampleServer = "proxy.example.com"
	sampleNS     = "cluster-" + sampleUID
	sampleToken  = "spx1.eyJjbHVzdGVyIjoiNjU4MmM0YTVkMWUyYjNmNGE1YjZjN2Q4In0.c2lnbmF0dXJl"
)

var sampleHost = hostname.Host(hostname.DefaultSubdomain(sampleUID), sampleServer)

// sampleCluster is what the platform provides for a cluster: its
// spectro.system values, the agent's tunnel token included.
func sampleCluster(t *testing.T) map[string]any {
	return readValues(t, "testdata/sample-cluster.yaml")
}

// packValues are the chart values of a pack version (charts.spectro-proxy of
// its values.yaml) as written: the chart resolves their macros itself.
func packValues(t *testing.T, version string) map[string]any {
	t.Helper()
	all := readValues(t, filepath.Join(packDir(version), "values.yaml"))
	charts, ok := all["charts"].(map[string]any)
	require.True(t, ok, "values.yaml of pack %s has no charts section", version)
	v, ok := charts["spectro-proxy"].(map[string]any)
	require.True(t, ok, "values.yaml of pack %s has no charts.spectro-proxy", version)
	return v
}

func packDir(version string) string { return filepath.Join("..", "packs", "spectro-proxy", version) }

// renderPack renders the agent chart source with a pack version's values, the
// sample cluster and the extra overrides.
func renderPack(t *testing.T, version string, extra ...map[string]any) manifest {
	t.Helper()
	all := append([]map[string]any{packValues(t, version), sampleCluster(t)}, extra...)
	return parse(t, mustRender(t, agentChart, merge(all...)))
}

func agentArgs(t *testing.T, m manifest) []string {
	d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
	require.Len(t, d.Spec.Template.Spec.Containers, 1)
	return d.Spec.Template.Spec.Containers[0].Args
}

// Cases in testdata/values/<case>.yaml are layered over pack 1.3.0 and the
// sample cluster and compared with testdata/values/<case>.golden.
func TestValuesCasesGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/values/*.yaml")
	require.NoError(t, err)
	require.NotEmpty(t, files)
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(name, func(t *testing.T) {
			out := mustRender(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t), readValues(t, f)))
			assertGolden(t, filepath.Join("values", name), goldenText(out))
		})
	}
}

// The chart source with each pack's values, installed with plain Helm into
// the default namespace: the objects, their wiring and the restricted defaults.
func TestAgentTyped(t *testing.T) {
	kubeconfigSA := "ServiceAccount/spectro-proxy-kubeconfig"
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			m := renderPack(t, v)
			assert.Equal(t, []string{
				"ClusterRoleBinding/spectro-proxy-kubeconfig-" + sampleNS,
				"ConfigMap/spectro-proxy-kubeconfig",
				"Deployment/spectro-proxy",
				"PodDisruptionBudget/spectro-proxy",
				"Role/spectro-proxy-kubeconfig-writer",
				"RoleBinding/spectro-proxy-kubeconfig-writer",
				"Secret/spectro-proxy-agent-token",
				"ServiceAccount/spectro-proxy",
				kubeconfigSA,
			}, m.kinds(), "no Namespace unless createNamespace")

			d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
			assert.Equal(t, sampleNS, d.Namespace)
			require.NotNil(t, d.Spec.Replicas)
			assert.Equal(t, int32(2), *d.Spec.Replicas)
			pod := d.Spec.Template
			assertLabels(t, pod.Labels)
			assertLabels(t, d.Labels)
			for k, v := range d.Spec.Selector.MatchLabels {
				assert.Equal(t, v, pod.Labels[k], "selector label %s", k)
			}
			assert.Equal(t, "spectro-proxy", pod.Spec.ServiceAccountName)
			require.NotNil(t, pod.Spec.AutomountServiceAccountToken)
			assert.True(t, *pod.Spec.AutomountServiceAccountToken, "the agent reads the cluster CA and writes its ConfigMap")

			c := pod.Spec.Containers[0]
			assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:"+agentPinnedVersion, c.Image)
			assert.Equal(t, []string{
				"--server=" + sampleServer,
				"--port=443",
				"--cluster-uid=" + sampleUID,
				"--subdomain=cluster-" + sampleUID,
				"--mode=auto",
				"--token-file=/etc/spectro-proxy/token/token",
				"--kubeconfig-configmap=spectro-proxy-kubeconfig",
				"--health-addr=:8081",
				"--agent-id=$(POD_NAME)",
				"--log-level=info",
				"--tunnels=auto",
			}, c.Args)
			require.Len(t, c.Env, 2)
			assert.Equal(t, "POD_NAME", c.Env[0].Name)
			assert.Equal(t, "metadata.name", c.Env[0].ValueFrom.FieldRef.FieldPath)
			assert.Equal(t, "POD_NAMESPACE", c.Env[1].Name)
			assert.Equal(t, "metadata.namespace", c.Env[1].ValueFrom.FieldRef.FieldPath)
			assertProbes(t, c)
			assertRestricted(t, pod.Spec)

			// The token Secret is mounted where --token-file points.
			assert.Contains(t, c.VolumeMounts, corev1.VolumeMount{Name: "token", MountPath: "/etc/spectro-proxy/token", ReadOnly: true})
			vols := volumes(pod.Spec)
			assert.Equal(t, "spectro-proxy-agent-token", vols["token"].Secret.SecretName)
			assert.Equal(t, []corev1.KeyToPath{{Key: "token", Path: "token"}}, vols["token"].Secret.Items)
			sec := decode[corev1.Secret](t, m, "Secret/spectro-proxy-agent-token")
			assert.Equal(t, sampleNS, sec.Namespace)
			assert.Equal(t, sampleToken, string(sec.Data["token"]), "from spectro.system.reverseproxy.token")

			// Replicas spread over nodes.
			aa := pod.Spec.Affinity.PodAntiAffinity.PreferredDuringSchedulingIgnoredDuringExecution
			require.Len(t, aa, 1)
			assert.Equal(t, "kubernetes.io/hostname", aa[0].PodAffinityTerm.TopologyKey)
			assert.Equal(t, d.Spec.Selector.MatchLabels, aa[0].PodAffinityTerm.LabelSelector.MatchLabels)

			pdb := decode[policyv1.PodDisruptionBudget](t, m, "PodDisruptionBudget/spectro-proxy")
			assert.Equal(t, d.Spec.Selector.MatchLabels, pdb.Spec.Selector.MatchLabels)
			assert.Equal(t, 1, pdb.Spec.MaxUnavailable.IntValue())

			sa := decode[corev1.ServiceAccount](t, m, "ServiceAccount/spectro-proxy")
			assert.Equal(t, sampleNS, sa.Namespace)

			assertKubeconfigConfigMap(t, m, sampleNS, "spectro-proxy")

			// auto mode: the NOTES explain both modes.
			assert.Contains(t, m.notes, "https://"+sampleHost+"\n")
			assert.Contains(t, m.notes, "MODE auto")
			assert.Contains(t, m.notes, "kubeadmconfig:\n    apiServer:\n      certSANs:\n        - "+sampleHost+"\n")
			assert.Contains(t, m.notes, "cluster:\n    config: |\n      tls-san:\n        - "+sampleHost+"\n")
			assert.Contains(t, m.notes, "kubectl -n "+sampleNS+" create token spectro-proxy-kubeconfig --duration 8h")
			assert.Contains(t, m.notes, "kubectl -n "+sampleNS+" get configmap spectro-proxy-kubeconfig -o jsonpath='{.data.mode}'\n")
			assert.Contains(t, m.notes, "kubectl -n "+sampleNS+" get configmap spectro-proxy-kubeconfig -o jsonpath='{.data.kubeconfig}' > kubeconfig\n")
			assert.Contains(t, m.notes, "DAY-2")
			assert.NotContains(t, m.notes, "dashboard.")
			assert.NotContains(t, m.notes, "WARNING")
		})
	}
}

func volumes(spec corev1.PodSpec) map[string]corev1.Volume {
	out := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		out[v.Name] = v
	}
	return out
}

// assertKubeconfigConfigMap: the ConfigMap the agent writes exists without
// data, and the agent's service account may get/update/patch it and nothing else.
func assertKubeconfigConfigMap(t *testing.T, m manifest, ns, agentSA string) {
	t.Helper()
	cm := decode[corev1.ConfigMap](t, m, "ConfigMap/spectro-proxy-kubeconfig")
	assert.Equal(t, ns, cm.Namespace)
	assert.Nil(t, cm.Data, "no data: helm upgrade must leave the agent's data alone")
	role := decode[rbacv1.Role](t, m, "Role/spectro-proxy-kubeconfig-writer")
	assert.Equal(t, ns, role.Namespace)
	assert.Equal(t, []rbacv1.PolicyRule{{
		APIGroups: []string{""}, Resources: []string{"configmaps"},
		ResourceNames: []string{"spectro-proxy-kubeconfig"}, Verbs: []string{"get", "update", "patch"},
	}}, role.Rules)
	rb := decode[rbacv1.RoleBinding](t, m, "RoleBinding/spectro-proxy-kubeconfig-writer")
	assert.Equal(t, rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name}, rb.RoleRef)
	assert.Equal(t, []rbacv1.Subject{{Kind: "ServiceAccount", Name: agentSA, Namespace: ns}}, rb.Subjects)
}

func assertLabels(t *testing.T, l map[string]string) {
	t.Helper()
	assert.Equal(t, "spectro-proxy", l["app.kubernetes.io/name"])
	assert.Equal(t, releaseName, l["app.kubernetes.io/instance"])
	assert.Equal(t, "agent", l["app.kubernetes.io/component"])
	assert.Equal(t, agentPinnedVersion, l["app.kubernetes.io/version"])
	assert.Equal(t, "Helm", l["app.kubernetes.io/managed-by"])
	assert.Equal(t, "spectro-proxy", l["app.kubernetes.io/part-of"])
	assert.Equal(t, "proxy", l["spectrocloud.com/connection"])
}

func assertProbes(t *testing.T, c corev1.Container) {
	t.Helper()
	require.Len(t, c.Ports, 1)
	assert.Equal(t, "health", c.Ports[0].Name)
	assert.Equal(t, int32(8081), c.Ports[0].ContainerPort)
	require.NotNil(t, c.LivenessProbe)
	require.NotNil(t, c.ReadinessProbe)
	assert.Equal(t, "/healthz", c.LivenessProbe.HTTPGet.Path)
	assert.Equal(t, "health", c.LivenessProbe.HTTPGet.Port.String())
	assert.Equal(t, "/readyz", c.ReadinessProbe.HTTPGet.Path)
	assert.Equal(t, "health", c.ReadinessProbe.HTTPGet.Port.String())
	assert.Contains(t, c.Args, "--health-addr=:8081")
}

// assertRestricted checks the pod against the Pod Security "restricted"
// profile, field by field.
func assertRestricted(t *testing.T, spec corev1.PodSpec) {
	t.Helper()
	require.NotNil(t, spec.TerminationGracePeriodSeconds)
	assert.Greater(t, *spec.TerminationGracePeriodSeconds, int64(25), "longer than the agent's 25s drain")
	psc := spec.SecurityContext
	require.NotNil(t, psc)
	assert.True(t, *psc.RunAsNonRoot)
	assert.NotZero(t, *psc.RunAsUser)
	assert.Equal(t, corev1.SeccompProfileTypeRuntimeDefault, psc.SeccompProfile.Type)
	assert.False(t, spec.HostNetwork || spec.HostPID || spec.HostIPC)
	for _, c := range spec.Containers {
		sc := c.SecurityContext
		require.NotNil(t, sc, c.Name)
		assert.False(t, *sc.AllowPrivilegeEscalation, c.Name)
		assert.True(t, *sc.ReadOnlyRootFilesystem, c.Name)
		assert.True(t, *sc.RunAsNonRoot, c.Name)
		assert.Equal(t, []corev1.Capability{"ALL"}, sc.Capabilities.Drop, c.Name)
		assert.Empty(t, sc.Capabilities.Add, c.Name)
		assert.Nil(t, sc.Privileged, c.Name)
		assert.Empty(t, c.Ports[0].HostPort, c.Name)
	}
	for _, v := range spec.Volumes {
		assert.Nil(t, v.HostPath, "volume %s", v.Name)
	}
}

// No golden or pack render leaves a macro half-resolved.
func TestNoUnresolvedMacros(t *testing.T) {
	for _, v := range packVersions {
		out := goldenText(mustRender(t, agentChart, merge(packValues(t, v), sampleCluster(t))))
		assert.NotContains(t, out, "<<", v)
		assert.NotContains(t, out, ">>", v)
		assert.NotContains(t, out, "spectro.system", v)
		assert.NotContains(t, out, "{{", v)
	}
}

// Every template reads only values that exist (engine.Strict) with the
// chart's defaults plus a cluster, in both modes and with every integration.
func TestStrictRender(t *testing.T) {
	for _, extra := range []string{
		"{}",
		"mode: passthrough",
		"{createNamespace: true, namespace: other, networkPolicy: {enabled: true}, proxy: {httpsProxy: 'http://proxy:3128'}, terminate: {legacyTokenSecret: true, clusterRole: cluster-admin}}",
		"{mode: terminate, relayCA: {pem: x}, k8sDashboardIntegration: {enabled: true}, vmwareDashboard: {enabled: true}}",
	} {
		_, err := render(t, agentChart, merge(sampleCluster(t), vals(t, extra)), renderOpts{strict: true})
		assert.NoError(t, err, extra)
	}
}

func TestDashboards(t *testing.T) {
	const (
		k8sHTTPS = "--k8s-dashboard-url=https://kubernetes-dashboard.kubernetes-dashboard.svc:443"
		k8sHTTP  = "--k8s-dashboard-url=http://kubernetes-dashboard.kubernetes-dashboard.svc:9090"
		vm       = "--vm-dashboard-url=https://vm-dashboard.vm-dashboard.svc:443"
	)
	dashHost := hostname.Host(hostname.Dashboard(hostname.DefaultSubdomain(sampleUID)), sampleServer)
	vmHost := hostname.Host(hostname.VMDashboard(hostname.DefaultSubdomain(sampleUID)), sampleServer)
	cases := []struct {
		name, version, values string
		want                  []string // dashboard flags, in order
	}{
		{"1.0 has no keys", "1.0.0", "{}", nil},
		{"1.1 default off", "1.1.0", "{}", nil},
		{"1.2 default off", "1.2.0", "{}", nil},
		{"1.3 default off", "1.3.0", "{}", nil},
		{"1.1 enabled", "1.1.0", "k8sDashboardIntegration: {enabled: true}", []string{k8sHTTPS}},
		{"1.2 insecure port", "1.2.0", "k8sDashboardIntegration: {enabled: true, useInsecurePort: true}", []string{k8sHTTP}},
		{"insecure flag without enabled", "1.3.0", "k8sDashboardIntegration: {useInsecurePort: true}", nil},
		{"headlamp", "1.3.0", "k8sDashboardIntegration: {enabled: true, useInsecurePort: true, service: headlamp, namespace: headlamp, port: 80}",
			[]string{"--k8s-dashboard-url=http://headlamp.headlamp.svc:80"}},
		{"https on another port", "1.3.0", "k8sDashboardIntegration: {enabled: true, port: 8443}",
			[]string{"--k8s-dashboard-url=https://kubernetes-dashboard.kubernetes-dashboard.svc:8443"}},
		{"1.3 vm", "1.3.0", "vmDashboardIntegration: {enabled: true}", []string{vm}},
		{"1.3 vmware alias", "1.3.0", "vmwareDashboard: {enabled: true}", []string{vm}},
		{"vm overridden", "1.3.0", "vmDashboardIntegration: {enabled: true, service: kubevirt-ui, namespace: vms, port: 8080, scheme: http}",
			[]string{"--vm-dashboard-url=http://kubevirt-ui.vms.svc:8080"}},
		{"both", "1.3.0", "{k8sDashboardIntegration: {enabled: true}, vmDashboardIntegration: {enabled: true}}", []string{k8sHTTPS, vm}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := renderPack(t, tc.version, vals(t, tc.values))
			var got []string
			for _, a := range agentArgs(t, m) {
				if strings.Contains(a, "dashboard") {
					got = append(got, a)
				}
			}
			assert.Equal(t, tc.want, got)
			hasK8s, hasVM := false, false
			for _, a := range tc.want {
				hasK8s = hasK8s || strings.HasPrefix(a, "--k8s-dashboard-url")
				hasVM = hasVM || strings.HasPrefix(a, "--vm-dashboard-url")
			}
			assert.Equal(t, hasK8s, strings.Contains(m.notes, "https://"+dashHost+"\n"), "dashboard host in NOTES")
			assert.Equal(t, hasVM, strings.Contains(m.notes, "https://"+vmHost+"\n"), "VM dashboard host in NOTES")
			// The agent dials the Services itself: no RBAC for dashboards.
			assert.Equal(t, rbacKinds(renderPack(t, tc.version)), rbacKinds(m))
		})
	}
}

func rbacKinds(m manifest) []string {
	var out []string
	for _, k := range m.kinds() {
		if strings.Contains(k, "Role") {
			out = append(out, k)
		}
	}
	return out
}

func TestModes(t *testing.T) {
	crbName := "ClusterRoleBinding/spectro-proxy-kubeconfig-" + sampleNS
	t.Run("terminate", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "mode: terminate"))
		assert.Contains(t, agentArgs(t, m), "--mode=terminate")
		sa := decode[corev1.ServiceAccount](t, m, "ServiceAccount/spectro-proxy-kubeconfig")
		assert.Equal(t, sampleNS, sa.Namespace)
		crb := decode[rbacv1.ClusterRoleBinding](t, m, crbName)
		assert.Equal(t, rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "view"}, crb.RoleRef, "least privilege by default")
		assert.Equal(t, []rbacv1.Subject{{Kind: "ServiceAccount", Name: "spectro-proxy-kubeconfig", Namespace: sampleNS}}, crb.Subjects)
		for k, doc := range m.objects {
			assert.NotContains(t, doc, "kubernetes.io/service-account-token", "%s: no long-lived token by default", k)
		}

		assert.Contains(t, m.notes, "TERMINATE MODE")
		assert.Contains(t, m.notes, "kubectl -n "+sampleNS+" create token spectro-proxy-kubeconfig --duration 8h > spectro-proxy.token\n")
		assert.Contains(t, m.notes, "bound to ClusterRole view")
		assert.Contains(t, m.notes, "  kubectl --kubeconfig kubeconfig config set-credentials cluster-"+sampleUID+` --token="$(cat spectro-proxy.token)"`+"\n"+
			"  kubectl --kubeconfig kubeconfig config set-context --current --user=cluster-"+sampleUID+"\n")
		assert.Contains(t, m.notes, "client certificates\ncannot")
		assert.NotContains(t, m.notes, "certSANs")
		assert.NotContains(t, m.notes, "tls-san")
		assert.NotContains(t, m.notes, "WARNING")
		assert.Contains(t, m.notes, "DAY-2")
	})
	t.Run("passthrough", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "mode: passthrough"))
		assert.Contains(t, agentArgs(t, m), "--mode=passthrough")
		assert.NotContains(t, m.kinds(), "ServiceAccount/spectro-proxy-kubeconfig")
		assert.NotContains(t, m.kinds(), crbName)
		assertKubeconfigConfigMap(t, m, sampleNS, "spectro-proxy")
		assert.Contains(t, m.notes, "PASSTHROUGH MODE")
		assert.Contains(t, m.notes, "certSANs:\n        - "+sampleHost+"\n")
		assert.NotContains(t, m.notes, "create token")
		assert.NotContains(t, m.notes, "MODE auto")
	})
	t.Run("cluster-admin is an opt-in with a warning", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "terminate: {clusterRole: cluster-admin}"))
		crb := decode[rbacv1.ClusterRoleBinding](t, m, crbName)
		assert.Equal(t, "cluster-admin", crb.RoleRef.Name)
		assert.Contains(t, m.notes, "WARNING: terminate.clusterRole is cluster-admin.")
	})
	t.Run("legacy token Secret is an opt-in with a warning", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "{mode: terminate, terminate: {legacyTokenSecret: true}}"))
		sec := decode[corev1.Secret](t, m, "Secret/spectro-proxy-kubeconfig-token")
		assert.Equal(t, corev1.SecretTypeServiceAccountToken, sec.Type)
		assert.Equal(t, "spectro-proxy-kubeconfig", sec.Annotations[corev1.ServiceAccountNameKey])
		assert.Contains(t, m.notes, "WARNING: terminate.legacyTokenSecret is true")
	})
	t.Run("relay CA from spectro.system", func(t *testing.T) {
		pem := "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
		m := renderPack(t, "1.3.0", map[string]any{"spectro": map[string]any{"system": map[string]any{"reverseproxy": map[string]any{"caCert": pem}}}})
		assert.Contains(t, agentArgs(t, m), "--relay-ca-file=/etc/spectro-proxy/relay-ca/ca.crt")
		cm := decode[corev1.ConfigMap](t, m, "ConfigMap/spectro-proxy-relay-ca")
		assert.Equal(t, strings.TrimSpace(pem), cm.Data["ca.crt"])
		// relayCA.pem wins over the system value.
		m = renderPack(t, "1.3.0", map[string]any{"spectro": map[string]any{"system": map[string]any{"reverseproxy": map[string]any{"caCert": pem}}}},
			vals(t, "relayCA: {pem: \"-----BEGIN CERTIFICATE-----\\nMIIC\\n-----END CERTIFICATE-----\"}"))
		cm = decode[corev1.ConfigMap](t, m, "ConfigMap/spectro-proxy-relay-ca")
		assert.Contains(t, cm.Data["ca.crt"], "MIIC")
	})
	t.Run("kubeconfig ConfigMap off", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "kubeconfigConfigMap: {enabled: false}"))
		assert.NotContains(t, m.kinds(), "ConfigMap/spectro-proxy-kubeconfig")
		assert.NotContains(t, m.kinds(), "Role/spectro-proxy-kubeconfig-writer")
		for _, a := range agentArgs(t, m) {
			assert.NotContains(t, a, "--kubeconfig-configmap")
		}
		assert.NotContains(t, m.notes, "get configmap spectro-proxy-kubeconfig")
	})
}

func TestNamespace(t *testing.T) {
	t.Run("not created by default", func(t *testing.T) {
		m := renderPack(t, "1.3.0")
		for _, k := range m.kinds() {
			assert.NotRegexp(t, "^Namespace/", k)
		}
		d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
		assert.Equal(t, sampleNS, d.Namespace)
	})
	t.Run("createNamespace creates and keeps it", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "{createNamespace: true, namespace: spectro-proxy-system}"))
		ns := decode[corev1.Namespace](t, m, "Namespace/spectro-proxy-system")
		assert.Equal(t, "keep", ns.Annotations["helm.sh/resource-policy"])
		assert.Equal(t, "restricted", ns.Labels["pod-security.kubernetes.io/enforce"])
		for _, k := range m.kinds() {
			if !strings.HasPrefix(k, "Namespace/") && !strings.HasPrefix(k, "ClusterRoleBinding/") {
				assert.Contains(t, m.objects[k], "namespace: spectro-proxy-system\n", k)
			}
		}
	})
	t.Run("release namespace is never rendered", func(t *testing.T) {
		files, err := render(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t), vals(t, "createNamespace: true")), renderOpts{namespace: sampleNS})
		require.NoError(t, err)
		assert.NotContains(t, parse(t, files).kinds(), "Namespace/"+sampleNS)
	})
	for _, ns := range []string{"kube-system", "kube-public", "default"} {
		t.Run(ns+" is never rendered", func(t *testing.T) {
			m := renderPack(t, "1.3.0", vals(t, "{createNamespace: true, namespace: "+ns+"}"))
			assert.NotContains(t, m.kinds(), "Namespace/"+ns)
			d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
			assert.Equal(t, ns, d.Namespace)
		})
	}
}

// The tunnel token: token.value, else spectro.system.reverseproxy.token, else
// an existing Secret (token.existingSecret, default spectro-proxy-token).
func TestToken(t *testing.T) {
	noSystemToken := vals(t, "spectro: {system: {reverseproxy: {token: null}}}")
	t.Run("token.value wins", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "token: {value: spx1.other}"))
		sec := decode[corev1.Secret](t, m, "Secret/spectro-proxy-agent-token")
		assert.Equal(t, "spx1.other", string(sec.Data["token"]))
	})
	t.Run("existing Secret", func(t *testing.T) {
		m := renderPack(t, "1.3.0", noSystemToken, vals(t, "token: {existingSecret: my-token, key: tok}"))
		assert.NotContains(t, m.kinds(), "Secret/spectro-proxy-agent-token")
		d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
		vols := volumes(d.Spec.Template.Spec)
		assert.Equal(t, "my-token", vols["token"].Secret.SecretName)
		assert.Equal(t, []corev1.KeyToPath{{Key: "tok", Path: "token"}}, vols["token"].Secret.Items)
	})
	t.Run("neither", func(t *testing.T) {
		_, err := render(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t), noSystemToken))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "spectro-proxy: no tunnel token: set spectro.system.reverseproxy.token (Palette sets it for each cluster) or token.value, "+
			"or create the Secret spectro-proxy-token with the key token in namespace "+sampleNS+
			" (kubectl -n "+sampleNS+" create secret generic spectro-proxy-token --from-literal=token=spx1...), and then set token.existingSecret=spectro-proxy-token (helm template cannot look the Secret up)")
	})
}

// Values users expect of a chart.
func TestChartOptions(t *testing.T) {
	m := renderPack(t, "1.3.0", vals(t, `
proxy: {httpsProxy: "http://user:secret@proxy.corp:3128", httpProxy: "http://proxy.corp:8080", noProxy: "10.0.0.0/8,.svc"}
extraEnv: [{name: GODEBUG, value: "http2debug=1"}]
extraVolumes: [{name: extra-ca, configMap: {name: corp-ca}}]
extraVolumeMounts: [{name: extra-ca, mountPath: /etc/corp-ca, readOnly: true}]
serviceAccount: {create: true, name: agent, annotations: {eks.amazonaws.com/role-arn: "arn:aws:iam::1:role/x"}}
podSecurityContext: {runAsNonRoot: true, runAsUser: 1000, seccompProfile: {type: RuntimeDefault}}
securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, runAsNonRoot: true, capabilities: {drop: [ALL]}, seccompProfile: {type: Localhost, localhostProfile: agent.json}}
topologySpreadConstraints: [{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway, labelSelector: {matchLabels: {app.kubernetes.io/component: agent}}}]
networkPolicy: {enabled: true}
k8sDashboardIntegration: {enabled: true}
global: {imageRegistry: registry.local}
tunnels: 2
`))
	d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
	pod := d.Spec.Template.Spec
	c := pod.Containers[0]
	assert.Contains(t, c.Args, "--tunnels=2", "an integer value is a flag value too")
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			env[e.Name] = "secret:" + e.ValueFrom.SecretKeyRef.Name + "/" + e.ValueFrom.SecretKeyRef.Key
		}
	}
	// The proxy URLs may hold credentials: a Secret, not the Deployment.
	assert.Equal(t, "secret:spectro-proxy-proxy/HTTPS_PROXY", env["HTTPS_PROXY"])
	assert.Equal(t, "secret:spectro-proxy-proxy/HTTP_PROXY", env["HTTP_PROXY"])
	assert.NotContains(t, m.objects["Deployment/spectro-proxy"], "secret@proxy")
	proxy := decode[corev1.Secret](t, m, "Secret/spectro-proxy-proxy")
	assert.Equal(t, "http://user:secret@proxy.corp:3128", string(proxy.Data["HTTPS_PROXY"]))
	assert.Equal(t, "http://proxy.corp:8080", string(proxy.Data["HTTP_PROXY"]))
	assert.NotEmpty(t, d.Spec.Template.Annotations["checksum/proxy"])
	assert.Equal(t, "10.0.0.0/8,.svc", env["NO_PROXY"])
	assert.Equal(t, "http2debug=1", env["GODEBUG"])
	assert.Equal(t, "corp-ca", volumes(pod)["extra-ca"].ConfigMap.Name)
	assert.Contains(t, c.VolumeMounts, corev1.VolumeMount{Name: "extra-ca", MountPath: "/etc/corp-ca", ReadOnly: true})
	assert.Equal(t, "agent", pod.ServiceAccountName)
	sa := decode[corev1.ServiceAccount](t, m, "ServiceAccount/agent")
	assert.Equal(t, "arn:aws:iam::1:role/x", sa.Annotations["eks.amazonaws.com/role-arn"])
	rb := decode[rbacv1.RoleBinding](t, m, "RoleBinding/spectro-proxy-kubeconfig-writer")
	assert.Equal(t, "agent", rb.Subjects[0].Name)
	assert.Equal(t, int64(1000), *pod.SecurityContext.RunAsUser)
	assert.Equal(t, "agent.json", *c.SecurityContext.SeccompProfile.LocalhostProfile)
	require.Len(t, pod.TopologySpreadConstraints, 1)
	assert.Equal(t, "topology.kubernetes.io/zone", pod.TopologySpreadConstraints[0].TopologyKey)

	np := decode[networkingv1.NetworkPolicy](t, m, "NetworkPolicy/spectro-proxy")
	assert.Equal(t, d.Spec.Selector.MatchLabels, np.Spec.PodSelector.MatchLabels)
	assert.Equal(t, []networkingv1.PolicyType{"Ingress", "Egress"}, np.Spec.PolicyTypes)
	require.Len(t, np.Spec.Ingress, 1)
	assert.Empty(t, np.Spec.Ingress[0].From)
	require.Len(t, np.Spec.Ingress[0].Ports, 1)
	assert.Equal(t, "health", np.Spec.Ingress[0].Ports[0].Port.String())
	var egress [][]string
	for _, r := range np.Spec.Egress {
		var ports []string
		for _, p := range r.Ports {
			ports = append(ports, string(*p.Protocol)+"/"+p.Port.String())
		}
		egress = append(egress, ports)
	}
	assert.Equal(t, [][]string{
		{"UDP/53", "TCP/53"},                // DNS
		{"TCP/443", "TCP/3128", "TCP/8080"}, // relay and proxies
		{"TCP/443", "TCP/6443"},             // API server
		{"TCP/443"},                         // dashboard
	}, egress)

	t.Run("service account not created", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "serviceAccount: {create: false}"))
		assert.NotContains(t, m.kinds(), "ServiceAccount/spectro-proxy")
		d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
		assert.Equal(t, "default", d.Spec.Template.Spec.ServiceAccountName)
	})
}

func TestTokenAndOptions(t *testing.T) {
	m := renderPack(t, "1.3.0", vals(t, `
spectro: {system: {reverseproxy: {token: null}}}
token: {value: "", existingSecret: my-token, key: tok}
relayCA: {existingConfigMap: relay-ca, key: root.pem}
image: {repository: registry.local/agent, digest: "sha256:`+strings.Repeat("a", 64)+`"}
replicas: 3
podDisruptionBudget: {enabled: false}
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Exists, effect: NoSchedule}]
affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: tier, operator: In, values: [edge]}]}]}}}
labels: {team: platform}
annotations: {owner: ops}
podLabels: {extra: "yes"}
podAnnotations: {scrape: "false"}
extraArgs: ["--relay-address=relay.internal:8443"]
logLevel: debug
priorityClassName: system-cluster-critical
`))
	assert.NotContains(t, m.kinds(), "Secret/spectro-proxy-agent-token")
	assert.NotContains(t, m.kinds(), "ConfigMap/spectro-proxy-relay-ca")
	assert.NotContains(t, m.kinds(), "PodDisruptionBudget/spectro-proxy")
	d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
	pod := d.Spec.Template.Spec
	assert.Equal(t, int32(3), *d.Spec.Replicas)
	assert.Equal(t, "registry.local/agent@sha256:"+strings.Repeat("a", 64), pod.Containers[0].Image)
	args := pod.Containers[0].Args
	assert.Equal(t, "--relay-address=relay.internal:8443", args[len(args)-1])
	assert.Contains(t, args, "--log-level=debug")
	assert.Contains(t, args, "--relay-ca-file=/etc/spectro-proxy/relay-ca/ca.crt")
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	assert.Equal(t, "my-token", vols["token"].Secret.SecretName)
	assert.Equal(t, []corev1.KeyToPath{{Key: "tok", Path: "token"}}, vols["token"].Secret.Items)
	assert.Equal(t, "relay-ca", vols["relay-ca"].ConfigMap.Name)
	assert.Equal(t, []corev1.KeyToPath{{Key: "root.pem", Path: "ca.crt"}}, vols["relay-ca"].ConfigMap.Items)
	assert.Equal(t, map[string]string{"kubernetes.io/os": "linux"}, pod.NodeSelector)
	assert.Len(t, pod.Tolerations, 1)
	assert.Nil(t, pod.Affinity.PodAntiAffinity, "a user affinity replaces the default")
	assert.NotNil(t, pod.Affinity.NodeAffinity)
	assert.Equal(t, "system-cluster-critical", pod.PriorityClassName)
	assert.Equal(t, "platform", d.Labels["team"])
	assert.Equal(t, "ops", d.Annotations["owner"])
	assert.Equal(t, "yes", d.Spec.Template.Labels["extra"])
	assert.Equal(t, "false", d.Spec.Template.Annotations["scrape"])
	for _, k := range m.kinds() {
		assert.Contains(t, m.objects[k], "team: platform", k)
	}
}

func TestImageDefaultsToAppVersion(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(agentChart, "Chart.yaml"))
	require.NoError(t, err)
	var appVersion string
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "appVersion: "); ok {
			appVersion = strings.Trim(v, `"`)
		}
	}
	require.NotEmpty(t, appVersion)
	m := renderPack(t, "1.3.0")
	d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
	// loadChart pins appVersion; the template must use it for the tag.
	assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:"+agentPinnedVersion, d.Spec.Template.Spec.Containers[0].Image)
	mk, err := os.ReadFile("../make/chart.mk")
	require.NoError(t, err)
	assert.Contains(t, string(mk), "ghcr.io/spectroproxy/spectro-proxy-client", "make image builds the chart's default image")
}

func TestMacros(t *testing.T) {
	cases := []struct {
		name, values string
		check        func(t *testing.T, m manifest)
	}{
		{"palette form", `
namespace: "cluster-{{ .spectro.system.cluster.uid }}"
server: "{{ .spectro.system.reverseproxy.server }}"
clusterUid: "{{ .spectro.system.cluster.uid }}"
subdomain: "cluster-{{ .spectro.system.cluster.uid }}"
`, func(t *testing.T, m manifest) {
			args := agentArgs(t, m)
			assert.Contains(t, args, "--server="+sampleServer)
			assert.Contains(t, args, "--subdomain=cluster-"+sampleUID)
			assert.Equal(t, sampleNS, decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy").Namespace)
		}},
		{"both spellings", `
namespace: "cluster-<< .spectro.system.cluster.uid >>"
subdomain: "{{ .spectro.system.cluster.name }}-<< .spectro.system.cluster.uid >>"
`, func(t *testing.T, m manifest) {
			assert.Contains(t, agentArgs(t, m), "--subdomain=edge-lab-1-"+sampleUID)
			assert.Equal(t, sampleNS, decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy").Namespace)
		}},
		{"palette form with trim markers", `subdomain: "{{- .spectro.system.cluster.name -}}"`, func(t *testing.T, m manifest) {
			assert.Contains(t, agentArgs(t, m), "--subdomain=edge-lab-1")
		}},
		{"pipelines", `
server: '<< .spectro.system.reverseproxy.relay | default "relay.example.net" >>'
subdomain: '<< .spectro.system.cluster.name | lower >>-api'
podLabels: {cluster: '<< .spectro.system.cluster.name | upper >>'}
`, func(t *testing.T, m manifest) {
			args := agentArgs(t, m)
			assert.Contains(t, args, "--server=relay.example.net")
			assert.Contains(t, args, "--subdomain=edge-lab-1-api")
			d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
			assert.Equal(t, "EDGE-LAB-1", d.Spec.Template.Labels["cluster"])
		}},
		{"default on a missing parent", `port: '<< .spectro.system.relay.port | default 8443 >>'`, func(t *testing.T, m manifest) {
			assert.Contains(t, agentArgs(t, m), "--port=8443")
		}},
		{"port from spectro.system", `port: "<< .spectro.system.reverseproxy.vhostport >>"`, func(t *testing.T, m manifest) {
			assert.Contains(t, agentArgs(t, m), "--port=8443")
			assert.Contains(t, m.notes, "https://"+sampleHost+":8443\n")
		}},
		{"two macros and any key in lists", `
subdomain: "<< .spectro.system.cluster.name >>-<< .spectro.system.env >>"
extraArgs: ["--relay-address=<< .spectro.system.relay.address >>"]
`, func(t *testing.T, m manifest) {
			args := agentArgs(t, m)
			assert.Contains(t, args, "--subdomain=edge-lab-1-prod")
			assert.Contains(t, args, "--relay-address=10.0.0.1:443")
		}},
		{"integer port literal", `port: 8443`, func(t *testing.T, m manifest) {
			assert.Contains(t, agentArgs(t, m), "--port=8443")
		}},
	}
	extra := vals(t, "spectro: {system: {env: prod, relay: {address: '10.0.0.1:443'}, reverseproxy: {vhostport: 8443}}}")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.check(t, renderPack(t, "1.3.0", extra, vals(t, tc.values)))
		})
	}

	t.Run("port falls back to 443", func(t *testing.T) {
		noPort := vals(t, "spectro: {system: {reverseproxy: {port: null}}}")
		m := renderPack(t, "1.3.0", noPort)
		assert.Contains(t, agentArgs(t, m), "--port=443")
	})
}

func TestMacroMissingValues(t *testing.T) {
	cases := []struct {
		name, values string
		want         string
	}{
		{"no spectro.system at all", `spectro: null`,
			`value "clusterUid" uses the macro "{{ .spectro.system.cluster.uid }}", which resolves to an empty value: set spectro.system.cluster.uid`},
		{"missing server", `spectro: {system: {reverseproxy: {server: null}}}`,
			`value "server" uses the macro "{{ .spectro.system.reverseproxy.server }}", which resolves to an empty value: set spectro.system.reverseproxy.server`},
		{"empty server", `spectro: {system: {reverseproxy: {server: ""}}}`,
			`value "server" uses the macro "{{ .spectro.system.reverseproxy.server }}", which resolves to an empty value: set spectro.system.reverseproxy.server (for example --set spectro.system.reverseproxy.server=...)`},
		{"palette form missing", `subdomain: "{{ .spectro.system.cluster.nickname }}"`,
			`value "subdomain" uses the macro "{{ .spectro.system.cluster.nickname }}", which resolves to an empty value: set spectro.system.cluster.nickname`},
		{"nested and listed values", `extraArgs: ["--relay-address=<< .spectro.system.relay.address >>"]`,
			`value "extraArgs.0" uses the macro "<< .spectro.system.relay.address >>"`},
		{"not from spectro.system", `labels: {release: "<< .Release.Name >>"}`,
			`value "labels.release" uses the macro "<< .Release.Name >>", which reads .Release.Name: macros can only read .spectro.system`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t), vals(t, tc.values)))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

// Every rejection, from the schema (unresolved values) or from the chart's
// checks of the resolved values, comes with its message.
func TestRejections(t *testing.T) {
	cases := []struct {
		name, values string
		want         string
	}{
		// values.schema.json
		{"unknown key", "foo: bar", "additional properties 'foo' not allowed"},
		{"unknown nested key", "k8sDashboardIntegration: {enable: true}", "at '/k8sDashboardIntegration': additional properties 'enable' not allowed"},
		{"unknown mode", "mode: tunnel", "at '/mode': value must be one of 'auto', 'passthrough', 'terminate'"},
		{"proxy without scheme", "proxy: {httpsProxy: 'proxy.corp:3128'}", "at '/proxy/httpsProxy': 'proxy.corp:3128' does not match pattern"},
		{"extraEnv without name", "extraEnv: [{value: x}]", "at '/extraEnv/0': missing property 'name'"},
		{"unknown serviceAccount key", "serviceAccount: {automount: true}", "at '/serviceAccount': additional properties 'automount' not allowed"},
		{"networkPolicy port", "networkPolicy: {apiServerPorts: [0]}", "at '/networkPolicy/apiServerPorts/0': minimum: got 0, want 1"},
		{"legacy token type", "terminate: {legacyTokenSecret: 'yes'}", "at '/terminate/legacyTokenSecret': got string, want boolean"},
		{"subdomain with a dot", "subdomain: api.cluster-1", "at '/subdomain': 'api.cluster-1' does not match pattern"},
		{"empty server", `server: ""`, "at '/server': minLength: got 0, want 1"},
		{"server with scheme", "server: https://proxy.example.com", "at '/server': 'https://proxy.example.com' does not match pattern"},
		{"port too large", "port: 70000", "at '/port': maximum: got 70,000, want 65,535"},
		{"port zero", "port: 0", "at '/port': minimum: got 0, want 1"},
		{"port not a number", "port: https", "at '/port': 'https' does not match pattern"},
		{"port wrong type", "port: true", "at '/port': got boolean, want integer or string"},
		{"replicas negative", "replicas: -1", "at '/replicas': minimum: got -1, want 0"},
		{"dashboard port", "k8sDashboardIntegration: {port: 0}", "at '/k8sDashboardIntegration/port': minimum: got 0, want 1"},
		{"vm scheme", "vmDashboardIntegration: {scheme: ftp}", "at '/vmDashboardIntegration/scheme': value must be one of 'https', 'http'"},
		{"alias is boolean", "vmwareDashboard: {enabled: yes-please}", "at '/vmwareDashboard/enabled': got string, want boolean"},
		{"log level", "logLevel: trace", "at '/logLevel': value must be one of 'debug', 'info', 'warn', 'error'"},
		{"tunnels", "tunnels: 3", "at '/tunnels': value must be one of 'auto', '1', '2', 1, 2"},
		{"extra arg not a flag", "extraArgs: [relay]", "at '/extraArgs/0': 'relay' does not match pattern '^--'"},
		{"pull policy", "image: {pullPolicy: Sometimes}", "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"},
		{"dashboard enabled type", `k8sDashboardIntegration: {enabled: "true"}`, "at '/k8sDashboardIntegration/enabled': got string, want boolean"},
		// chart checks on resolved values
		{"subdomain resolves to two labels", "{subdomain: '<< .spectro.system.cluster.name >>', spectro: {system: {cluster: {name: edge.lab}}}}",
			`subdomain "edge.lab" is not a single DNS label`},
		{"subdomain resolves to upper case", "subdomain: '<< .spectro.system.cluster.name | upper >>'",
			`subdomain "EDGE-LAB-1" is not a single DNS label`},
		{"subdomain too long for the VM dashboard", "{subdomain: '" + strings.Repeat("a", 52) + "', vmDashboardIntegration: {enabled: true}}",
			`is too long: the label "` + strings.Repeat("a", 52) + `-vmdashboard" must fit in 63 characters`},
		{"subdomain longer than a label", "subdomain: '" + strings.Repeat("a", 64) + "'", "must fit in 63 characters"},
		{"server resolves blank", "spectro: {system: {reverseproxy: {server: '  '}}}", "resolves to an empty value: set spectro.system.reverseproxy.server"},
		{"server resolves to a URL", "spectro: {system: {reverseproxy: {server: 'https://proxy.example.com'}}}",
			`server "https://proxy.example.com" must be a bare DNS name (no scheme, port or path)`},
		{"server resolves with a port", "spectro: {system: {reverseproxy: {server: 'proxy.example.com:443'}}}",
			`server "proxy.example.com:443" must be a bare DNS name`},
		{"server resolves to bad name", "spectro: {system: {reverseproxy: {server: 'proxy_example.com'}}}",
			`server "proxy_example.com" is not a valid DNS name`},
		{"port resolves out of range", "spectro: {system: {reverseproxy: {port: 70000}}}", "port 70000 is out of range (1-65535)"},
		{"port string out of range", `port: "99999"`, "port 99999 is out of range (1-65535)"},
		{"port resolves to text", "spectro: {system: {reverseproxy: {port: https}}}", `port "https" is not a number`},
		{"namespace resolves badly", "{namespace: 'ns-<< .spectro.system.cluster.name >>', spectro: {system: {cluster: {name: edge_lab}}}}", `namespace "ns-edge_lab" is not a valid namespace name`},
		{"no token", `{token: {value: ""}, spectro: {system: {reverseproxy: {token: ""}}}}`, "no tunnel token: set spectro.system.reverseproxy.token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t), vals(t, tc.values)))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestSchemaCopiesIdentical(t *testing.T) {
	root, err := os.ReadFile("../values.schema.json")
	require.NoError(t, err)
	inChart, err := os.ReadFile(filepath.Join(agentChart, "values.schema.json"))
	require.NoError(t, err)
	assert.Equal(t, string(root), string(inChart), "values.schema.json and charts/spectro-proxy/values.schema.json differ; copy one onto the other (make chart-schema)")
}

// Every key of values.yaml is documented with a `# --` comment and known to
// the schema, and the schema knows no key that values.yaml lacks.
func TestValuesDocumentedAndInSchema(t *testing.T) {
	for _, dir := range []string{agentChart, relayChart} {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			raw, err := os.ReadFile(filepath.Join(dir, "values.yaml"))
			require.NoError(t, err)
			lines := strings.Split(string(raw), "\n")
			covered := -1 // indent of a documented map whose children need no comment
			for i, l := range lines {
				trimmed := strings.TrimSpace(l)
				if trimmed == "" || strings.HasPrefix(trimmed, "#") || strings.HasPrefix(trimmed, "-") {
					continue
				}
				if covered >= 0 && indent(l) > covered {
					continue
				}
				covered = -1
				documented := false
				for j := i - 1; j >= 0 && strings.HasPrefix(strings.TrimSpace(lines[j]), "#"); j-- {
					documented = documented || strings.HasPrefix(strings.TrimSpace(lines[j]), "# --")
				}
				if strings.HasSuffix(trimmed, ":") { // a map: documented as a whole or leaf by leaf
					if documented {
						covered = indent(l)
					}
					continue
				}
				assert.True(t, documented, "%s:%d %q has no `# --` comment", dir, i+1, trimmed)
			}

			var schema map[string]any
			sraw, err := os.ReadFile(filepath.Join(dir, "values.schema.json"))
			require.NoError(t, err)
			require.NoError(t, json.Unmarshal(sraw, &schema))
			defaults := readValues(t, filepath.Join(dir, "values.yaml"))
			assert.Equal(t, keys(schema["properties"].(map[string]any)), sortedKeys(defaults), "top-level keys of the schema and values.yaml")
		})
	}
}

func indent(s string) int { return len(s) - len(strings.TrimLeft(s, " ")) }

func keys(m map[string]any) []string { return sortedKeys(m) }

func sortedKeys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Lint the way `helm lint --strict` does: with each pack version's values,
// and with each charts/spectro-proxy/ci/*-values.yaml (what chart-testing
// lints: the chart's defaults plus what the platform provides, and options).
func TestLint(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			lintClean(t, agentChart, merge(packValues(t, v), sampleCluster(t)))
		})
	}
	t.Run("terminate", func(t *testing.T) {
		lintClean(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t), vals(t, "mode: terminate")))
	})
	// helm lint --strict with the chart's defaults alone: the macros
	// without spectro.system fail the render, which lint reports as
	// information (it lints in LintMode), not as a warning or error.
	t.Run("defaults", func(t *testing.T) {
		lintClean(t, agentChart, nil)
	})
	files, err := filepath.Glob(filepath.Join(agentChart, "ci", "*-values.yaml"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			lintClean(t, agentChart, readValues(t, f))
		})
	}
}

// As a subchart the agent chart receives the parent's `global` values; its
// strict schema accepts them.
func TestAsSubchart(t *testing.T) {
	parent := &chart.Chart{Metadata: &chart.Metadata{APIVersion: chart.APIVersionV2, Name: "platform", Version: "0.1.0"}}
	parent.AddDependency(loadChart(t, agentChart))
	files, err := renderChart(t, parent, map[string]any{
		"global":        map[string]any{"imageRegistry": "registry.local", "clusterDomain": "cluster.local"},
		"spectro-proxy": merge(packValues(t, "1.3.0"), sampleCluster(t)),
	}, renderOpts{})
	require.NoError(t, err)
	m := parse(t, files)
	assert.Contains(t, m.kinds(), "Deployment/spectro-proxy")
}
