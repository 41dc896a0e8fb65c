package bench

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// figure is one row of the comparison table.
type figure struct {
	key, label, unit string
	// lower means a smaller value is better (latency, CPU).
	lower bool
	// target is the ratio to direct the proxy must reach (0: none):
	// at most target when lower, at least target otherwise.
	target float64
	// perConn marks figures of new connections: floor+TLS makes a TLS
	// handshake between its forwarders per connection, which a tunnel
	// does not, so it is no floor for them.
	perConn bool
}

var figures = []figure{
	{"get_h1_c1_p50", "small GET p50, HTTP/1.1, 1 concurrent", "µs", true, 1.6, false},
	{"get_h1_c1_p99", "small GET p99, HTTP/1.1, 1 concurrent", "µs", true, 0, false},
	{"get_h1_c1_rps", "small GET req/s, HTTP/1.1, 1 concurrent", "req/s", false, 0, false},
	{"get_h1_c64_p50", "small GET p50, HTTP/1.1, 64 concurrent", "µs", true, 0, false},
	{"get_h1_c64_p99", "small GET p99, HTTP/1.1, 64 concurrent", "µs", true, 0, false},
	{"get_h1_c64_rps", "small GET req/s, HTTP/1.1, 64 concurrent", "req/s", false, 0.75, false},
	{"get_h2_c1_p50", "small GET p50, HTTP/2, 1 concurrent", "µs", true, 1.6, false},
	{"get_h2_c1_p99", "small GET p99, HTTP/2, 1 concurrent", "µs", true, 0, false},
	{"get_h2_c1_rps", "small GET req/s, HTTP/2, 1 concurrent", "req/s", false, 0, false},
	{"get_h2_c64_p50", "small GET p50, HTTP/2, 64 concurrent", "µs", true, 0, false},
	{"get_h2_c64_p99", "small GET p99, HTTP/2, 64 concurrent", "µs", true, 0, false},
	{"get_h2_c64_rps", "small GET req/s, HTTP/2, 64 concurrent", "req/s", false, 0.75, false},
	{"tls_c1_cps", "new TLS connections/s, 1 concurrent", "conn/s", false, 0.75, true},
	{"tls_c8_cps", "new TLS connections/s, 8 concurrent", "conn/s", false, 0.75, true},
	{"dl_1_mibps", "10 MiB download, 1 stream", "MiB/s", false, 0.60, false},
	{"ul_1_mibps", "10 MiB upload, 1 stream", "MiB/s", false, 0.55, false},
	{"dl_conns_mibps", "10 MiB download, 8 connections", "MiB/s", false, 0, false},
	{"ul_conns_mibps", "10 MiB upload, 8 connections", "MiB/s", false, 0, false},
	{"dl_h2_mibps", "10 MiB download, 8 HTTP/2 streams on 1 connection", "MiB/s", false, 0.85, false},
	{"ul_h2_mibps", "10 MiB upload, 8 HTTP/2 streams on 1 connection", "MiB/s", false, 0, false},
	{"watch_p50", "watch event latency p50 at 1000 events/s", "µs", true, 1.5, false},
	{"watch_p99", "watch event latency p99 at 1000 events/s", "µs", true, 0, false},
}

// encryptedFloor is the floor that does each mode's TLS and nothing else.
var encryptedFloor = map[string]string{ModePassthrough: ModeFloorTLS, ModeTerminate: ModeFloorTerminate}

// Spread is the median and range of repeated figures.
type Spread struct{ Median, Min, Max float64 }

