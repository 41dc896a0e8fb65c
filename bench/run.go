package bench

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/proctest"
)

// Options size a run. Full is what `make bench` runs; the smoke test uses
// far smaller figures.
type Options struct {
	Reps        int
	GetDuration time.Duration // per small-GET and new-connection measurement
	ListSize    int           // bytes of the list (download and upload body)
	// Each is how many transfers each worker does per bulk measurement, for
	// one stream and for parallel ones.
	EachSingle, EachParallel int
	Parallel                 int // connections and HTTP/2 streams in parallel runs
	WatchRate, WatchEvents   int
	IdleTunnels              []int // relay RSS measured after each count is up
	WANDelay                 time.Duration
	WANTransfers             int
	// ProfileDir, when set, has relay and agents serve their profiles
	// (--pprof) and, after the repetitions, profiles them under small-GET
	// loads (ProfileDuration each) into this directory.
	ProfileDir      string
	ProfileDuration time.Duration
	// Skip names groups of figures not to measure: "get", "tls", "bulk",
	// "watch" (for working on one of them).
	Skip map[string]bool
	// ScaleTunnels idle tunnels over 3 replicas on etcd (0: no scale
	// case); ScaleOnly runs nothing else (`make bench-scale`).
	ScaleTunnels int
	ScaleOnly    bool
	// ScaleRest is how long etcd's writes at rest are counted (default 10s).
	ScaleRest time.Duration

	// Dir holds binaries and state; Binaries skips the build when set.
	Dir      string
	Binaries Binaries
	// FRP, when set, is measured beside the modes as the peer to beat
	// (BuildFRP).
	FRP FRPBinaries
	Log *slog.Logger
	// Progress receives one line per step.
	Progress func(string)
}

// Full is the `make bench` run, about 9 minutes on 2 cores.
func Full() Options {
	return Options{
		Reps: 5, GetDuration: 2 * time.Second, ListSize: 10 << 20,
		EachSingle: 6, EachParallel: 3, Parallel: 8,
		WatchRate: 1000, WatchEvents: 3000,
		IdleTunnels: []int{1000, 10000},
		WANDelay:    25 * time.Millisecond, WANTransfers: 4,
		ScaleTunnels:    10000,
		ProfileDuration: 10 * time.Second,
	}
}

// Modes in table order.
const (
	ModeDirect      = "direct"
	ModePassthrough = "passthrough"
	ModeTerminate   = "terminate"
	// ModeFloor is two plain TCP forwarder processes where relay and agent
	// stand: what any relay design pays for the two extra processes.
	ModeFloor = "floor"
	// ModeFloorTLS is the same pair with TLS between them: the least an
	// encrypted tunnel can cost.
	ModeFloorTLS = "floor+TLS"
	// ModeFloorTerminate adds TLS on both outer legs too (the relay-side
	// forwarder terminates the client's TLS, the agent-side one
	// re-encrypts to the backend): the least terminate mode can cost.
	ModeFloorTerminate = "floor+terminate"
)

// floorPair is two tcp-forwarder processes where relay and agent stand.
type floorPair struct {
	far, near *Proc
	target    Target
}

