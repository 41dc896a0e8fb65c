package client

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"os"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/spectroproxy/spectro-proxy/internal/kubeconfig"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Data keys of the kubeconfig skeleton ConfigMap.
const (
	KeyKubeconfig = "kubeconfig"
	KeyMode       = "mode"
	KeyServer     = "server"
)

// skeleton returns the ConfigMap data for the chosen mode: a kubeconfig
// with the relay host name, the CA kubectl must trust in that mode and no
// user credentials, plus the mode and the server URL on their own.
func (c *Client) skeleton(mode tunnel.Mode) (map[string]string, error) {
	o := kubeconfig.Options{Mode: mode, Server: c.cfg.Server, Port: c.cfg.Port, Subdomain: c.cfg.Subdomain}
	var err error
	switch mode {
	case tunnel.Passthrough:
		// TLS ends at the API server: kubectl verifies it with the cluster CA.
		if o.CAPEM, err = os.ReadFile(c.cfg.APIServerCAFile); err != nil {
			return nil, fmt.Errorf("reading the cluster CA for the kubeconfig: %w", err)
		}
	case tunnel.Terminate:
		// TLS ends at the relay: its CA, or none when its certificate is
		// publicly trusted (system roots).
		if c.cfg.RelayCAFile != "" {
			if o.CAPEM, err = os.ReadFile(c.cfg.RelayCAFile); err != nil {
				return nil, fmt.Errorf("reading the relay CA for the kubeconfig: %w", err)
			}
		}
	}
	kc, err := kubeconfig.Skeleton(o)
	if err != nil {
		return nil, err
	}
	return map[string]string{KeyKubeconfig: string(kc), KeyMode: string(mode), KeyServer: o.ServerURL()}, nil
}

// kubeClient is a typed client as the pod's service account, built like
// rest.InClusterConfig (the token file is re-read as it rotates) but from
// the agent's own API server URL, CA and token file, so the flags that
// point the agent at its API server hold here too. It never uses an HTTP
// proxy: HTTPS_PROXY is for the relay, and client-go would otherwise
// honour it for in-cluster calls.
func (c *Client) kubeClient() (kubernetes.Interface, error) {
	rc := &rest.Config{
		Host:            c.cfg.APIServer,
		TLSClientConfig: rest.TLSClientConfig{CAFile: c.cfg.APIServerCAFile},
		BearerTokenFile: c.cfg.ServiceAccountTokenFile,
		Proxy:           func(*http.Request) (*url.URL, error) { return nil, nil },
		UserAgent:       "spectro-proxy-agent",
		Timeout:         30 * time.Second,
	}
	return kubernetes.NewForConfig(rc)
}

// publish writes the kubeconfig skeleton into the ConfigMap and returns
// once it is there (or ctx ends). Failures are logged and retried with
// backoff; the tunnel never waits for this. The chart creates the
// ConfigMap (without data, so upgrades leave ours alone) and a Role that
// allows get, update and patch on that one object: the agent never
// creates, lists or deletes anything.
func (c *Client) publish(ctx context.Context, mode tunnel.Mode) {
	ref := c.cfg.Namespace + "/" + c.cfg.KubeconfigConfigMap
	data, err := c.skeleton(mode)
	if err != nil {
		c.metrics.pubErrs.Inc()
		c.log.Error("cannot build the kubeconfig skeleton; not publishing it", "configmap", ref, "error", err)
		return
	}
	cs, err := c.kubeClient()
	if err != nil {
		c.metrics.pubErrs.Inc()
		c.log.Error("cannot build a Kubernetes client; not publishing the kubeconfig skeleton", "configmap", ref, "error", err)
		return
	}
	delay := c.cfg.BackoffMin
	for {
		changed, err := writeConfigMap(ctx, cs, c.cfg.Namespace, c.cfg.KubeconfigConfigMap, data)
		if err == nil {
			c.metrics.published.Set(1)
			c.log.Info("kubeconfig skeleton published", "configmap", ref, "mode", mode, "server", data[KeyServer], "changed", changed)
			return
		}
		if ctx.Err() != nil {
			return
		}
		c.metrics.pubErrs.Inc()
		wait := jitter(delay)
		c.log.Warn("publishing the kubeconfig skeleton failed; retrying (the tunnel is not affected)",
			"configmap", ref, "error", err, "retry_in", wait.Round(time.Millisecond).String())
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		delay = min(delay*2, c.cfg.BackoffMax)
	}
}

// writeConfigMap sets data's keys in the existing ConfigMap (other keys
// are kept) and reports whether it had to change it.
func writeConfigMap(ctx context.Context, cs kubernetes.Interface, namespace, name string, data map[string]string) (bool, error) {
	cms := cs.CoreV1().ConfigMaps(namespace)
	cm, err := cms.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return false, fmt.Errorf("ConfigMap %s/%s does not exist (the chart creates it; the agent only updates it): %w", namespace, name, err)
	case apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err):
		return false, fmt.Errorf("reading ConfigMap %s/%s (the agent's service account needs get and update on it): %w", namespace, name, err)
	case err != nil:
		return false, fmt.Errorf("reading ConfigMap %s/%s: %w", namespace, name, err)
	}
	want := maps.Clone(cm.Data)
	if want == nil {
		want = map[string]string{}
	}
	maps.Copy(want, data)
	if maps.Equal(want, cm.Data) {
		return false, nil
	}
	cm.Data = want
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return false, fmt.Errorf("updating ConfigMap %s/%s: %w", namespace, name, err)
	}
	return true, nil
}
