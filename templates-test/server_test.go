package chart_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"sigs.k8s.io/yaml"
)

const relayBase = `
domain: proxy.example.com
tls: {existingSecret: proxy-example-com-tls}
signingKey: {value: 0123456789abcdef0123456789abcdef}
`

func renderRelay(t *testing.T, extra string) manifest {
	t.Helper()
	return parse(t, mustRender(t, relayChart, merge(vals(t, relayBase), vals(t, extra))))
}

const relayName = "spectro-proxy-spectro-proxy-server"

func TestRelayGolden(t *testing.T) {
	for name, extra := range map[string]string{
		"relay-default":      "{}",
		"relay-cert-manager": "{tls: {existingSecret: ''}, certManager: {enabled: true, issuerRef: {name: letsencrypt-dns}}, revokedTokenIds: [a1b2, c3d4]}",
	} {
		t.Run(name, func(t *testing.T) {
			out := mustRender(t, relayChart, merge(vals(t, relayBase), vals(t, extra)))
			assertGolden(t, name, goldenText(out))
		})
	}
}

func TestRelayTyped(t *testing.T) {
	m := renderRelay(t, "{}")
	assert.Equal(t, []string{
		"ConfigMap/" + relayName + "-revocations",
		"Deployment/" + relayName,
		"PodDisruptionBudget/" + relayName,
		"Secret/" + relayName + "-signing-key",
		"Service/" + relayName,
		"Service/" + relayName + "-metrics",
		"ServiceAccount/" + relayName,
	}, m.kinds())

	d := decode[appsv1.Deployment](t, m, "Deployment/"+relayName)
	assert.Equal(t, releaseNamespace, d.Namespace)
	pod := d.Spec.Template.Spec
	c := pod.Containers[0]
	assert.Equal(t, "ghcr.io/spectroproxy/spectro-proxy-server:"+pinnedVersion, c.Image)
	assert.Equal(t, []string{
		"--listen=:8443",
		"--health-addr=:8081",
		"--shutdown-delay=5s",
		"--drain-timeout=25s",
		"--domain=proxy.example.com",
		"--tls-cert-file=/etc/spectro-proxy/tls/tls.crt",
		"--tls-key-file=/etc/spectro-proxy/tls/tls.key",
		"--signing-key-file=/etc/spectro-proxy/signing-key/signing.key",
		"--revocation-file=/etc/spectro-proxy/revocations/revoked",
		"--hello-timeout=5s",
		"--tunnel-idle-timeout=5s",
		"--tunnel-ping-timeout=5s",
		"--max-streams-per-tunnel=1000",
		"--log-level=info",
	}, c.Args)
	assertRestricted(t, pod)
	assert.Equal(t, "health", c.LivenessProbe.HTTPGet.Port.String())
	assert.Equal(t, "/healthz", c.LivenessProbe.HTTPGet.Path)
	assert.Equal(t, "health", c.ReadinessProbe.HTTPGet.Port.String())
	assert.Equal(t, "/readyz", c.ReadinessProbe.HTTPGet.Path)
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	assert.Equal(t, "proxy-example-com-tls", vols["tls"].Secret.SecretName)
	assert.Equal(t, relayName+"-signing-key", vols["signing-key"].Secret.SecretName)
	assert.Equal(t, relayName+"-revocations", vols["revocations"].ConfigMap.Name)
	for k, v := range d.Spec.Selector.MatchLabels {
		assert.Equal(t, v, d.Spec.Template.Labels[k])
	}
	assert.Equal(t, "relay", d.Spec.Template.Labels["app.kubernetes.io/component"])

	svc := decode[corev1.Service](t, m, "Service/"+relayName)
	assert.Equal(t, corev1.ServiceTypeLoadBalancer, svc.Spec.Type)
	require.Len(t, svc.Spec.Ports, 1)
	assert.Equal(t, int32(443), svc.Spec.Ports[0].Port)
	assert.Equal(t, "https", svc.Spec.Ports[0].TargetPort.String())
	assert.Equal(t, d.Spec.Selector.MatchLabels, svc.Spec.Selector)

	sec := decode[corev1.Secret](t, m, "Secret/"+relayName+"-signing-key")
	assert.Equal(t, "0123456789abcdef0123456789abcdef", string(sec.Data["signing.key"]))
	assert.Equal(t, "keep", sec.Annotations["helm.sh/resource-policy"])

	pdb := decode[policyv1.PodDisruptionBudget](t, m, "PodDisruptionBudget/"+relayName)
	assert.Equal(t, d.Spec.Selector.MatchLabels, pdb.Spec.Selector.MatchLabels)

	assert.Equal(t, relayName, pod.ServiceAccountName)
	assert.False(t, *pod.AutomountServiceAccountToken)
	assert.Empty(t, c.Env)
	assert.Empty(t, pod.TopologySpreadConstraints)

	metrics := decode[corev1.Service](t, m, "Service/"+relayName+"-metrics")
	assert.Equal(t, corev1.ServiceTypeClusterIP, metrics.Spec.Type)
	require.Len(t, metrics.Spec.Ports, 1)
	assert.Equal(t, "metrics", metrics.Spec.Ports[0].Name)
	assert.Equal(t, int32(8081), metrics.Spec.Ports[0].Port)
	assert.Equal(t, "health", metrics.Spec.Ports[0].TargetPort.String())
	assert.Equal(t, d.Spec.Selector.MatchLabels, metrics.Spec.Selector)
	// The health port (where the relay serves /metrics) is the one the Service targets.
	assert.Contains(t, c.Args, "--health-addr=:8081")
	assert.Equal(t, "health", c.Ports[1].Name)
	assert.Equal(t, int32(8081), c.Ports[1].ContainerPort)

	assert.Contains(t, m.notes, "proxy.example.com and *.proxy.example.com")
	assert.Contains(t, m.notes, "exec deploy/"+relayName+" -c relay -- spectro-proxy-server token issue --cluster-uid <uid> --signing-key-file /etc/spectro-proxy/signing-key/signing.key")
	// The agent chart takes the platform's spectro.system values, not clusterUid/server.
	assert.Contains(t, m.notes, "helm install spectro-proxy charts/spectro-proxy \\\n"+
		"    --set spectro.system.cluster.uid=<uid> \\\n"+
		"    --set spectro.system.reverseproxy.server=proxy.example.com \\\n"+
		"    --set spectro.system.reverseproxy.token=<token>\n")
	assert.Contains(t, m.notes, "--set-file spectro.system.reverseproxy.caCert=<relay CA PEM file>")
	assert.NotContains(t, m.notes, "clusterUid=")
	assert.NotContains(t, m.notes, "reverseproxy.port")
	assert.NotContains(t, m.notes, "generated by the chart", "the key is a value here")
	assert.Contains(t, m.notes, "http://"+relayName+"-metrics.default.svc:8081/metrics")
}