// startFloors starts the three floors. The agent-side forwarder of each
// starts first: it dials the backend.
func startFloors(ctx context.Context, o Options, bin string, be *Backend) (pairs []floorPair, err error) {
	defer func() {
		if err != nil {
			for _, p := range pairs {
				p.far.Stop(time.Second)
				p.near.Stop(time.Second)
			}
		}
	}()
	// Each forwarder that serves TLS writes its new CA to a directory of
	// its own, read by the one that dials it.
	dirs := map[string]string{}
	for _, name := range []string{"floor-tls-tunnel", "floor-terminate-tunnel", "floor-terminate-edge"} {
		if dirs[name], err = stateDir(o, name); err != nil {
			return nil, err
		}
	}
	ca := func(name string) string { return filepath.Join(dirs[name], "ca.crt") }
	for _, f := range []struct {
		mode            string
		nearArgs        []string
		farArgs         []string
		clientTrustsFar bool
	}{
		{mode: ModeFloor},
		{mode: ModeFloorTLS,
			nearArgs: []string{"--tls-listen", dirs["floor-tls-tunnel"]},
			farArgs:  []string{"--tls-to", ca("floor-tls-tunnel")}},
		{mode: ModeFloorTerminate,
			nearArgs:        []string{"--tls-listen", dirs["floor-terminate-tunnel"], "--tls-to", be.CAFile},
			farArgs:         []string{"--tls-listen", dirs["floor-terminate-edge"], "--tls-to", ca("floor-terminate-tunnel")},
			clientTrustsFar: true},
	} {
		near, nearAddr, err := StartForwarder(ctx, bin, f.mode+"-agent", be.Addr, f.nearArgs...)
		if err != nil {
			return pairs, err
		}
		far, farAddr, err := StartForwarder(ctx, bin, f.mode+"-relay", nearAddr, f.farArgs...)
		if err != nil {
			near.Stop(time.Second)
			return pairs, err
		}
		pairs = append(pairs, floorPair{far: far, near: near,
			target: Target{Name: f.mode, Addr: farAddr, Host: "127.0.0.1", Roots: be.Roots}})
		if f.clientTrustsFar {
			caPEM, err := os.ReadFile(ca("floor-terminate-edge"))
			if err != nil {
				return pairs, fmt.Errorf("reading floor CA: %w", err)
			}
			if pairs[len(pairs)-1].target.Roots, err = pki.Pool(caPEM); err != nil {
				return pairs, err
			}
		}
	}
	return pairs, nil
}

// Results is one run.
type Results struct {
	Machine Machine
	Options Options
	Started time.Time
	Took    time.Duration
	// Values holds one figure per repetition: Values[metric][mode].
	Values map[string]map[string][]float64
	// Idle is the relay's memory with idle tunnels.
	Idle IdleResult
	// WAN is the long-link phase.
	WAN []WANResult
	// Scale is the scale-out case (nil when not run).
	Scale *ScaleResult
	// Checks lists the integrity checks that passed.
	Checks []string
	// Profiles are the profiled small-GET runs (Options.ProfileDir).
	Profiles []ProfileResult
}

func (r *Results) add(metric, mode string, v float64) {
	if r.Values[metric] == nil {
		r.Values[metric] = map[string][]float64{}
	}
	r.Values[metric][mode] = append(r.Values[metric][mode], v)
}

// IdleResult is relay RSS with many idle tunnels.
type IdleResult struct {
	Baseline int64
	Points   []IdlePoint
}

// IdlePoint is relay RSS with Tunnels idle tunnels up.
type IdlePoint struct {
	Tunnels   int
	RSS       int64
	PerTunnel float64 // bytes
	// From the relay's Go runtime metrics at the same time.
	HeapInuse, StackInuse int64
	Goroutines            int
}

// WANResult is one target over the long link.
type WANResult struct {
	Mode    string
	Single  Throughput
	Streams StreamsResult
	Stalled bool
}

// stallGap is the pause that counts as a stall on the long link: many
// round trips with nothing moving.
const stallGap = time.Second