func spread(v []float64) Spread {
	if len(v) == 0 {
		return Spread{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Spread{Median: m, Min: s[0], Max: s[len(s)-1]}
}

func (s Spread) String() string {
	if s.Min == s.Max {
		return num(s.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", num(s.Median), num(s.Min), num(s.Max))
}

func num(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// Ratio is the proxy's median over direct's.
func (r *Results) Ratio(key, mode string) (float64, bool) {
	d := spread(r.Values[key][ModeDirect]).Median
	p := r.Values[key][mode]
	if d == 0 || len(p) == 0 {
		return 0, false
	}
	return spread(p).Median / d, true
}

// Verdict is whether a figure meets its target.
type Verdict struct {
	Label, Mode, Target string
	Value               float64
	Met                 bool
	// Floor is the same figure for two plain TCP forwarders; FloorTLS for
	// a pair that does this mode's TLS and nothing else (0 when not
	// measured or not comparable).
	Floor, FloorTLS float64
}

// Verdicts checks every target the results can speak to.
func (r *Results) Verdicts() []Verdict {
	var out []Verdict
	for _, f := range figures {
		if f.target == 0 {
			continue
		}
		for _, mode := range []string{ModePassthrough, ModeTerminate} {
			ratio, ok := r.Ratio(f.key, mode)
			if !ok {
				continue
			}
			v := Verdict{Label: f.label, Mode: mode, Value: ratio}
			v.Floor, _ = r.Ratio(f.key, ModeFloor)
			if !f.perConn {
				v.FloorTLS, _ = r.Ratio(f.key, encryptedFloor[mode])
			}
			if f.lower {
				v.Target, v.Met = fmt.Sprintf("≤ %.2f×", f.target), ratio <= f.target
			} else {
				v.Target, v.Met = fmt.Sprintf("≥ %.2f×", f.target), ratio >= f.target
			}
			out = append(out, v)
		}
	}
	for _, mode := range []string{ModePassthrough, ModeTerminate} {
		if v := r.Values["cpu_s_per_gib"][mode]; len(v) > 0 {
			m := spread(v).Median
			out = append(out, Verdict{Label: "relay + agent CPU per GiB moved", Mode: mode, Target: "≤ 3.00 s", Value: m, Met: m <= 3.0,
				Floor: spread(r.Values["cpu_s_per_gib"][ModeFloor]).Median, FloorTLS: spread(r.Values["cpu_s_per_gib"][encryptedFloor[mode]]).Median})
		}
	}
	for _, p := range r.Idle.Points {
		if p.Tunnels < 10000 {
			continue // the target is set at 10,000; smaller counts are in the detail table
		}
		kib := p.PerTunnel / 1024
		out = append(out, Verdict{Label: fmt.Sprintf("relay RSS per idle tunnel at %d tunnels (KiB)", p.Tunnels), Mode: "relay",
			Target: "≤ 32 KiB", Value: kib, Met: kib <= 32})
	}
	out = append(out, r.Scale.verdicts()...)
	for _, w := range r.WAN {
		out = append(out, Verdict{Label: fmt.Sprintf("%d HTTP/2 downloads on one connection over the long link, longest pause (s)", r.Options.Parallel),
			Mode: w.Mode, Target: fmt.Sprintf("no stall (< %v)", stallGap), Value: w.Streams.MaxGap.Seconds(), Met: !w.Stalled})
	}
	return out
}

// WriteMarkdown writes the results file.
func (r *Results) WriteMarkdown(w io.Writer, command string) error {
	var b strings.Builder
	m := r.Machine
	fmt.Fprintf(&b, "# Benchmark results\n\n")
	fmt.Fprintf(&b, "Written by `%s` (bench/, see [How it measures](#how-it-measures)). "+
		"Ratios are Spectro Proxy over a direct connection to the same backend, measured in the same run.\n\n", command)
	fmt.Fprintf(&b, "| machine | |\n|---|---|\n")
	fmt.Fprintf(&b, "| CPU | %s |\n| cores | %d |\n| Go | %s |\n| kernel | %s |\n", m.CPU, m.Cores, m.GoVersion, m.Kernel)
	fmt.Fprintf(&b, "| date | %s |\n| duration | %s |\n", r.Started.UTC().Format("2006-01-02 15:04 MST"), r.Took.Round(time.Second))
	fmt.Fprintf(&b, "| load average (1, 5, 15 min) at start / end | %s / %s |\n", m.LoadStart, m.LoadEnd)
	fmt.Fprintf(&b, "| repetitions | %d (figures are medians, ranges in parentheses) |\n\n", r.Options.Reps)
	// Only the load at the start says anything about other work: by the
	// end, the benchmark's own processes have kept every core busy.
	if busy(m.LoadStart, m.Cores) {
		fmt.Fprintf(&b, "**The machine was busy with other work when this run started** (1-minute load above %d on %d cores): "+
			"direct and proxied figures were disturbed unevenly, so read ratios whose direct range is wide with care.\n\n", m.Cores, m.Cores)
	}

	fmt.Fprintf(&b, "## Targets\n\n")
	if _, ok := r.Values["get_h1_c1_p50"][ModeFloor]; ok {
		fmt.Fprintf(&b, "The floor columns are the same figure for two TCP forwarder processes standing where relay and agent stand "+
			"(`bench/cmd/tcp-forwarder`: io.Copy, one goroutine per direction, no tunnel). *floor*: plain TCP between them, what any "+
			"relay-and-agent design pays on this machine before doing any work of its own. *with this mode's TLS*: for passthrough, TLS "+
			"between the two (floor+TLS: the least an encrypted tunnel costs); for terminate, also the client's TLS ended at the first and "+
			"TLS from the second to the backend (floor+terminate). Not shown for new connections, where those pairs make handshakes per "+
			"connection that a tunnel does not. A target a floor misses cannot be met by any relay and agent here.\n\n")
	}
	fmt.Fprintf(&b, "| figure | mode | target | measured | met | floor | with this mode's TLS |\n|---|---|---|---|---|---|---|\n")
	for _, v := range r.Verdicts() {
		unit := "×"
		if !strings.HasSuffix(v.Target, "×") {
			unit = ""
		}
		met := "yes"
		if !v.Met {
			met = "**no**"
		}
		floor := func(f float64) string {
			if f == 0 {
				return ""
			}
			return fmt.Sprintf("%.2f%s", f, unit)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %.2f%s | %s | %s | %s |\n", v.Label, v.Mode, v.Target, v.Value, unit, met, floor(v.Floor), floor(v.FloorTLS))
	}

	fmt.Fprintf(&b, "\nWhat the proxy adds to one small GET at 1 concurrent (p50, absolute):")
	for _, key := range []string{"get_h1_c1_p50", "get_h2_c1_p50", "watch_p50"} {
		d := spread(r.Values[key][ModeDirect]).Median
		fmt.Fprintf(&b, " %s:", key)
		for _, mode := range []string{ModePassthrough, ModeTerminate, ModeFloor, ModeFloorTLS, ModeFloorTerminate} {
			if v := r.Values[key][mode]; len(v) > 0 {
				fmt.Fprintf(&b, " %s +%.0f µs", mode, spread(v).Median-d)
			}
		}
		fmt.Fprintf(&b, ";")
	}
	fmt.Fprintf(&b, " see [Notes](#notes) for where it goes.\n")

	fmt.Fprintf(&b, "\n## All figures\n\n| figure | unit | direct | passthrough | × | terminate | × | floor | × | floor+TLS | × | floor+terminate | × |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, f := range figures {
		row := []string{f.label, f.unit, spread(r.Values[f.key][ModeDirect]).String()}
		for _, mode := range []string{ModePassthrough, ModeTerminate, ModeFloor, ModeFloorTLS, ModeFloorTerminate} {
			if (mode == ModeFloorTLS || mode == ModeFloorTerminate) && f.perConn {
				row = append(row, "–", "")
				continue
			}
			row = append(row, spread(r.Values[f.key][mode]).String())
			if ratio, ok := r.Ratio(f.key, mode); ok {
				row = append(row, fmt.Sprintf("%.2f", ratio))
			} else {
				row = append(row, "")
			}
		}
		fmt.Fprintf(&b, "| %s |\n", strings.Join(row, " | "))
	}

	fmt.Fprintf(&b, "\n## CPU and memory of relay and agent\n\n| figure | passthrough | terminate | floor | floor+TLS | floor+terminate |\n|---|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| relay + agent CPU seconds per GiB moved (all bulk transfers) | %s | %s | %s | %s | %s |\n",
		spread(r.Values["cpu_s_per_gib"][ModePassthrough]), spread(r.Values["cpu_s_per_gib"][ModeTerminate]),
		spread(r.Values["cpu_s_per_gib"][ModeFloor]), spread(r.Values["cpu_s_per_gib"][ModeFloorTLS]),
		spread(r.Values["cpu_s_per_gib"][ModeFloorTerminate]))
	mib := func(key string) string {
		v := r.Values[key][""]
		if len(v) == 0 {
			return "–"
		}
		return fmt.Sprintf("%.1f MiB", v[0]/(1<<20))
	}
	fmt.Fprintf(&b, "\n| process | RSS idle | RSS peak under load |\n|---|---|---|\n")
	for _, p := range []string{"relay", "agent-pt", "agent-tm"} {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", p, mib("rss_idle_"+p), mib("rss_load_"+p))
	}
	fmt.Fprintf(&b, "\nThe relay serves both modes (one process); agent-pt is the passthrough agent, agent-tm the terminate one.\n")

	if len(r.Idle.Points) > 0 {
		fmt.Fprintf(&b, "\n## Relay memory with idle tunnels\n\nA fresh relay; agents in the harness process, one WebSocket each running the real agent's tunnel server. Nobody uses these tunnels, so "+
			"neither side has started HTTP/2 on them (it starts on a tunnel's first stream); a tunnel that has carried a request keeps its "+
			"HTTP/2 client, about 13 KiB more (39.4 KiB per tunnel before HTTP/2 started lazily).\n\n")
		fmt.Fprintf(&b, "| tunnels | relay RSS | per tunnel over the %.1f MiB baseline | Go heap in use | goroutine stacks | goroutines |\n|---|---|---|---|---|---|\n", float64(r.Idle.Baseline)/(1<<20))
		for _, p := range r.Idle.Points {
			fmt.Fprintf(&b, "| %d | %.1f MiB | %.1f KiB | %.1f MiB | %.1f MiB | %d |\n", p.Tunnels, float64(p.RSS)/(1<<20), p.PerTunnel/1024,
				float64(p.HeapInuse)/(1<<20), float64(p.StackInuse)/(1<<20), p.Goroutines)
		}
	}

	if len(r.WAN) > 0 {
		rtt := 2 * r.Options.WANDelay
		fmt.Fprintf(&b, "\n## Long link: %v round trip\n\n", rtt)
		fmt.Fprintf(&b, "A delay line on loopback holds every chunk %v each way: between agent and relay, and for direct between client and backend. "+
			"For scale: a 64 KiB flow-control window would cap one stream at %.1f MiB/s on this link.\n\n", r.Options.WANDelay, 64.0/1024/rtt.Seconds())
		fmt.Fprintf(&b, "| mode | 1 stream | %d HTTP/2 streams on 1 connection | longest pause of any stream |\n|---|---|---|---|\n", r.Options.Parallel)
		for _, w := range r.WAN {
			fmt.Fprintf(&b, "| %s | %.1f MiB/s | %.1f MiB/s | %v |\n", w.Mode, w.Single.MiBps(), w.Streams.MiBps(), w.Streams.MaxGap.Round(time.Millisecond))
		}
	}

	if r.Scale != nil {
		r.Scale.writeMarkdown(&b)
	}

	fmt.Fprintf(&b, "\n## Integrity checks\n\n")
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "- %s\n", c)
	}
	o := r.Options
	fmt.Fprintf(&b, "\n## How it measures\n\n"+
		"- Backend: a Go HTTPS server (HTTP/1.1 and HTTP/2, ECDSA P-256) shaped like an API server: a %d-byte ConfigMap, a %d MiB pod list, an upload sink, and a watch writing ~1 KiB events with their send time.\n"+
		"- Relay and agents are the real binaries, built from this tree and run as separate processes on 127.0.0.1; "+
		"the load generator is the harness process. Everything shares the same %d cores, so the proxy's CPU competes with the load itself.\n"+
		"- direct: client to backend. passthrough: client to relay (SNI), raw TLS to the backend through the tunnel. "+
		"terminate: TLS ends at the relay, each request is an HTTP/2 stream through the tunnel, the agent re-encrypts to the backend.\n"+
		"- Small GETs: %v per figure after warm-up; HTTP/1.1 uses one keep-alive connection per concurrent worker, HTTP/2 one connection for all.\n"+
		"- New TLS connections: each GET opens a TCP connection and a full TLS handshake (no session resumption).\n"+
		"- Bulk: 1 stream = %d transfers in a row on one connection; parallel = %d workers × %d transfers, on %d HTTP/1.1 connections or on %d HTTP/2 streams of one connection. Connections are open before timing starts.\n"+
		"- Watch: %d events at %d/s over HTTP/2; latency is arrival time minus the backend's write time (same clock).\n"+
		"- CPU: utime+stime of relay and agent from /proc across all bulk transfers of a repetition, over the payload bytes moved. RSS from /proc (VmRSS); peak sampled every 50 ms.\n"+
		"- Idle tunnels: relay RSS once it has settled (within 2%% for 2 s) after the tunnels are up, minus the fresh relay's RSS.\n",
		len(jsonObject(1024)), o.ListSize>>20, r.Machine.Cores, o.GetDuration, o.EachSingle, o.Parallel, o.EachParallel, o.Parallel, o.Parallel, o.WatchEvents, o.WatchRate)
	b.WriteString(notes)
	_, err := io.WriteString(w, b.String())
	return err
}

// notes explains the figures that do not depend on one run.
const notes = `
## Notes

- **The direct baseline is a Go client and a Go server on one loopback**, answering a static 1 KiB
  object in about 30 µs. A real kube-apiserver takes hundreds of µs to milliseconds for the same GET
  (authentication, authorization, admission, serialization), so the ratios here are the worst case;
  the absolute µs the proxy adds are the figures to carry over.
- **The floors.** Two TCP forwarder processes where relay and agent stand (` + "`bench/cmd/tcp-forwarder`" + `: io.Copy, one
  goroutine per direction, which between two TCP sockets even splices in the kernel) are what the two extra processes on the
  path cost before any proxy work: each hop is a loopback write, a wakeup of another process and a read. With TLS between
  them (floor+TLS) they are the least an encrypted tunnel costs: the tunnel crosses the internet, so its bytes are
  encrypted by one side and decrypted by the other whatever the design. Where a floor misses a target, no relay-and-agent
  design can meet that target on this machine, and the proxy's own cost is its distance from the floor, not from 1.0.
- **Where the rest of the latency goes.** Beyond the floor, a passthrough request adds the tunnel's TLS leg and the
  goroutine changes x/net's HTTP/2 has at every layer: on the agent the frame reader, the serve loop and the handler's
  copier; on the relay the transport's read loop and the copier to the client. On 2 cores with every process competing,
  each wakeup that has to find an idle thread costs tens of µs. Terminate mode adds TLS termination, HTTP parsing and a
  reverse proxy on both sides.
- **Where the CPU goes.** Relay and agent add two TLS legs (the tunnel) to the client's and backend's, plus WebSocket
  framing and masking; terminate mode adds a third TLS leg (the relay terminates, the agent re-encrypts). Write syscalls
  were a third of relay and agent CPU until tunnel messages were written with one syscall each (` + "`tunnel.BatchConn`" + `);
  what remains is mostly the kernel's loopback copies, AES-GCM and memmove. Relay and agent CPU per GiB is the fair
  figure for capacity planning.
- **Idle tunnels.** An idle tunnel holds a TLS connection, a WebSocket with a 512-byte read buffer and one goroutine
  waiting for the agent: HTTP/2 (x/net's 8 KiB of buffers, framer, HPACK state and read loop) starts on the tunnel's
  first use, and WebSocket pings watch the tunnel until then. Per tunnel: 52.3 KiB at 10,000 when this work started; at
  3,000, 49.2 KiB, then 39.4 KiB once the cleanup goroutine and the 4 KiB read buffer went, then 26.1 KiB with HTTP/2
  started on first use.
`

// busy reports whether a "1 5 15" load string shows a 1-minute load above
// the core count: other processes then competed with the benchmark.
func busy(load string, cores int) bool {
	var l1 float64
	if _, err := fmt.Sscan(load, &l1); err != nil {
		return false
	}
	return l1 > float64(cores)
}