func TestRelayOptions(t *testing.T) {
	t.Run("cert-manager", func(t *testing.T) {
		m := renderRelay(t, "{tls: {existingSecret: ''}, certManager: {enabled: true, issuerRef: {name: le, kind: Issuer}}}")
		doc := m.objects["Certificate/"+relayName]
		require.NotEmpty(t, doc, "kinds: %v", m.kinds())
		var cert struct {
			Spec struct {
				SecretName string   `json:"secretName"`
				DNSNames   []string `json:"dnsNames"`
				IssuerRef  struct{ Name, Kind, Group string }
			}
		}
		require.NoError(t, yaml.Unmarshal([]byte(doc), &cert)) // a CRD: no k8s.io/api type
		assert.Equal(t, relayName+"-tls", cert.Spec.SecretName)
		assert.Equal(t, []string{"proxy.example.com", "*.proxy.example.com"}, cert.Spec.DNSNames)
		assert.Equal(t, "Issuer", cert.Spec.IssuerRef.Kind)
		d := decode[appsv1.Deployment](t, m, "Deployment/"+relayName)
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == "tls" {
				assert.Equal(t, relayName+"-tls", v.Secret.SecretName)
			}
		}
	})
	t.Run("existing signing key and revocations", func(t *testing.T) {
		m := renderRelay(t, "{signingKey: {value: '', existingSecret: relay-key, key: key}, revokedTokenIds: [id1, id2], service: {type: NodePort, port: 8443}}")
		assert.NotContains(t, m.kinds(), "Secret/"+relayName+"-signing-key")
		cm := decode[corev1.ConfigMap](t, m, "ConfigMap/"+relayName+"-revocations")
		assert.Equal(t, []string{"id1", "id2"}, strings.Fields(cm.Data["revoked"]))
		d := decode[appsv1.Deployment](t, m, "Deployment/"+relayName)
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == "signing-key" {
				assert.Equal(t, "relay-key", v.Secret.SecretName)
				assert.Equal(t, []corev1.KeyToPath{{Key: "key", Path: "signing.key"}}, v.Secret.Items)
			}
		}
		assert.Contains(t, m.notes, "    --set spectro.system.reverseproxy.port=8443 \\\n")
		assert.NotContains(t, m.notes, "generated by the chart")
	})
	t.Run("metrics off", func(t *testing.T) {
		m := renderRelay(t, "metrics: {enabled: false}")
		assert.NotContains(t, m.kinds(), "Service/"+relayName+"-metrics")
		assert.NotContains(t, m.notes, "/metrics")
	})
	t.Run("service monitor", func(t *testing.T) {
		m := renderRelay(t, "{metrics: {port: 9090, annotations: {a: b}}, serviceMonitor: {enabled: true, interval: 15s, scrapeTimeout: 5s, labels: {release: prom}, metricRelabelings: [{action: drop, sourceLabels: [__name__], regex: go_.*}]}}")
		var sm struct {
			Metadata struct{ Labels map[string]string }
			Spec     struct {
				Selector          struct{ MatchLabels map[string]string } `json:"selector"`
				NamespaceSelector struct{ MatchNames []string }           `json:"namespaceSelector"`
				Endpoints         []struct {
					Port, Path, Scheme, Interval, ScrapeTimeout string
					MetricRelabelings                           []map[string]any `json:"metricRelabelings"`
				}
			}
		}
		doc := m.objects["ServiceMonitor/"+relayName]
		require.NotEmpty(t, doc, "kinds: %v", m.kinds())
		require.NoError(t, yaml.Unmarshal([]byte(doc), &sm)) // a CRD: no k8s.io/api type
		assert.Equal(t, "prom", sm.Metadata.Labels["release"])
		assert.Equal(t, []string{releaseNamespace}, sm.Spec.NamespaceSelector.MatchNames)
		require.Len(t, sm.Spec.Endpoints, 1)
		ep := sm.Spec.Endpoints[0]
		assert.Equal(t, []string{"metrics", "/metrics", "http", "15s", "5s"}, []string{ep.Port, ep.Path, ep.Scheme, ep.Interval, ep.ScrapeTimeout})
		assert.Len(t, ep.MetricRelabelings, 1)

		// The ServiceMonitor selects the metrics Service and not the public one.
		metrics := decode[corev1.Service](t, m, "Service/"+relayName+"-metrics")
		public := decode[corev1.Service](t, m, "Service/"+relayName)
		assert.Equal(t, int32(9090), metrics.Spec.Ports[0].Port)
		assert.Equal(t, "b", metrics.Annotations["a"])
		assert.True(t, selects(sm.Spec.Selector.MatchLabels, metrics.Labels))
		assert.False(t, selects(sm.Spec.Selector.MatchLabels, public.Labels))
	})
	t.Run("pod options", func(t *testing.T) {
		m := renderRelay(t, `
serviceAccount: {create: false, name: relay-sa}
podSecurityContext: {runAsUser: 1000, fsGroup: null}
securityContext: {readOnlyRootFilesystem: false}
topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway}
  - {maxSkew: 2, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {x: z}}}
extraEnv: [{name: SPECTRO_PROXY_STREAM_TIMEOUT, value: 20s}]
extraVolumes: [{name: extra, configMap: {name: extra}}]
extraVolumeMounts: [{name: extra, mountPath: /etc/extra, readOnly: true}]
global: {anything: [1, 2]}
`)
		assert.NotContains(t, m.kinds(), "ServiceAccount/"+relayName)
		d := decode[appsv1.Deployment](t, m, "Deployment/"+relayName)
		pod := d.Spec.Template.Spec
		assert.Equal(t, "relay-sa", pod.ServiceAccountName)
		// Overrides merge into the restricted defaults.
		assert.Equal(t, int64(1000), *pod.SecurityContext.RunAsUser)
		assert.Nil(t, pod.SecurityContext.FSGroup)
		assert.True(t, *pod.SecurityContext.RunAsNonRoot)
		assert.Equal(t, corev1.SeccompProfileTypeRuntimeDefault, pod.SecurityContext.SeccompProfile.Type)
		c := pod.Containers[0]
		assert.False(t, *c.SecurityContext.ReadOnlyRootFilesystem)
		assert.False(t, *c.SecurityContext.AllowPrivilegeEscalation)
		assert.Equal(t, []corev1.Capability{"ALL"}, c.SecurityContext.Capabilities.Drop)

		require.Len(t, pod.TopologySpreadConstraints, 2)
		assert.Equal(t, d.Spec.Selector.MatchLabels, pod.TopologySpreadConstraints[0].LabelSelector.MatchLabels, "a constraint without a selector selects the relay pods")
		assert.Equal(t, "topology.kubernetes.io/zone", pod.TopologySpreadConstraints[0].TopologyKey)
		assert.Equal(t, map[string]string{"x": "z"}, pod.TopologySpreadConstraints[1].LabelSelector.MatchLabels)

		assert.Equal(t, []corev1.EnvVar{{Name: "SPECTRO_PROXY_STREAM_TIMEOUT", Value: "20s"}}, c.Env)
		assert.Equal(t, "extra", pod.Volumes[len(pod.Volumes)-1].Name)
		assert.Equal(t, corev1.VolumeMount{Name: "extra", MountPath: "/etc/extra", ReadOnly: true}, c.VolumeMounts[len(c.VolumeMounts)-1])
		assert.Len(t, pod.Volumes, 5)
	})
	t.Run("service account default and annotations", func(t *testing.T) {
		m := renderRelay(t, "serviceAccount: {create: false}")
		assert.Equal(t, "default", decode[appsv1.Deployment](t, m, "Deployment/"+relayName).Spec.Template.Spec.ServiceAccountName)
		m = renderRelay(t, "serviceAccount: {name: relay, annotations: {iam.example.com/role: r}}")
		sa := decode[corev1.ServiceAccount](t, m, "ServiceAccount/relay")
		assert.Equal(t, "r", sa.Annotations["iam.example.com/role"])
		assert.False(t, *sa.AutomountServiceAccountToken)
		assert.Equal(t, "relay", decode[appsv1.Deployment](t, m, "Deployment/"+relayName).Spec.Template.Spec.ServiceAccountName)
	})
	t.Run("cert-manager CA in NOTES", func(t *testing.T) {
		m := renderRelay(t, "{tls: {existingSecret: ''}, certManager: {enabled: true, issuerRef: {name: le}}}")
		assert.Contains(t, m.notes, "get secret "+relayName+"-tls -o jsonpath='{.data.ca\\.crt}'")
	})
}