// Run runs the benchmark.
func Run(ctx context.Context, o Options) (*Results, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	say := o.Progress
	if say == nil {
		say = func(string) {}
	}
	raiseFileLimit()
	res := &Results{Machine: ReadMachine(), Options: o, Started: time.Now(), Values: map[string]map[string][]float64{}}
	if o.Binaries.Relay == "" {
		say("building relay and agent")
		var err error
		if o.Binaries, err = Build(ctx, o.Dir); err != nil {
			return nil, err
		}
	} else if o.Binaries.Forwarder == "" {
		say("building the floor's forwarder")
		var err error
		if o.Binaries.Forwarder, err = BuildForwarder(ctx, o.Dir); err != nil {
			return nil, err
		}
	}
	bins := o.Binaries
	if o.ScaleOnly {
		if err := runScale(ctx, o, bins, res, say); err != nil {
			return nil, fmt.Errorf("scale case: %w", err)
		}
		res.Machine.LoadEnd = readLoad()
		res.Took = time.Since(res.Started)
		return res, nil
	}
	be, err := StartBackend(o.Dir, o.ListSize, []string{hostname.Host(hostname.DefaultSubdomain("pt"), Domain), hostname.Host(hostname.DefaultSubdomain("wpt"), Domain), frpHost}, o.Log)
	if err != nil {
		return nil, err
	}
	defer be.Close()

	if err := runMain(ctx, o, bins, be, res, say); err != nil {
		return nil, err
	}
	if o.WANDelay > 0 {
		if err := runWAN(ctx, o, bins, be, res, say); err != nil {
			return nil, err
		}
	}
	if len(o.IdleTunnels) > 0 {
		if err := runIdle(ctx, o, bins, res, say); err != nil {
			return nil, err
		}
	}
	if o.ScaleTunnels > 0 {
		if err := runScale(ctx, o, bins, res, say); err != nil {
			return nil, fmt.Errorf("scale case: %w", err)
		}
	}
	res.Machine.LoadEnd = readLoad()
	res.Took = time.Since(res.Started)
	return res, nil
}

// stateDir makes a fresh directory for a relay.
func stateDir(o Options, name string) (string, error) {
	d := filepath.Join(o.Dir, name)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return "", fmt.Errorf("creating %s: %w", d, err)
	}
	return d, nil
}

