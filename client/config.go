// Package client is the agent: it keeps a tunnel to the relay up (dialing
// out, so the cluster needs no inbound access) and serves the relay's streams
// by connecting them to in-cluster targets: the API server and, when enabled,
// dashboards.
package client

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpproxy"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// In-cluster defaults, as every pod sees them.
const (
	DefaultTokenFile = "/etc/spectro-proxy/token/token"
	InClusterCAFile  = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
	// InClusterTokenFile and InClusterNamespaceFile are the pod's service
	// account token and namespace (what rest.InClusterConfig reads).
	InClusterTokenFile     = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	InClusterNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
)

// Config is the agent's configuration.
type Config struct {
	// Server is the relay's domain; the agent dials wss://Server:Port and
	// sends Server as the TLS server name.
	Server string
	Port   int
	// RelayAddress, when set, is dialed instead of Server:Port (local runs
	// without DNS). The TLS server name stays Server.
	RelayAddress string
	ClusterUID   string
	// Subdomain is the API server's label ("cluster-<uid>" when empty).
	Subdomain string
	TokenFile string
	// RelayCAFile is a PEM CA to trust for the relay; system roots if empty.
	RelayCAFile string
	// Proxy says which HTTP proxy, if any, carries the connection to the
	// relay (HTTP CONNECT). Nil means the environment's HTTPS_PROXY,
	// HTTP_PROXY and NO_PROXY (and their lowercase forms), read once by New.
	// NO_PROXY is matched against Server. In-cluster connections never use
	// a proxy.
	Proxy *httpproxy.Config
	// Mode is the API server route's mode: ModeAuto (when empty),
	// tunnel.Passthrough or tunnel.Terminate.
	Mode tunnel.Mode
	// APIServer is the API server URL (in-cluster one when empty).
	APIServer       string
	APIServerCAFile string
	// K8sDashboardURL and VMDashboardURL, when set, are served at
	// <subdomain>-dashboard and <subdomain>-vmdashboard.
	K8sDashboardURL string
	VMDashboardURL  string
	// DashboardInsecureSkipVerify accepts in-cluster dashboards' self-signed
	// certificates.
	DashboardInsecureSkipVerify bool
	// KubeconfigConfigMap, when set, names an existing ConfigMap in
	// Namespace that the agent fills with the kubeconfig skeleton for its
	// cluster (see publish.go), using its service account: ServiceAccount-
	// TokenFile against APIServer, verified with APIServerCAFile.
	KubeconfigConfigMap string
	// Namespace is the ConfigMap's namespace (default $POD_NAMESPACE, else
	// the pod's service account namespace file).
	Namespace               string
	ServiceAccountTokenFile string
	// HealthAddr serves /healthz, /readyz and /metrics; empty disables it.
	HealthAddr string
	// Pprof also serves Go's runtime profiles at /debug/pprof/ on
	// HealthAddr (for measuring; off by default).
	Pprof bool
	// AgentID names this replica; a reconnect with the same id replaces its
	// stale session at the relay. A second tunnel registers as
	// AgentID + SecondTunnelSuffix.
	AgentID string
	// Tunnels is how many tunnels the agent holds, on distinct relay
	// replicas: TunnelsAuto (when empty: two when the relay reports more
	// than one replica), "1" or "2".
	Tunnels string

	Liveness     tunnel.Liveness
	MaxStreams   uint32
	DialTimeout  time.Duration
	DrainTimeout time.Duration
	// BackoffMin and BackoffMax bound the reconnect delay.
	BackoffMin, BackoffMax time.Duration

	Logger *slog.Logger
}

// Defaults, the one place each is written: WithDefaults applies them and the
// agent's flags show them.
const (
	DefaultPort         = 443
	DefaultMaxStreams   = 1000
	DefaultDialTimeout  = 10 * time.Second
	DefaultDrainTimeout = 25 * time.Second
	DefaultBackoffMin   = 250 * time.Millisecond
	DefaultBackoffMax   = 30 * time.Second
	DefaultHealthAddr   = ":8081"
	// TunnelsAuto holds a second tunnel when the relay reports more than
	// one replica.
	TunnelsAuto = "auto"
	// SecondTunnelSuffix makes the second tunnel's agent id, so both
	// tunnels of one agent can sit in one replica's registry without one
	// replacing the other.
	SecondTunnelSuffix = "~1"
)

// WithDefaults returns c with every unset field filled in, from the
// constants above and, inside a pod, from its environment. New applies it;
// Validate only checks.
func (c Config) WithDefaults() Config {
	c.setDefaults()
	return c
}