// selects reports whether a label selector's matchLabels match labels.
func selects(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func TestRelayRejections(t *testing.T) {
	cases := []struct{ name, values, want string }{
		{"no domain", "domain: ''", "domain is empty"},
		{"domain with scheme", "domain: https://proxy.example.com", "at '/domain': 'https://proxy.example.com' does not match pattern"},
		{"no certificate", "tls: {existingSecret: ''}", "no TLS certificate: set tls.existingSecret"},
		{"two certificates", "certManager: {enabled: true, issuerRef: {name: x}}", "set either tls.existingSecret or certManager.enabled, not both"},
		{"issuer missing", "{tls: {existingSecret: ''}, certManager: {enabled: true}}", "certManager.enabled needs certManager.issuerRef.name"},
		{"short signing key", "signingKey: {value: short}", "at '/signingKey/value'"},
		{"unknown key", "replica: 2", "additional properties 'replica' not allowed"},
		{"service type", "service: {type: Ingress}", "at '/service/type': value must be one of"},
		{"service port", "service: {port: 0}", "at '/service/port': minimum: got 0, want 1"},
		{"bad duration", "tunnel: {idleTimeout: 5}", "at '/tunnel/idleTimeout': got number, want string"},
		{"service monitor without metrics", "{metrics: {enabled: false}, serviceMonitor: {enabled: true}}", "serviceMonitor.enabled needs metrics.enabled"},
		{"scrape interval", "serviceMonitor: {interval: 30}", "at '/serviceMonitor/interval'"},
		{"unknown metrics key", "metrics: {path: /m}", "additional properties 'path' not allowed"},
		{"unknown service account key", "serviceAccount: {automount: true}", "additional properties 'automount' not allowed"},
		{"spread constraint without key", "topologySpreadConstraints: [{maxSkew: 1, whenUnsatisfiable: DoNotSchedule}]", "missing property 'topologyKey'"},
		{"env without name", "extraEnv: [{value: x}]", "missing property 'name'"},
		{"relative mount path", "extraVolumeMounts: [{name: x, mountPath: etc}]", "at '/extraVolumeMounts/0/mountPath'"},
		{"security context not an object", "securityContext: restricted", "at '/securityContext': got string, want object"},
		{"global not an object", "global: 1", "at '/global': got number, want object"},
		{"existing signing key secret name", "signingKey: {existingSecret: Relay_Key}", "at '/signingKey/existingSecret'"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, relayChart, merge(vals(t, relayBase), vals(t, tc.values)))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestRelayLint(t *testing.T) {
	lintClean(t, relayChart, vals(t, relayBase))
	lintClean(t, relayChart, merge(vals(t, relayBase), vals(t, "{tls: {existingSecret: ''}, certManager: {enabled: true, issuerRef: {name: le}}}")))
	// Defaults plus only the required values, with the key generated.
	lintClean(t, relayChart, vals(t, "{domain: proxy.example.com, tls: {existingSecret: proxy-tls}}"))
	for _, f := range relayCIValues(t) {
		t.Run(filepath.Base(f), func(t *testing.T) { lintClean(t, relayChart, readValues(t, f)) })
	}
}

// relayCIValues lists the chart's ci/*-values.yaml (what `helm lint` and
// chart-testing use).
func relayCIValues(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(relayChart, "ci", "*-values.yaml"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	return files
}

// Each ci values file renders on its own (no cluster) and matches its golden.
func TestRelayCIGolden(t *testing.T) {
	for _, f := range relayCIValues(t) {
		name := "relay-ci-" + strings.TrimSuffix(filepath.Base(f), "-values.yaml")
		t.Run(name, func(t *testing.T) {
			out := mustRender(t, relayChart, readValues(t, f), renderOpts{strict: true})
			parse(t, out)
			assertGolden(t, name, goldenText(out))
		})
	}
}

// The signing key: kept from the cluster on upgrade, generated on a first
// install against a cluster, and refused (not regenerated) by a render without
// a cluster, which a GitOps tool would apply on every sync.
func TestRelaySigningKey(t *testing.T) {
	noKey := merge(vals(t, relayBase), vals(t, "signingKey: {value: ''}"))
	secretName := relayName + "-signing-key"

	t.Run("no cluster", func(t *testing.T) {
		_, err := render(t, relayChart, noKey)
		require.Error(t, err)
		for _, want := range []string{
			"no signing key: rendered without a cluster",
			"kubectl -n default create secret generic spectro-proxy-signing-key --from-literal=signing.key=$(openssl rand -hex 32)",
			"set signingKey.existingSecret=spectro-proxy-signing-key (or set signingKey.value)",
		} {
			assert.Contains(t, err.Error(), want)
		}
	})
	t.Run("no cluster, existing secret", func(t *testing.T) {
		v := merge(noKey, vals(t, "signingKey: {existingSecret: spectro-proxy-signing-key}"))
		a := parse(t, mustRender(t, relayChart, v))
		b := parse(t, mustRender(t, relayChart, v))
		assert.Equal(t, a.objects, b.objects, "two renders differ")
		assert.NotContains(t, a.kinds(), "Secret/"+secretName)
	})
	t.Run("first install", func(t *testing.T) {
		m := parse(t, renderWithCluster(t, noKey, namespaceObj(releaseNamespace)))
		key := decode[corev1.Secret](t, m, "Secret/"+secretName).Data["signing.key"]
		assert.Len(t, key, 64)
		assert.Contains(t, m.notes, "The token signing key is in the Secret "+secretName+", generated by the chart on the first install")
		assert.Contains(t, m.notes, "set signingKey.existingSecret="+secretName)
	})
	t.Run("first install, namespace not created yet", func(t *testing.T) {
		// helm install --create-namespace creates it after the render.
		m := parse(t, renderWithCluster(t, noKey, namespaceObj("kube-system")))
		assert.Len(t, decode[corev1.Secret](t, m, "Secret/"+secretName).Data["signing.key"], 64)
	})
	t.Run("upgrade keeps the key", func(t *testing.T) {
		existing := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "v1", "kind": "Secret",
			"metadata": map[string]any{"name": secretName, "namespace": releaseNamespace},
			"data":     map[string]any{"signing.key": base64.StdEncoding.EncodeToString([]byte("kept-kept-kept-kept-kept-kept-kept-kept"))},
		}}
		for range 2 {
			m := parse(t, renderWithCluster(t, noKey, namespaceObj(releaseNamespace), existing))
			assert.Equal(t, "kept-kept-kept-kept-kept-kept-kept-kept", string(decode[corev1.Secret](t, m, "Secret/"+secretName).Data["signing.key"]))
		}
	})
}

func namespaceObj(name string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": name},
	}}
}

