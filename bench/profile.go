package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/promtext"
)

// ProfileResult is one small-GET load run while relay and agent were
// profiled (Options.ProfileDir): the run's request count, and per process
// what each request cost it.
type ProfileResult struct {
	Mode     string
	H2       bool
	Conc     int
	Requests int
	RPS      float64
	Procs    []ProcProfile
}

// ProcProfile is one process's cost per request in a profiled run, and
// where its profiles were written.
type ProcProfile struct {
	Name string
	// CPU is user+system CPU per request; Mallocs heap allocations per
	// request (the Go runtime's count); Reads and Writes read- and
	// write-family syscalls per request (/proc/<pid>/io syscr, syscw:
	// socket reads and writes, not epoll or futex); Switches the context
	// switches of all its threads per request (/proc/<pid>/task/*/status):
	// every time one of them slept (a goroutine handoff that had to wake
	// a thread, a wait in epoll) or was preempted.
	CPU                              time.Duration
	Mallocs, Reads, Writes, Switches float64
	// CPUFile and AllocFile are the pprof files (CPU, and allocations
	// during the run).
	CPUFile, AllocFile string
}

// profiled is a process whose profiles and counters a profiled run reads.
type profiled struct {
	p      *Proc
	health string // host:port of its health port, serving /debug/pprof/ and /metrics
}

// profileArgs are the extra flags that make a relay or agent serve its
// profiles on addr.
func profileArgs(addr string) []string { return []string{"--health-addr", addr, "--pprof"} }

type procCounters struct {
	cpu                     time.Duration
	mallocs                 float64
	reads, writes, switches int64
}

// contextSwitches sums the voluntary and involuntary context switches of
// process pid's threads. (A thread that ended takes its count along; Go
// keeps its threads.)
func contextSwitches(pid int) (int64, error) {
	files, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil {
		return 0, fmt.Errorf("listing the threads of process %d: %w", pid, err)
	}
	if len(files) == 0 {
		return 0, fmt.Errorf("listing the threads of process %d: no such process", pid)
	}
	var sum int64
	for _, f := range files {
		v, err := procFields(f)
		if err != nil {
			continue // the thread ended meanwhile
		}
		sum += v["voluntary_ctxt_switches"] + v["nonvoluntary_ctxt_switches"]
	}
	return sum, nil
}

// procFields reads the "key: value" lines of a /proc file (io, status)
// whose values are integers; the others are left out.
func procFields(path string) (map[string]int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	fields := map[string]int64{}
	for line := range strings.Lines(string(b)) {
		k, v, _ := strings.Cut(line, ":")
		if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
			fields[k] = n
		}
	}
	return fields, nil
}

func readCounters(ctx context.Context, pp profiled) (procCounters, error) {
	var c procCounters
	u, err := pp.p.Usage()
	if err != nil {
		return c, err
	}
	c.cpu = u.CPU
	io, err := procFields(fmt.Sprintf("/proc/%d/io", pp.p.Pid()))
	if err != nil {
		return c, fmt.Errorf("reading %s syscall counts: %w", pp.p.Name(), err)
	}
	c.reads, c.writes = io["syscr"], io["syscw"]
	if c.switches, err = contextSwitches(pp.p.Pid()); err != nil {
		return c, fmt.Errorf("reading %s context switches: %w", pp.p.Name(), err)
	}
	m, err := promtext.Scrape(ctx, http.DefaultClient, "http://"+pp.health+"/metrics")
	if err != nil {
		return c, fmt.Errorf("reading %s metrics: %w", pp.p.Name(), err)
	}
	c.mallocs = m["go_memstats_mallocs_total"]
	return c, nil
}