func runMain(ctx context.Context, o Options, bins Binaries, be *Backend, res *Results, say func(string)) error {
	dir, err := stateDir(o, "relay")
	if err != nil {
		return err
	}
	say("starting relay and agents")
	// Health ports (for profiles) only when profiling: the processes
	// measured otherwise are what a deployment runs.
	health := map[string]string{}
	args := func(name string) []string {
		if o.ProfileDir == "" {
			return nil
		}
		addr, err := proctest.FreeAddr()
		if err != nil {
			return nil // the profiled run then reports the missing port
		}
		health[name] = addr
		return profileArgs(addr)
	}
	relay, err := StartRelay(ctx, bins.Relay, dir, args("relay")...)
	if err != nil {
		return err
	}
	defer relay.Stop(5 * time.Second)
	pt, tm, stopAgents, err := startAgents(ctx, o, bins, relay, relay.Addr, "", be, args("agent-pt"), args("agent-tm"))
	if err != nil {
		return err
	}
	defer stopAgents()
	direct := Target{Name: ModeDirect, Addr: be.Addr, Host: "127.0.0.1", Roots: be.Roots}
	targets := []Target{direct, pt.Target, tm.Target}
	// procs are the processes on each path besides client and backend,
	// whose CPU per GiB is measured.
	procs := map[string][]*Proc{ModePassthrough: {relay.Proc, pt.Proc}, ModeTerminate: {relay.Proc, tm.Proc}}
	if bins.Forwarder != "" {
		floors, err := startFloors(ctx, o, bins.Forwarder, be)
		if err != nil {
			return err
		}
		for _, f := range floors {
			defer f.far.Stop(time.Second)
			defer f.near.Stop(time.Second)
			targets = append(targets, f.target)
			procs[f.target.Name] = []*Proc{f.far, f.near}
		}
	}
	if o.FRP.Server != "" {
		say("starting frp " + FRPVersion)
		f, err := startFRP(ctx, o, o.FRP, be)
		if err != nil {
			return err
		}
		defer f.stop()
		targets = append(targets, f.target)
		procs[ModeFRP] = []*Proc{f.server, f.client}
	}
	peaked := append([]*Proc{relay.Proc, pt.Proc, tm.Proc}, procs[ModeFRP]...)

	say("checking every path moves the bytes intact")
	for _, t := range targets {
		for _, tr := range []Transfer{
			{Name: "download HTTP/1.1", Workers: 1, Each: 1},
			{Name: "upload HTTP/1.1", Upload: true, Workers: 1, Each: 1},
			{Name: "download HTTP/2 x2", Workers: 2, Each: 1, H2: true},
			{Name: "upload HTTP/2 x2", Upload: true, Workers: 2, Each: 1, H2: true},
		} {
			if _, err := Bulk(ctx, t, be, tr, true); err != nil {
				return fmt.Errorf("integrity %s %s: %w", t.Name, tr.Name, err)
			}
			res.Checks = append(res.Checks, fmt.Sprintf("%s: %s of %d bytes, SHA-256 equal", t.Name, tr.Name, len(be.List)))
		}
	}

	// Idle figures come before any load has grown the heaps.
	for _, p := range []*Proc{relay.Proc, pt.Proc, tm.Proc} {
		rss, err := SettledRSS(ctx, p.Pid(), 5*time.Second)
		if err != nil {
			return err
		}
		res.add("rss_idle_"+p.Name(), "", float64(rss))
	}
	stopSampling := samplePeaks(peaked)

	transfers := []Transfer{
		{Name: "dl_1", Workers: 1, Each: o.EachSingle},
		{Name: "ul_1", Upload: true, Workers: 1, Each: o.EachSingle},
		{Name: "dl_conns", Workers: o.Parallel, Each: o.EachParallel},
		{Name: "ul_conns", Upload: true, Workers: o.Parallel, Each: o.EachParallel},
		{Name: "dl_h2", Workers: o.Parallel, Each: o.EachParallel, H2: true},
		{Name: "ul_h2", Upload: true, Workers: o.Parallel, Each: o.EachParallel, H2: true},
	}
	for rep := range o.Reps {
		load := readLoad()
		res.Machine.LoadPerRep = append(res.Machine.LoadPerRep, load)
		say(fmt.Sprintf("repetition %d/%d (load %s)", rep+1, o.Reps, load))
		for _, h2 := range []bool{false, true} {
			for _, conc := range []int{1, 64} {
				if o.Skip["get"] {
					break
				}
				for _, t := range targets {
					lat, err := SmallGets(ctx, t, h2, conc, o.GetDuration, procs[t.Name]...)
					if err != nil {
						return fmt.Errorf("small GETs %s: %w", t.Name, err)
					}
					key := fmt.Sprintf("get_%s_c%d", proto(h2), conc)
					res.add(key+"_p50", t.Name, us(lat.Quantile(0.5)))
					res.add(key+"_p99", t.Name, us(lat.Quantile(0.99)))
					res.add(key+"_rps", t.Name, lat.PerSecond())
					if conc > 1 && len(procs[t.Name]) > 0 {
						res.add(key+"_cpu_us", t.Name, us(lat.CPUPerOp()))
					}
				}
			}
		}
		for _, conc := range []int{1, 8} {
			if o.Skip["tls"] {
				break
			}
			for _, t := range targets {
				lat, err := NewConns(ctx, t, conc, o.GetDuration)
				if err != nil {
					return fmt.Errorf("new connections %s: %w", t.Name, err)
				}
				res.add(fmt.Sprintf("tls_c%d_cps", conc), t.Name, lat.PerSecond())
			}
		}
		cpu := map[string]time.Duration{}
		moved := map[string]int64{}
		for _, tr := range transfers {
			if o.Skip["bulk"] {
				break
			}
			for _, t := range targets {
				var before []proctest.Usage
				procs := procs[t.Name]
				for _, p := range procs {
					u, err := p.Usage()
					if err != nil {
						return err
					}
					before = append(before, u)
				}
				tp, err := Bulk(ctx, t, be, tr, false)
				if err != nil {
					return fmt.Errorf("%s %s: %w", tr.Name, t.Name, err)
				}
				for i, p := range procs {
					u, err := p.Usage()
					if err != nil {
						return err
					}
					cpu[t.Name] += u.CPU - before[i].CPU
				}
				moved[t.Name] += tp.Bytes
				res.add(tr.Name+"_mibps", t.Name, tp.MiBps())
			}
		}
		for mode, c := range cpu {
			res.add("cpu_s_per_gib", mode, c.Seconds()/(float64(moved[mode])/(1<<30)))
		}
		for _, t := range targets {
			if o.Skip["watch"] {
				break
			}
			lat, err := Watch(ctx, t, o.WatchRate, o.WatchEvents)
			if err != nil {
				return fmt.Errorf("watch %s: %w", t.Name, err)
			}
			res.add("watch_p50", t.Name, us(lat.Quantile(0.5)))
			res.add("watch_p99", t.Name, us(lat.Quantile(0.99)))
		}
	}
	for name, peak := range stopSampling() {
		res.add("rss_load_"+name, "", float64(peak))
	}
	if o.ProfileDir != "" {
		agents := map[string]profiled{pt.Target.Name: {p: pt.Proc, health: health["agent-pt"]}, tm.Target.Name: {p: tm.Proc, health: health["agent-tm"]}}
		if err := runProfiles(ctx, o, profiled{p: relay.Proc, health: health["relay"]}, agents, []Target{pt.Target, tm.Target}, res, say); err != nil {
			return err
		}
	}
	return nil
}