// renderWithCluster renders the relay chart as helm install does against a
// cluster, with lookup answered from objs.
func renderWithCluster(t *testing.T, values map[string]any, objs ...runtime.Object) map[string]string {
	t.Helper()
	ch := loadChart(t, relayChart)
	rv, err := chartutil.ToRenderValuesWithSchemaValidation(ch, values, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: releaseNamespace, Revision: 1, IsInstall: true,
	}, chartutil.DefaultCapabilities, false)
	require.NoError(t, err)
	client := dynamicfake.NewSimpleDynamicClient(runtime.NewScheme(), objs...)
	out, err := engine.RenderWithClientProvider(ch, rv, fakeClients{client})
	require.NoError(t, err)
	return out
}

// fakeClients answers lookup of Secrets and Namespaces from a fake dynamic client.
type fakeClients struct{ c dynamic.Interface }

func (f fakeClients) GetClientFor(apiVersion, kind string) (dynamic.NamespaceableResourceInterface, bool, error) {
	switch apiVersion + "/" + kind {
	case "v1/Secret":
		return f.c.Resource(schema.GroupVersionResource{Version: "v1", Resource: "secrets"}), true, nil
	case "v1/Namespace":
		return f.c.Resource(schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}), false, nil
	}
	return nil, false, fmt.Errorf("lookup of %s %s not expected", apiVersion, kind)
}

