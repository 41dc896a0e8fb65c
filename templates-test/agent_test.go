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
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// packVersions are the documented pack versions under packs/spectro-proxy/.
var packVersions = []string{"1.0.0", "1.1.0", "1.2.0", "1.3.0"}

const (
	sampleUID    = "6582c4a5d1e2b3f4a5b6c7d8"
	sampleServer = "proxy.example.com"
	sampleNS     = "cluster-" + sampleUID
	sampleHost   = "cluster-" + sampleUID + "." + sampleServer
	sampleToken  = "spx1.eyJjbHVzdGVyIjoiNjU4MmM0YTVkMWUyYjNmNGE1YjZjN2Q4In0.c2lnbmF0dXJl"
)

// sampleCluster is what Palette fills in for a cluster, plus the tunnel token
// every install needs.
func sampleCluster(t *testing.T) map[string]any {
	return readValues(t, "testdata/sample-cluster.yaml")
}

func packValues(t *testing.T, version string) map[string]any {
	return readValues(t, filepath.Join("..", "packs", "spectro-proxy", version, "values.yaml"))
}

// renderPack renders the agent chart with a pack version's values, the sample
// cluster and the extra overrides.
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

func TestPackVersionsGolden(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			out := mustRender(t, agentChart, merge(packValues(t, v), sampleCluster(t)))
			assertGolden(t, "pack-"+v, goldenText(out))
		})
	}
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

func TestPackVersionsTyped(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			m := renderPack(t, v)
			assert.Equal(t, []string{
				"Deployment/spectro-proxy",
				"Namespace/" + sampleNS,
				"PodDisruptionBudget/spectro-proxy",
				"Secret/spectro-proxy-token",
				"ServiceAccount/spectro-proxy",
			}, m.kinds())

			ns := decode[corev1.Namespace](t, m, "Namespace/"+sampleNS)
			assert.Equal(t, "restricted", ns.Labels["pod-security.kubernetes.io/enforce"])

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
			assert.False(t, *pod.Spec.AutomountServiceAccountToken, "passthrough needs no API token")

			c := pod.Spec.Containers[0]
			assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:"+pinnedVersion, c.Image)
			assert.Equal(t, []string{
				"--server=" + sampleServer,
				"--port=443",
				"--cluster-uid=" + sampleUID,
				"--subdomain=cluster-" + sampleUID,
				"--mode=passthrough",
				"--token-file=/etc/spectro-proxy/token/token",
				"--health-addr=:8081",
				"--agent-id=$(POD_NAME)",
				"--log-level=info",
			}, c.Args)
			require.Len(t, c.Env, 1)
			assert.Equal(t, "POD_NAME", c.Env[0].Name)
			assert.Equal(t, "metadata.name", c.Env[0].ValueFrom.FieldRef.FieldPath)
			assertProbes(t, c)
			assertRestricted(t, pod.Spec)

			// The token Secret is mounted where --token-file points.
			assert.Contains(t, c.VolumeMounts, corev1.VolumeMount{Name: "token", MountPath: "/etc/spectro-proxy/token", ReadOnly: true})
			var tokenVol *corev1.Volume
			for i := range pod.Spec.Volumes {
				if pod.Spec.Volumes[i].Name == "token" {
					tokenVol = &pod.Spec.Volumes[i]
				}
			}
			require.NotNil(t, tokenVol)
			assert.Equal(t, "spectro-proxy-token", tokenVol.Secret.SecretName)
			assert.Equal(t, []corev1.KeyToPath{{Key: "token", Path: "token"}}, tokenVol.Secret.Items)
			sec := decode[corev1.Secret](t, m, "Secret/spectro-proxy-token")
			assert.Equal(t, sampleNS, sec.Namespace)
			assert.Equal(t, sampleToken, string(sec.Data["token"]))

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

			// NOTES: the SAN snippets with the resolved host name and the Day-2 warning.
			assert.Contains(t, m.notes, "https://"+sampleHost+"\n")
			assert.Contains(t, m.notes, "kubeadmconfig:\n    apiServer:\n      certSANs:\n        - "+sampleHost+"\n")
			assert.Contains(t, m.notes, "cluster:\n    config: |\n      tls-san:\n        - "+sampleHost+"\n")
			assert.Contains(t, m.notes, "DAY-2")
			assert.NotContains(t, m.notes, "dashboard.")
		})
	}
}