func runWAN(ctx context.Context, o Options, bins Binaries, be *Backend, res *Results, say func(string)) error {
	say(fmt.Sprintf("long link: %v round trip", 2*o.WANDelay))
	dir, err := stateDir(o, "relay-wan")
	if err != nil {
		return err
	}
	relay, err := StartRelay(ctx, bins.Relay, dir)
	if err != nil {
		return err
	}
	defer relay.Stop(5 * time.Second)
	toRelay, err := StartDelayLine(relay.Addr, o.WANDelay)
	if err != nil {
		return err
	}
	defer toRelay.Close()
	toBackend, err := StartDelayLine(be.Addr, o.WANDelay)
	if err != nil {
		return err
	}
	defer toBackend.Close()
	// The delay sits where the internet would: between agent and relay,
	// and for the direct case between client and API server.
	pt, tm, stopAgents, err := startAgents(ctx, o, bins, relay, toRelay.Addr, "w", be, nil, nil)
	if err != nil {
		return err
	}
	defer stopAgents()
	direct := Target{Name: ModeDirect, Addr: toBackend.Addr, Host: "127.0.0.1", Roots: be.Roots}
	for _, t := range []Target{direct, pt.Target, tm.Target} {
		single, err := Bulk(ctx, t, be, Transfer{Workers: 1, Each: o.WANTransfers}, false)
		if err != nil {
			return fmt.Errorf("long link %s: %w", t.Name, err)
		}
		streams, err := ParallelStreams(ctx, t, be, o.Parallel)
		if err != nil {
			return fmt.Errorf("long link %s, %d streams: %w", t.Name, o.Parallel, err)
		}
		res.WAN = append(res.WAN, WANResult{Mode: t.Name, Single: single, Streams: streams, Stalled: streams.MaxGap > stallGap})
		res.Checks = append(res.Checks, fmt.Sprintf("%s over the long link: %d parallel HTTP/2 downloads on one connection, SHA-256 equal", t.Name, o.Parallel))
	}
	return nil
}