// Every key the relay's schema allows has a default in values.yaml (and so a
// row in the README), and the other way round: no hidden or unvalidated values.
func TestRelaySchemaMatchesValues(t *testing.T) {
	ch := loadChart(t, relayChart)
	var s map[string]any
	require.NoError(t, json.Unmarshal(ch.Schema, &s))
	// Keys the schema allows without a default: Kubernetes fields passed through.
	optional := map[string]bool{"resources.claims": true}
	var walk func(prefix string, schema, values map[string]any)
	walk = func(prefix string, schema, values map[string]any) {
		props, _ := schema["properties"].(map[string]any)
		if schema["additionalProperties"] != false || props == nil {
			return // a free-form map (labels, securityContext, ...)
		}
		for k, sub := range props {
			v, ok := values[k]
			if !ok {
				assert.True(t, optional[prefix+k], "schema allows %s%s, values.yaml has no default", prefix, k)
				continue
			}
			if vm, ok := v.(map[string]any); ok {
				walk(prefix+k+".", sub.(map[string]any), vm)
			}
		}
		for k := range values {
			assert.Contains(t, props, k, "values.yaml has %s%s, the schema does not", prefix, k)
		}
	}
	walk("", s, ch.Values)
}

// As a subchart the relay gets the parent's `global` values, which its strict
// schema must accept.
func TestRelayAsSubchart(t *testing.T) {
	parent := &chart.Chart{Metadata: &chart.Metadata{APIVersion: "v2", Name: "platform", Version: "0.1.0"}}
	parent.AddDependency(loadChart(t, relayChart))
	values := map[string]any{
		"global":               map[string]any{"imageRegistry": "registry.example.com", "labels": map[string]any{"team": "a"}},
		"spectro-proxy-server": vals(t, relayBase),
	}
	rv, err := chartutil.ToRenderValuesWithSchemaValidation(parent, values, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: releaseNamespace, Revision: 1, IsInstall: true,
	}, chartutil.DefaultCapabilities, false)
	require.NoError(t, err)
	out, err := engine.Render(parent, rv)
	require.NoError(t, err)
	m := parse(t, out)
	assert.Contains(t, m.kinds(), "Deployment/"+relayName)

	// The subchart's own values are still checked.
	values["spectro-proxy-server"] = merge(vals(t, relayBase), vals(t, "replica: 2"))
	_, err = chartutil.ToRenderValuesWithSchemaValidation(parent, values, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: releaseNamespace, Revision: 1, IsInstall: true,
	}, chartutil.DefaultCapabilities, false)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "additional properties 'replica' not allowed")
}