func assertLabels(t *testing.T, l map[string]string) {
	t.Helper()
	assert.Equal(t, "spectro-proxy", l["app.kubernetes.io/name"])
	assert.Equal(t, releaseName, l["app.kubernetes.io/instance"])
	assert.Equal(t, "agent", l["app.kubernetes.io/component"])
	assert.Equal(t, pinnedVersion, l["app.kubernetes.io/version"])
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

// The documented values of each pack version: 1.0.x has no dashboard keys,
// 1.1.x and later have k8sDashboardIntegration, only 1.3.x has the VM dashboard.
func TestPackValuesDocumented(t *testing.T) {
	base := map[string]any{
		"namespace":  "cluster-<< .spectro.system.cluster.uid >>",
		"server":     "<< .spectro.system.reverseproxy.server >>",
		"clusterUid": "<< .spectro.system.cluster.uid >>",
		"subdomain":  "cluster-<< .spectro.system.cluster.uid >>",
	}
	k8s := map[string]any{"enabled": false, "useInsecurePort": false}
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			want := merge(base)
			if v != "1.0.0" {
				want["k8sDashboardIntegration"] = k8s
			}
			if v == "1.3.0" {
				want["vmDashboardIntegration"] = map[string]any{"enabled": false}
			}
			assert.Equal(t, want, packValues(t, v))

			raw, err := os.ReadFile(filepath.Join("..", "packs", "spectro-proxy", v, "pack.json"))
			require.NoError(t, err)
			var pack struct {
				Name      string   `json:"name"`
				Version   string   `json:"version"`
				Layer     string   `json:"layer"`
				AddonType string   `json:"addonType"`
				Cloud     []string `json:"cloudTypes"`
				Display   string   `json:"displayName"`
				Charts    []struct {
					Name, Version, Path string
				} `json:"charts"`
			}
			dec := json.NewDecoder(strings.NewReader(string(raw)))
			dec.DisallowUnknownFields()
			require.NoError(t, dec.Decode(&pack))
			assert.Equal(t, "spectro-proxy", pack.Name)
			assert.Equal(t, v, pack.Version)
			assert.Equal(t, "addon", pack.Layer)
			assert.NotEmpty(t, pack.AddonType)
			require.Len(t, pack.Charts, 1)
			ch, err := os.ReadFile(filepath.Join("..", pack.Charts[0].Path, "Chart.yaml"))
			require.NoError(t, err, "pack.json chart path")
			assert.Contains(t, string(ch), "\nname: "+pack.Charts[0].Name+"\n")
			assert.Contains(t, string(ch), "\nversion: "+pack.Charts[0].Version+"\n")
		})
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
		"mode: passthrough",
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
	dashHost := "cluster-" + sampleUID + "-dashboard." + sampleServer
	vmHost := "cluster-" + sampleUID + "-vmdashboard." + sampleServer
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
			for _, k := range m.kinds() {
				assert.NotRegexp(t, "^(Cluster)?Role(Binding)?/", k)
			}
		})
	}
}

func TestModes(t *testing.T) {
	t.Run("terminate", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "mode: terminate"))
		assert.Equal(t, []string{
			"ClusterRoleBinding/spectro-proxy-kubeconfig-" + sampleNS,
			"Deployment/spectro-proxy",
			"Namespace/" + sampleNS,
			"PodDisruptionBudget/spectro-proxy",
			"Secret/spectro-proxy-kubeconfig-token",
			"Secret/spectro-proxy-token",
			"ServiceAccount/spectro-proxy",
			"ServiceAccount/spectro-proxy-kubeconfig",
		}, m.kinds())
		assert.Contains(t, agentArgs(t, m), "--mode=terminate")
		d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
		assert.True(t, *d.Spec.Template.Spec.AutomountServiceAccountToken, "terminate mode reads the cluster CA from the service account volume")

		sa := decode[corev1.ServiceAccount](t, m, "ServiceAccount/spectro-proxy-kubeconfig")
		assert.Equal(t, sampleNS, sa.Namespace)
		sec := decode[corev1.Secret](t, m, "Secret/spectro-proxy-kubeconfig-token")
		assert.Equal(t, corev1.SecretTypeServiceAccountToken, sec.Type)
		assert.Equal(t, "spectro-proxy-kubeconfig", sec.Annotations[corev1.ServiceAccountNameKey])
		assert.Equal(t, sampleNS, sec.Namespace)
		crb := decode[rbacv1.ClusterRoleBinding](t, m, "ClusterRoleBinding/spectro-proxy-kubeconfig-"+sampleNS)
		assert.Equal(t, rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "cluster-admin"}, crb.RoleRef)
		assert.Equal(t, []rbacv1.Subject{{Kind: "ServiceAccount", Name: "spectro-proxy-kubeconfig", Namespace: sampleNS}}, crb.Subjects)

		assert.Contains(t, m.notes, "kubectl -n "+sampleNS+" get secret spectro-proxy-kubeconfig-token -o jsonpath='{.data.token}' | base64 -d > spectro-proxy.token\n")
		// The relay has a publicly trusted certificate: plain kubectl builds the kubeconfig.
		assert.Contains(t, m.notes, "  kubectl config set-cluster cluster-"+sampleUID+" --server=https://"+sampleHost+"\n")
		assert.Contains(t, m.notes, "  kubectl config set-credentials cluster-"+sampleUID+` --token="$(cat spectro-proxy.token)"`+"\n")
		assert.NotContains(t, m.notes, "certSANs")
		assert.Contains(t, m.notes, "DAY-2")
	})
	t.Run("terminate with relay CA", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "{mode: terminate, relayCA: {pem: \"-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n\"}}"))
		assert.Contains(t, agentArgs(t, m), "--relay-ca-file=/etc/spectro-proxy/relay-ca/ca.crt")
		cm := decode[corev1.ConfigMap](t, m, "ConfigMap/spectro-proxy-relay-ca")
		assert.Equal(t, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----", cm.Data["ca.crt"])
		assert.Contains(t, m.notes, `get configmap spectro-proxy-relay-ca -o jsonpath='{.data.ca\.crt}' > spectro-proxy-relay-ca.crt`)
		assert.Contains(t, m.notes, "spectro-proxy-client kubeconfig --mode terminate --server "+sampleServer+" --port 443 --subdomain cluster-"+sampleUID+" --user-token-file spectro-proxy.token --relay-ca-file spectro-proxy-relay-ca.crt > kubeconfig\n")
	})
	t.Run("passthrough has no kubeconfig account", func(t *testing.T) {
		m := renderPack(t, "1.3.0", vals(t, "mode: passthrough"))
		assert.NotContains(t, m.kinds(), "ServiceAccount/spectro-proxy-kubeconfig")
		assert.NotContains(t, m.notes, "spectro-proxy-client kubeconfig")
	})
}

