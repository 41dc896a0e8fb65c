// Package promtext reads a Prometheus /metrics page (the text format), for
// the tests and the benchmark that check the relay's and agent's counters.
package promtext

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// Scrape GETs url with hc and returns each sample by its full name,
// labels included, e.g. `spectro_proxy_refusals_total{reason="bad_token"}`.
func Scrape(ctx context.Context, hc *http.Client, url string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics: status %d", resp.StatusCode)
	}
	return Parse(resp.Body)
}

// Parse reads the Prometheus text format: comments are skipped, and each
// sample line is a name (with its labels) and a value.
func Parse(r io.Reader) (map[string]float64, error) {
	out := map[string]float64{}
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		// Label values may hold spaces: the name ends at the last '}'.
		end := strings.IndexByte(line, ' ')
		if i := strings.LastIndexByte(line, '}'); strings.IndexByte(line, '{') >= 0 && i > 0 {
			end = i + 1
		}
		if end < 0 {
			continue
		}
		fields := strings.Fields(line[end:])
		if len(fields) == 0 {
			continue
		}
		if v, err := strconv.ParseFloat(fields[0], 64); err == nil {
			out[line[:end]] = v
		}
	}
	return out, s.Err()
}