// fetchProfile saves a profile the process takes over the next secs
// seconds (CPU, or the allocations made in that time).
func fetchProfile(ctx context.Context, pp profiled, kind string, secs int, file string) error {
	url := fmt.Sprintf("http://%s/debug/pprof/%s?seconds=%d", pp.health, kind, secs)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("fetching %s profile of %s: %w", kind, pp.p.Name(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("fetching %s profile of %s: %s: %s", kind, pp.p.Name(), resp.Status, body)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("saving %s profile of %s: %w", kind, pp.p.Name(), err)
	}
	return f.Close()
}

// profileGets runs small GETs against t for dur while procs are profiled,
// and writes the profiles into dir as <proc>-<mode>-<proto>-c<conc>.{cpu,allocs}.pprof.
func profileGets(ctx context.Context, dir string, t Target, h2 bool, conc int, dur time.Duration, procs []profiled) (ProfileResult, error) {
	res := ProfileResult{Mode: t.Name, H2: h2, Conc: conc}
	secs := max(1, int(dur.Seconds()))
	// The load warms up (connections, 20 requests per worker) before its
	// timed part; the profiles start with the counters, just before.
	loadc := make(chan error, 1)
	var lat Latencies
	before := make([]procCounters, len(procs))
	var wg sync.WaitGroup
	errs := make([]error, 2*len(procs))
	for i, pp := range procs {
		c, err := readCounters(ctx, pp)
		if err != nil {
			return res, err
		}
		before[i] = c
		base := filepath.Join(dir, fmt.Sprintf("%s-%s-%s-c%d", pp.p.Name(), t.Name, proto(h2), conc))
		res.Procs = append(res.Procs, ProcProfile{Name: pp.p.Name(), CPUFile: base + ".cpu.pprof", AllocFile: base + ".allocs.pprof"})
		wg.Go(func() { errs[2*i] = fetchProfile(ctx, pp, "profile", secs, base+".cpu.pprof") })
		wg.Go(func() { errs[2*i+1] = fetchProfile(ctx, pp, "allocs", secs, base+".allocs.pprof") })
	}
	go func() {
		var err error
		lat, err = SmallGets(ctx, t, h2, conc, dur)
		loadc <- err
	}()
	if err := <-loadc; err != nil {
		wg.Wait()
		return res, fmt.Errorf("profiled small GETs %s: %w", t.Name, err)
	}
	// Counters are read when the load ends: the warm-up's requests are
	// counted in both, so the per-request figures run a little high.
	res.Requests = len(lat.Samples) + 20*conc
	res.RPS = lat.PerSecond()
	for i, pp := range procs {
		after, err := readCounters(ctx, pp)
		if err != nil {
			wg.Wait()
			return res, err
		}
		n := float64(res.Requests)
		b := before[i]
		res.Procs[i].CPU = time.Duration(float64(after.cpu-b.cpu) / n)
		res.Procs[i].Mallocs = (after.mallocs - b.mallocs) / n
		res.Procs[i].Reads = float64(after.reads-b.reads) / n
		res.Procs[i].Writes = float64(after.writes-b.writes) / n
		res.Procs[i].Switches = float64(after.switches-b.switches) / n
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

// runProfiles profiles relay and agent under small-GET loads in both
// modes, over both protocols, at 1 and 64 concurrent.
func runProfiles(ctx context.Context, o Options, relay profiled, agents map[string]profiled, targets []Target, res *Results, say func(string)) error {
	if err := os.MkdirAll(o.ProfileDir, 0o755); err != nil {
		return fmt.Errorf("creating profile directory: %w", err)
	}
	for _, t := range targets {
		agent, ok := agents[t.Name]
		if !ok {
			continue
		}
		for _, h2 := range []bool{false, true} {
			for _, conc := range []int{1, 64} {
				say(fmt.Sprintf("profiling %s, %s, %d concurrent", t.Name, proto(h2), conc))
				pr, err := profileGets(ctx, o.ProfileDir, t, h2, conc, o.ProfileDuration, []profiled{relay, agent})
				if err != nil {
					return err
				}
				res.Profiles = append(res.Profiles, pr)
			}
		}
	}
	return nil
}

// writeProfiles is the results file's section on the profiled runs.
func (r *Results) writeProfiles(b *strings.Builder) {
	if len(r.Profiles) == 0 {
		return
	}
	fmt.Fprintf(b, "\n## Cost per small GET (profiled run)\n\n"+
		"Relay and agent with `--pprof`, %v of small GETs per row (`-profile DIR` keeps the pprof files). Per request: CPU, Go heap "+
		"allocations, read/write syscalls (from /proc/<pid>/io; epoll and futex not counted), and context switches of all its threads "+
		"(/proc/<pid>/task/*/status: each a thread that slept and was woken, or was preempted; at 1 concurrent, mostly goroutine hand-offs that "+
		"woke a thread). The profiler itself costs a few percent.\n\n",
		r.Options.ProfileDuration)
	fmt.Fprintf(b, "| mode | protocol | concurrent | req/s | relay CPU µs | relay allocs | relay reads | relay writes | relay switches | agent CPU µs | agent allocs | agent reads | agent writes | agent switches |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range r.Profiles {
		row := []string{p.Mode, proto(p.H2), strconv.Itoa(p.Conc), fmt.Sprintf("%.0f", p.RPS)}
		for _, pp := range p.Procs {
			row = append(row, fmt.Sprintf("%.1f", float64(pp.CPU)/float64(time.Microsecond)), fmt.Sprintf("%.0f", pp.Mallocs),
				fmt.Sprintf("%.2f", pp.Reads), fmt.Sprintf("%.2f", pp.Writes), fmt.Sprintf("%.2f", pp.Switches))
		}
		fmt.Fprintf(b, "| %s |\n", strings.Join(row, " | "))
	}
}