func TestNamespaceOwnership(t *testing.T) {
	// Installed into the target namespace itself (helm -n cluster-<uid>):
	// Helm requires it to exist, so the chart does not render it.
	files, err := render(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t)), renderOpts{namespace: sampleNS})
	require.NoError(t, err)
	assert.NotContains(t, parse(t, files).kinds(), "Namespace/"+sampleNS)

	m := renderPack(t, "1.3.0", vals(t, "createNamespace: false"))
	assert.NotContains(t, m.kinds(), "Namespace/"+sampleNS)
	d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
	assert.Equal(t, sampleNS, d.Namespace)

	m = renderPack(t, "1.3.0", vals(t, "namespace: spectro-proxy-system"))
	assert.Contains(t, m.kinds(), "Namespace/spectro-proxy-system")
	for _, k := range m.kinds() {
		if !strings.HasPrefix(k, "Namespace/") {
			assert.Contains(t, m.objects[k], "namespace: spectro-proxy-system\n", k)
		}
	}
}

func TestTokenAndOptions(t *testing.T) {
	m := renderPack(t, "1.3.0", vals(t, `
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
	assert.NotContains(t, m.kinds(), "Secret/spectro-proxy-token")
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
	assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-client:"+pinnedVersion, d.Spec.Template.Spec.Containers[0].Image)
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
			assert.Contains(t, m.kinds(), "Namespace/"+sampleNS)
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
			`value "clusterUid" uses the macro "<< .spectro.system.cluster.uid >>", which resolves to an empty value: set spectro.system.cluster.uid`},
		{"missing server", `spectro: {system: {reverseproxy: {server: null}}}`,
			`value "server" uses the macro "<< .spectro.system.reverseproxy.server >>", which resolves to an empty value: set spectro.system.reverseproxy.server`},
		{"empty server", `spectro: {system: {reverseproxy: {server: ""}}}`,
			`value "server" uses the macro "<< .spectro.system.reverseproxy.server >>", which resolves to an empty value: set spectro.system.reverseproxy.server (for example --set spectro.system.reverseproxy.server=...)`},
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
		{"unknown mode", "mode: tunnel", "at '/mode': value must be one of 'passthrough', 'terminate'"},
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
		{"no token", `token: {value: ""}`, "no tunnel token: set token.value"},
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

// Lint the way `helm lint` does, with each pack version's values.
func TestLint(t *testing.T) {
	for _, v := range packVersions {
		t.Run(v, func(t *testing.T) {
			lintClean(t, agentChart, merge(packValues(t, v), sampleCluster(t)))
		})
	}
	t.Run("terminate", func(t *testing.T) {
		lintClean(t, agentChart, merge(packValues(t, "1.3.0"), sampleCluster(t), vals(t, "mode: terminate")))
	})
}
