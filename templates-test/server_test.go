package chart_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
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

	assert.Contains(t, m.notes, "proxy.example.com and *.proxy.example.com")
	assert.Contains(t, m.notes, "token issue --cluster-uid <uid> --signing-key-file /etc/spectro-proxy/signing-key/signing.key")
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
		assert.Contains(t, m.notes, "--set port=8443")
	})
	t.Run("generated signing key", func(t *testing.T) {
		m := renderRelay(t, "signingKey: {value: ''}")
		sec := decode[corev1.Secret](t, m, "Secret/"+relayName+"-signing-key")
		assert.Len(t, sec.Data["signing.key"], 64)
	})
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
}
