package server

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The relay's API and its health port answer from one table of routes;
// the health port (plain HTTP) has no tunnel endpoint.
func TestAPIRoutes(t *testing.T) {
	s, err := New(Config{Domain: "proxy.test", StateDir: t.TempDir()})
	require.NoError(t, err)
	rec := httptest.NewRecorder()
	s.HealthHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	assert.Equal(t, http.StatusServiceUnavailable, rec.Code, "not ready before the registry's first view (Serve starts it)")
	s.fl.started.Store(true)
	tests := []struct {
		path       string
		api, probe int
	}{
		{"/healthz", 200, 200},
		{"/readyz", 200, 200},
		{"/metrics", 200, 200},
		{"/v1/tunnel", 401, 404}, // the API asks for a token; the health port does not know the path
		{"/nope", 404, 404},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			for _, h := range []struct {
				name    string
				handler http.Handler
				want    int
			}{{"api", s.api, tc.api}, {"health port", s.HealthHandler(), tc.probe}} {
				rec := httptest.NewRecorder()
				req := httptest.NewRequest(http.MethodGet, tc.path, nil)
				req.RemoteAddr = "127.0.0.1:1234"
				h.handler.ServeHTTP(rec, req)
				assert.Equal(t, h.want, rec.Code, "%s %s", h.name, tc.path)
			}
		})
	}
	s.draining.Store(true)
	rec = httptest.NewRecorder()
	s.HealthHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	assert.Equal(t, http.StatusServiceUnavailable, rec.Code, "not ready while draining")
}
