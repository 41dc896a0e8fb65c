package server

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// newAPI returns the relay's own HTTPS API, served at its own domain, and
// the part of it the plain-HTTP health port serves too: the routes are
// written once, and the health port gets only health and metrics (never
// the tunnel endpoint).
func (s *Server) newAPI() (api, health *http.ServeMux) {
	health = http.NewServeMux()
	health.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	health.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if s.draining.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		if why := s.fleetNotReady(); why != "" {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	health.Handle("/metrics", promhttp.HandlerFor(s.m.reg, promhttp.HandlerOpts{}))
	api = http.NewServeMux()
	api.HandleFunc(tunnel.Path, s.serveTunnel)
	api.Handle("/", health)
	return api, health
}

// HealthHandler serves /healthz, /readyz and /metrics in plain HTTP, for a
// separate in-cluster port: kubelet probes send no TLS server name, which the
// public listener refuses by design.
func (s *Server) HealthHandler() http.Handler { return s.health }
