package client

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics lives in a registry of its own (no global state), so several
// agents can run in one test process. It is served at /metrics on the
// health port.
type metrics struct {
	reg       *prometheus.Registry
	mode      *prometheus.GaugeVec
	tunnelUp  prometheus.Gauge
	tunnels   prometheus.Gauge
	connects  prometheus.Counter
	published prometheus.Gauge
	pubErrs   prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		mode: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "spectro_proxy_agent_mode",
			Help: "1 for the mode the API server route registered with (passthrough or terminate); no series until it is chosen.",
		}, []string{"mode"}),
		tunnelUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_agent_tunnel_up", Help: "1 while a tunnel to the relay is up (any of them).",
		}),
		tunnels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_agent_tunnels", Help: "Tunnels to the relay connected now (two on distinct relay replicas with --tunnels 2 or auto on a fleet; one more for a moment while one moves).",
		}),
		connects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spectro_proxy_agent_tunnel_connects_total", Help: "Tunnels established to the relay.",
		}),
		published: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_agent_kubeconfig_published", Help: "1 once the kubeconfig skeleton ConfigMap is written.",
		}),
		pubErrs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spectro_proxy_agent_kubeconfig_publish_errors_total", Help: "Failed attempts to write the kubeconfig skeleton ConfigMap.",
		}),
	}
	m.reg.MustRegister(m.mode, m.tunnelUp, m.tunnels, m.connects, m.published, m.pubErrs,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
