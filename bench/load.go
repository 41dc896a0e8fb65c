package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Latencies is what a latency run saw.
type Latencies struct {
	Samples []time.Duration
	Elapsed time.Duration
	// CPU is what the processes given to the run used while it was timed.
	CPU time.Duration
}

// CPUPerOp is CPU over the operations done.
func (l Latencies) CPUPerOp() time.Duration {
	if len(l.Samples) == 0 {
		return 0
	}
	return l.CPU / time.Duration(len(l.Samples))
}

// Quantile returns the q-quantile (0..1) of the samples.
func (l Latencies) Quantile(q float64) time.Duration {
	if len(l.Samples) == 0 {
		return 0
	}
	s := slices.Clone(l.Samples)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

// PerSecond is completed operations per second.
func (l Latencies) PerSecond() float64 {
	if l.Elapsed <= 0 {
		return 0
	}
	return float64(len(l.Samples)) / l.Elapsed.Seconds()
}

// runWorkers runs conc workers calling op until dur has passed or maxOps
// operations were started, and records each op's latency. Every worker
// first runs warm ops untimed, so connections exist before timing starts.
// The CPU procs use is read over the timed part.
func runWorkers(ctx context.Context, conc, warm int, dur time.Duration, maxOps int, procs []*Proc, op func(ctx context.Context) error) (Latencies, error) {
	ctx, cancel := context.WithTimeout(ctx, dur+30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, conc)
	for range conc {
		wg.Go(func() {
			for range warm {
				if err := op(ctx); err != nil {
					errc <- err
					return
				}
			}
		})
	}
	wg.Wait()
	select {
	case err := <-errc:
		return Latencies{}, err
	default:
	}
	var mu sync.Mutex
	var all []time.Duration
	var started int
	cpu0, err := cpuOf(procs)
	if err != nil {
		return Latencies{}, err
	}
	start := time.Now()
	deadline := start.Add(dur)
	for range conc {
		wg.Go(func() {
			var mine []time.Duration
			defer func() {
				mu.Lock()
				all = append(all, mine...)
				mu.Unlock()
			}()
			for {
				mu.Lock()
				ok := started < maxOps && time.Now().Before(deadline)
				started++
				mu.Unlock()
				if !ok {
					return
				}
				t0 := time.Now()
				if err := op(ctx); err != nil {
					errc <- err
					cancel()
					return
				}
				mine = append(mine, time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu1, err := cpuOf(procs)
	if err != nil {
		return Latencies{}, err
	}
	select {
	case err := <-errc:
		return Latencies{}, err
	default:
	}
	return Latencies{Samples: all, Elapsed: elapsed, CPU: cpu1 - cpu0}, nil
}

// cpuOf is the CPU time procs have used so far, together.
func cpuOf(procs []*Proc) (time.Duration, error) {
	var sum time.Duration
	for _, p := range procs {
		u, err := p.Usage()
		if err != nil {
			return 0, err
		}
		sum += u.CPU
	}
	return sum, nil
}

// getOnce GETs path and reads the whole body, checking its length.
func getOnce(ctx context.Context, hc *http.Client, url string, want int, sum hash.Hash) error {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	var dst io.Writer = io.Discard
	if sum != nil {
		dst = sum
	}
	n, err := io.Copy(dst, resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: reading body after %d bytes: %w", url, n, err)
	}
	if resp.StatusCode != http.StatusOK || (want >= 0 && n != int64(want)) {
		return fmt.Errorf("GET %s: %s with %d bytes, want 200 with %d", url, resp.Status, n, want)
	}
	return nil
}

// SmallGets measures small GETs on conc workers sharing one client:
// HTTP/1.1 with a connection each, or HTTP/2 multiplexed on one connection.
func SmallGets(ctx context.Context, t Target, h2 bool, conc int, dur time.Duration, procs ...*Proc) (Latencies, error) {
	hc := t.Client(h2, conc)
	defer hc.CloseIdleConnections()
	return runWorkers(ctx, conc, 20, dur, 10_000_000, procs, func(ctx context.Context) error {
		return getOnce(ctx, hc, t.URL(pathSmall), 1024, nil)
	})
}

// NewConns measures small GETs that each open a new TCP+TLS connection.
func NewConns(ctx context.Context, t Target, conc int, dur time.Duration) (Latencies, error) {
	hc := t.Client(false, conc)
	hc.Transport.(*http.Transport).DisableKeepAlives = true
	defer hc.CloseIdleConnections()
	return runWorkers(ctx, conc, 2, dur, 1_000_000, nil, func(ctx context.Context) error {
		return getOnce(ctx, hc, t.URL(pathSmall), 1024, nil)
	})
}

// Transfer is how a bulk transfer is spread.
type Transfer struct {
	// Name is used in tables.
	Name string
	// Upload sends the list body instead of fetching it.
	Upload bool
	// Workers run in parallel, each doing Each transfers in a row.
	Workers, Each int
	// H2 puts every worker on one HTTP/2 connection; otherwise each
	// worker has an HTTP/1.1 connection of its own.
	H2 bool
}

// Throughput is a bulk transfer's result.
type Throughput struct {
	Bytes   int64
	Elapsed time.Duration
}

// MiBps is payload MiB per second.
func (tp Throughput) MiBps() float64 { return float64(tp.Bytes) / (1 << 20) / tp.Elapsed.Seconds() }

// Bulk runs tr against t, moving be.List each time. With verify, every body
// is hashed on arrival and checked (costing CPU, so not for timed runs).
func Bulk(ctx context.Context, t Target, be *Backend, tr Transfer, verify bool) (Throughput, error) {
	hc := t.Client(tr.H2, tr.Workers)
	defer hc.CloseIdleConnections()
	size := len(be.List)
	op := func(ctx context.Context) error {
		var sum hash.Hash
		if verify {
			sum = sha256.New()
		}
		if !tr.Upload {
			if err := getOnce(ctx, hc, t.URL(pathList), size, sum); err != nil {
				return err
			}
			if verify && !bytes.Equal(sum.Sum(nil), be.ListSum[:]) {
				return fmt.Errorf("%s: list arrived with a different SHA-256", t.Name)
			}
			return nil
		}
		url := t.URL(pathUpload)
		if verify {
			url += "?verify=1"
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(be.List))
		req.Header.Set("Content-Type", "application/json")
		resp, err := hc.Do(req)
		if err != nil {
			return fmt.Errorf("POST %s: %w", url, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if err != nil {
			return fmt.Errorf("POST %s: reading answer: %w", url, err)
		}
		var want []byte
		if verify {
			want = be.ListSum[:]
		}
		return checkUpload(body, int64(size), want)
	}
	// One small request per worker first, so connections and handshakes
	// are not timed.
	if _, err := runWorkers(ctx, tr.Workers, 1, 0, 0, nil, func(ctx context.Context) error {
		return getOnce(ctx, hc, t.URL(pathSmall), 1024, nil)
	}); err != nil {
		return Throughput{}, err
	}
	// The count bounds the run; the time cap only stops a wedged one.
	lat, err := runWorkers(ctx, tr.Workers, 0, 2*time.Minute, tr.Workers*tr.Each, nil, op)
	if err != nil {
		return Throughput{}, err
	}
	return Throughput{Bytes: int64(len(lat.Samples)) * int64(size), Elapsed: lat.Elapsed}, nil
}

// Watch opens a watch over HTTP/2 that sends n events at rate per second
// and returns how long each event took from the backend's write to here.
func Watch(ctx context.Context, t Target, rate, n int) (Latencies, error) {
	hc := t.Client(true, 1)
	defer hc.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, time.Duration(n)*time.Second/time.Duration(rate)+30*time.Second)
	defer cancel()
	url := t.URL(pathWatch + "&rate=" + strconv.Itoa(rate) + "&n=" + strconv.Itoa(n))
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	start := time.Now()
	resp, err := hc.Do(req)
	if err != nil {
		return Latencies{}, fmt.Errorf("watch: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Latencies{}, fmt.Errorf("watch: %s", resp.Status)
	}
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	lat := Latencies{Samples: make([]time.Duration, 0, n)}
	for range n {
		line, err := br.ReadSlice('\n')
		now := time.Now()
		if err != nil {
			return Latencies{}, fmt.Errorf("watch: after %d events: %w", len(lat.Samples), err)
		}
		sent, err := sentAt(line)
		if err != nil {
			return Latencies{}, err
		}
		lat.Samples = append(lat.Samples, now.Sub(time.Unix(0, sent)))
	}
	lat.Elapsed = time.Since(start)
	return lat, nil
}

func sentAt(line []byte) (int64, error) {
	const key = `"sent":`
	i := bytes.Index(line, []byte(key))
	if i < 0 {
		return 0, errors.New("watch event without a send time")
	}
	rest := line[i+len(key):]
	j := bytes.IndexByte(rest, ',')
	if j < 0 {
		return 0, errors.New("malformed watch event")
	}
	return strconv.ParseInt(string(rest[:j]), 10, 64)
}