func (c *Config) setDefaults() {
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	if c.Subdomain == "" && c.ClusterUID != "" {
		c.Subdomain = hostname.DefaultSubdomain(c.ClusterUID)
	}
	if c.TokenFile == "" {
		c.TokenFile = DefaultTokenFile
	}
	if c.Mode == "" {
		c.Mode = ModeAuto
	}
	if c.APIServer == "" {
		if h, p := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"); h != "" && p != "" {
			c.APIServer = "https://" + net.JoinHostPort(h, p)
		}
	}
	if c.APIServerCAFile == "" {
		c.APIServerCAFile = InClusterCAFile
	}
	if c.KubeconfigConfigMap != "" {
		if c.ServiceAccountTokenFile == "" {
			c.ServiceAccountTokenFile = InClusterTokenFile
		}
		if c.Namespace == "" {
			c.Namespace = os.Getenv("POD_NAMESPACE")
		}
		if c.Namespace == "" {
			if b, err := os.ReadFile(InClusterNamespaceFile); err == nil {
				c.Namespace = strings.TrimSpace(string(b))
			}
		}
	}
	if c.AgentID == "" {
		c.AgentID = os.Getenv("POD_NAME")
	}
	if c.AgentID == "" {
		c.AgentID, _ = os.Hostname()
	}
	if c.Tunnels == "" {
		c.Tunnels = TunnelsAuto
	}
	c.Liveness = c.Liveness.WithDefaults()
	if c.MaxStreams == 0 {
		c.MaxStreams = DefaultMaxStreams
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = DefaultBackoffMin
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = DefaultBackoffMax
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports everything wrong with the configuration. It changes
// nothing: call it on WithDefaults' result.
func (c *Config) Validate() error {
	var errs []error
	if c.Server == "" {
		errs = append(errs, errors.New("server is required (the relay's domain, e.g. proxy.example.com)"))
	}
	if c.Port < 1 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("port %d is out of range 1-65535", c.Port))
	}
	if c.ClusterUID == "" {
		errs = append(errs, errors.New("cluster-uid is required"))
	}
	if c.Subdomain != "" {
		if err := hostname.ValidateLabel(c.Subdomain); err != nil {
			errs = append(errs, fmt.Errorf("subdomain: %w", err))
		}
		for _, d := range []struct{ url, label string }{
			{c.K8sDashboardURL, hostname.Dashboard(c.Subdomain)},
			{c.VMDashboardURL, hostname.VMDashboard(c.Subdomain)},
		} {
			if d.url == "" {
				continue
			}
			if err := hostname.ValidateLabel(d.label); err != nil {
				errs = append(errs, fmt.Errorf("dashboard host name: %w (shorten the subdomain)", err))
			}
		}
	}
	if _, err := ParseMode(string(c.Mode)); err != nil {
		errs = append(errs, fmt.Errorf("mode: %w", err))
	}
	if c.KubeconfigConfigMap != "" {
		if c.Namespace == "" {
			errs = append(errs, errors.New("namespace is required for kubeconfig-configmap outside a pod (POD_NAMESPACE is not set)"))
		}
		if bad := validation.IsDNS1123Subdomain(c.KubeconfigConfigMap); len(bad) > 0 {
			errs = append(errs, fmt.Errorf("kubeconfig-configmap %q: %s", c.KubeconfigConfigMap, strings.Join(bad, "; ")))
		}
		if bad := validation.IsDNS1123Label(c.Namespace); c.Namespace != "" && len(bad) > 0 {
			errs = append(errs, fmt.Errorf("namespace %q: %s", c.Namespace, strings.Join(bad, "; ")))
		}
	}
	if c.APIServer == "" {
		errs = append(errs, errors.New("api-server is required outside a pod (KUBERNETES_SERVICE_HOST is not set)"))
	} else if err := checkURL("api-server", c.APIServer); err != nil {
		errs = append(errs, err)
	}
	for name, u := range map[string]string{"k8s-dashboard-url": c.K8sDashboardURL, "vm-dashboard-url": c.VMDashboardURL} {
		if u != "" {
			if err := checkURL(name, u); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if c.AgentID == "" {
		errs = append(errs, errors.New("agent-id is required (POD_NAME and the host name are empty)"))
	}
	switch c.Tunnels {
	case TunnelsAuto, "1", "2":
	default:
		errs = append(errs, fmt.Errorf("tunnels %q: want auto, 1 or 2", c.Tunnels))
	}
	if c.BackoffMin <= 0 || c.BackoffMax < c.BackoffMin {
		errs = append(errs, errors.New("backoff bounds must be positive with min <= max"))
	}
	return errors.Join(errs...)
}

func checkURL(name, s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("%s %q: want http:// or https:// and a host", name, s)
	}
	return nil
}

// relayAddr is where the agent dials.
func (c *Config) relayAddr() string {
	if c.RelayAddress != "" {
		return c.RelayAddress
	}
	return net.JoinHostPort(c.Server, strconv.Itoa(c.Port))
}
