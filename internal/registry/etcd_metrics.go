package registry

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the registry's; a nil *metrics (WriteRevocation's callers)
// records nothing.
type metrics struct {
	keepalive     prometheus.Histogram
	held          prometheus.Gauge
	writes        *prometheus.CounterVec
	watchRestarts prometheus.Counter
	replicas      prometheus.Gauge
	put           prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	buckets := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}
	m := &metrics{
		keepalive: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "spectro_proxy_registry_lease_keepalive_seconds",
			Help:    "Round trip of the replica's etcd lease keep-alives.",
			Buckets: buckets,
		}),
		held: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_registry_lease_held",
			Help: "1 while the replica holds its etcd lease (0: before the first, or after etcd dropped it).",
		}),
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spectro_proxy_registry_etcd_writes_total",
			Help: "Requests that change etcd, by op: put and delete (keys), grant, revoke, keepalive.",
		}, []string{"op"}),
		watchRestarts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spectro_proxy_registry_watch_restarts_total",
			Help: "Times the registry watch ended (compaction, cancel) and the view was listed again.",
		}),
		replicas: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "spectro_proxy_registry_replicas",
			Help: "Live relay replicas in this replica's view, itself included.",
		}),
		put: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "spectro_proxy_registry_put_seconds",
			Help:    "Latency of the etcd transactions that write announced tunnels.",
			Buckets: buckets,
		}),
	}
	for _, op := range []string{"put", "delete", "grant", "revoke", "keepalive"} {
		m.writes.WithLabelValues(op)
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.keepalive, m.held, m.writes, m.watchRestarts, m.replicas, m.put} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("registering registry metrics: %w", err)
			}
		}
	}
	return m, nil
}

func (m *metrics) write(op string, n int) {
	if m != nil && n > 0 {
		m.writes.WithLabelValues(op).Add(float64(n))
	}
}
