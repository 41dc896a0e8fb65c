package chart_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"go.uber.org/goleak"
	appsv1 "k8s.io/api/apps/v1"
)

// TestMain checks that no test leaks goroutines, except client-go's
// client-certificate rotation: client-go starts it, for the life of the
// process, the first time a client uses a kubeconfig with certificate files
// (TestHelmInstall's admin kubeconfig), and offers no way to stop it.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("k8s.io/client-go/transport.(*dynamicClientCert).run"),
		goleak.IgnoreAnyFunction("k8s.io/client-go/transport.(*dynamicClientCert).runWorker"),
		goleak.IgnoreTopFunction("k8s.io/client-go/util/workqueue.(*delayingType[...]).waitingLoop"),
		goleak.IgnoreAnyFunction("k8s.io/apimachinery/pkg/util/wait.PollImmediateUntil"),
		goleak.IgnoreTopFunction("k8s.io/apimachinery/pkg/util/wait.PollImmediateUntilWithContext.poller.func1.1"),
	)
}

// FuzzMacroValue puts an arbitrary string, macros and all, into a value the
// chart resolves (an extra agent argument) and renders the agent chart as
// Helm would install it. The render must fail with a message or succeed,
// never panic; a value without macro markers must arrive unchanged; and no
// macro may read anything but .spectro.system: the tunnel token, which the
// values also hold, must never leak into the arguments.
func FuzzMacroValue(f *testing.F) {
	for _, s := range []string{
		"--relay-address=<< .spectro.system.relay.address >>",
		"{{ .spectro.system.cluster.name | upper }}",
		"<< .Values.token.value >>",
		"<< .spectro.system.cluster.uid }}{{ .Values.token.value >>",
		`<< include "spectro-proxy.fullname" . >>`,
		"<< .spectro.system.missing | default \"x\" >>",
		"plain value",
		"<<>>",
		"{{",
		"<< printf \"%s\" .spectro.system.cluster.name >>",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, value string) {
		if len(value) > 512 {
			t.Skip("long values only slow the render down")
		}
		if !utf8.ValidString(value) {
			t.Skip("values arrive as YAML, which is UTF-8")
		}
		// The token as token.value, outside spectro.system: macros must
		// not be able to read it.
		cluster := merge(sampleCluster(t), vals(t, "{spectro: {system: {reverseproxy: {token: null}}}, token: {value: "+sampleToken+"}}"))
		tok := sampleToken
		out, err := render(t, agentChart, merge(packValues(t, "1.3.0"), cluster,
			map[string]any{"extraArgs": []any{"--fuzz=" + value}})) // the schema wants a flag
		if err != nil {
			if strings.Contains(err.Error(), "panic") {
				t.Fatalf("render panicked on %q: %v", value, err)
			}
			if strings.Contains(err.Error(), tok) {
				t.Fatalf("error leaks the token: %v", err)
			}
			return
		}
		m := parse(t, out)
		d := decode[appsv1.Deployment](t, m, "Deployment/spectro-proxy")
		args := d.Spec.Template.Spec.Containers[0].Args
		got := args[len(args)-1]
		if !strings.Contains(value, "<<") && !strings.Contains(value, "{{") && got != "--fuzz="+value {
			t.Fatalf("value without macros changed: %q -> %q", value, got)
		}
		if strings.Contains(got, tok) && !strings.Contains(value, tok) {
			t.Fatalf("macro %q read the token: %q", value, got)
		}
	})
}