func runIdle(ctx context.Context, o Options, bins Binaries, res *Results, say func(string)) error {
	dir, err := stateDir(o, "relay-idle")
	if err != nil {
		return err
	}
	relay, err := StartRelay(ctx, bins.Relay, dir)
	if err != nil {
		return err
	}
	defer relay.Stop(10 * time.Second)
	if res.Idle.Baseline, err = SettledRSS(ctx, relay.Pid(), 10*time.Second); err != nil {
		return err
	}
	agents := NewIdleAgents(relay)
	defer agents.Close()
	for _, n := range o.IdleTunnels {
		say(fmt.Sprintf("idle tunnels: connecting %d", n))
		if err := agents.Grow(ctx, n, 32); err != nil {
			return err
		}
		up := n
		if err := relay.WaitTunnels(ctx, n, time.Minute); err != nil {
			// On a busy machine an agent or two may still be
			// re-registering after a missed liveness check; the memory
			// of the tunnels that are up is still the figure, per tunnel
			// up. Fewer than 99% up is a broken run.
			got, terr := relay.Tunnels(ctx)
			if terr != nil || got < n*99/100 {
				return err
			}
			say(fmt.Sprintf("idle tunnels: %d of %d up after a minute; measuring those", got, n))
			up = got
		}
		rss, err := SettledRSS(ctx, relay.Pid(), 30*time.Second)
		if err != nil {
			return err
		}
		m, err := relay.Metrics(ctx)
		if err != nil {
			return err
		}
		res.Idle.Points = append(res.Idle.Points, IdlePoint{Tunnels: up, RSS: rss, PerTunnel: float64(rss-res.Idle.Baseline) / float64(up),
			HeapInuse: int64(m["go_memstats_heap_inuse_bytes"]), StackInuse: int64(m["go_memstats_stack_inuse_bytes"]), Goroutines: int(m["go_goroutines"])})
	}
	return nil
}

// startAgents starts a passthrough agent (cluster <prefix>pt) and a
// terminate one (<prefix>tm) dialing the relay at relayAddr, each with
// its extra flags.
func startAgents(ctx context.Context, o Options, bins Binaries, relay *Relay, relayAddr, prefix string, be *Backend, ptArgs, tmArgs []string) (pt, tm *Agent, stop func(), err error) {
	pt, err = StartAgent(ctx, bins.Agent, o.Dir, relay, relayAddr, prefix+"pt", ModePassthrough, be, ptArgs...)
	if err != nil {
		return nil, nil, nil, err
	}
	tm, err = StartAgent(ctx, bins.Agent, o.Dir, relay, relayAddr, prefix+"tm", ModeTerminate, be, tmArgs...)
	if err != nil {
		pt.Stop(5 * time.Second)
		return nil, nil, nil, err
	}
	return pt, tm, func() { tm.Stop(5 * time.Second); pt.Stop(5 * time.Second) }, nil
}

// samplePeaks records the highest RSS of each process until the returned
// function is called, which returns them by process name.
func samplePeaks(procs []*Proc) func() map[string]int64 {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	peaks := map[string]int64{}
	wg.Go(func() {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			for _, p := range procs {
				if u, err := p.Usage(); err == nil {
					peaks[p.Name()] = max(peaks[p.Name()], u.RSS)
				}
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	})
	return func() map[string]int64 {
		close(stop)
		wg.Wait()
		return peaks
	}
}

func proto(h2 bool) string {
	if h2 {
		return "h2"
	}
	return "h1"
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// Machine describes where a run happened.
type Machine struct {
	CPU       string
	Cores     int
	GoVersion string
	Kernel    string
	LoadStart string
	LoadEnd   string
	// LoadPerRep is the load average as each repetition started.
	LoadPerRep []string
}

// ReadMachine reads the CPU model, core count and load.
func ReadMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), LoadStart: readLoad()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}

// readLoad is the 1, 5 and 15 minute load averages.
func readLoad() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// raiseFileLimit lifts the soft open-files limit to the hard one: ten
// thousand idle tunnels need a socket each here and in the relay, which
// inherits the limit.
func raiseFileLimit() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}
