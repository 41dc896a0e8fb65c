package chart_test

import (
	"testing"

	"github.com/spectroproxy/spectro-proxy/internal/chartdoc"
)

// Each chart's README.md is what `make chart-docs` writes from its Chart.yaml,
// values.yaml and README.md.gotmpl, and every value has a `# --` comment.
func TestChartDocsCurrent(t *testing.T) {
	for _, dir := range []string{agentChart, relayChart} {
		if err := chartdoc.Check(dir); err != nil {
			t.Error(err)
		}
	}
}
