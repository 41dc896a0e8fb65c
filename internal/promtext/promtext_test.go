package promtext

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const page = `# HELP spectro_proxy_tunnels_connected Tunnels.
# TYPE spectro_proxy_tunnels_connected gauge
spectro_proxy_tunnels_connected 3
spectro_proxy_refusals_total{reason="bad_token"} 2
spectro_proxy_refusals_total{reason="odd value",x="}"} 1.5e+06
go_gc_duration_seconds{quantile="0.5"} 1.2e-05 1700000000000

not_a_number NaNa
`

func TestParse(t *testing.T) {
	m, err := Parse(strings.NewReader(page))
	require.NoError(t, err)
	assert.Equal(t, map[string]float64{
		"spectro_proxy_tunnels_connected":                        3,
		`spectro_proxy_refusals_total{reason="bad_token"}`:       2,
		`spectro_proxy_refusals_total{reason="odd value",x="}"}`: 1.5e6,
		`go_gc_duration_seconds{quantile="0.5"}`:                 1.2e-5,
	}, m)
}

func TestScrape(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(page))
	}))
	defer srv.Close()
	m, err := Scrape(context.Background(), srv.Client(), srv.URL+"/metrics")
	require.NoError(t, err)
	assert.Equal(t, 3.0, m["spectro_proxy_tunnels_connected"])
	_, err = Scrape(context.Background(), srv.Client(), srv.URL+"/other")
	assert.EqualError(t, err, "metrics: status 404")
}
