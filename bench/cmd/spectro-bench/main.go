// Command spectro-bench runs the benchmark (`make bench`) and writes the
// results file. It builds the relay and agent from this tree and runs them
// as separate processes on 127.0.0.1 so their CPU and memory can be read
// apart from the load generator's.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spectroproxy/spectro-proxy/bench"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "spectro-bench:", err)
		}
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("spectro-bench", flag.ContinueOnError)
	o := bench.Full()
	out := fs.String("out", "docs/bench-results.md", "The results file to write (Markdown).")
	fs.IntVar(&o.Reps, "reps", o.Reps, "Repetitions of every figure; the table shows medians and ranges.")
	fs.DurationVar(&o.GetDuration, "get-duration", o.GetDuration, "How long each small-GET and new-connection figure runs.")
	idle := fs.String("idle-tunnels", "1000,10000", "Idle tunnel counts at which relay memory is read; empty skips.")
	fs.DurationVar(&o.WANDelay, "wan-delay", o.WANDelay, "One-way delay of the long link; 0 skips it.")
	fs.StringVar(&o.Binaries.Relay, "relay-bin", "", "A relay binary to measure instead of building one from this tree (needs --agent-bin). The floors are still this tree's forwarder.")
	fs.StringVar(&o.Binaries.Agent, "agent-bin", "", "An agent binary to measure instead of building one from this tree.")
	skip := fs.String("skip", "", "Comma-separated groups of figures to leave out: get, tls, bulk, watch.")
	only := fs.Bool("skip-main", false, "Skip the comparison figures (for working on the idle or long-link phases).")
	fs.IntVar(&o.ScaleTunnels, "scale-tunnels", o.ScaleTunnels, "Idle tunnels over 3 relay replicas on etcd in the scale case; 0 skips it.")
	fs.BoolVar(&o.ScaleOnly, "scale-only", false, "Run only the scale case and replace its rows and section in --out, keeping the rest (make bench-scale).")
	fs.StringVar(&o.ProfileDir, "profile", "", "When set, run relay and agents with --pprof and, after the repetitions, save their CPU and allocation profiles under small-GET loads (both modes, HTTP/1.1 and HTTP/2, 1 and 64 concurrent) into this directory.")
	fs.DurationVar(&o.ProfileDuration, "profile-duration", o.ProfileDuration, "How long each profiled load runs.")
	frp := fs.String("frp", "build", "frp, measured beside the modes as the peer to beat: \"build\" builds frps and frpc "+bench.FRPVersion+" from the Go module proxy once, cached beside the control plane's binaries (a failed build is reported and the run goes on without frp); a directory holding frps and frpc; or \"off\".")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o.IdleTunnels = nil
	for _, f := range strings.Split(*idle, ",") {
		if f = strings.TrimSpace(f); f != "" {
			var n int
			if _, err := fmt.Sscan(f, &n); err != nil || n <= 0 {
				return fmt.Errorf("--idle-tunnels %q: want positive counts", *idle)
			}
			o.IdleTunnels = append(o.IdleTunnels, n)
		}
	}
	if (o.Binaries.Relay == "") != (o.Binaries.Agent == "") {
		return errors.New("--relay-bin and --agent-bin go together")
	}
	o.Skip = map[string]bool{}
	for _, g := range strings.Split(*skip, ",") {
		if g = strings.TrimSpace(g); g != "" {
			o.Skip[g] = true
		}
	}
	if *only {
		o.Reps = 0
	}
	if o.ScaleOnly && o.ScaleTunnels <= 0 {
		return errors.New("--scale-only needs --scale-tunnels > 0")
	}
	dir, err := os.MkdirTemp("", "spectro-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	o.Dir = dir
	o.Log = slog.New(slog.DiscardHandler)
	start := time.Now()
	o.Progress = func(s string) { fmt.Fprintf(os.Stderr, "[%5.0fs] %s\n", time.Since(start).Seconds(), s) }
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch {
	case *frp == "off" || o.ScaleOnly || *only:
	case *frp == "build":
		o.Progress("building frp " + bench.FRPVersion + " (once; cached)")
		if o.FRP, err = bench.BuildFRP(ctx, ""); err != nil {
			o.Progress(fmt.Sprintf("frp not measured: %v", err))
		}
	default:
		o.FRP = bench.FRPBinaries{Server: filepath.Join(*frp, "frps"), Client: filepath.Join(*frp, "frpc")}
	}
	res, err := bench.Run(ctx, o)
	if err != nil {
		return err
	}
	if o.ScaleOnly {
		old, err := os.ReadFile(*out)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if err := os.WriteFile(*out, bench.SpliceScale(old, res), 0o644); err != nil {
			return err
		}
	} else {
		f, err := os.Create(*out)
		if err != nil {
			return err
		}
		if err := res.WriteMarkdown(f, "make bench"); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "targets (ratio to the floor measured in this run; load %s at start, %s at end, %d cores):\n", res.Machine.LoadStart, res.Machine.LoadEnd, res.Machine.Cores)
	for _, v := range res.Verdicts() {
		met := "met"
		if !v.Met {
			met = "NOT MET"
		}
		detail := ""
		if v.Floor != "" {
			detail = fmt.Sprintf("(%s %s vs %s %s %s)", v.Mode, trim(v.Measured), v.Floor, trim(v.FloorValue), v.Unit)
		}
		fmt.Fprintf(os.Stderr, "%-66s %-11s %6.2f  %-16s %-8s %s\n", v.Label, v.Mode, v.Value, v.Target, met, detail)
	}
	if cs := res.AgainstFRP(); len(cs) > 0 {
		fmt.Fprintf(os.Stderr, "against frp %s (multiple of frp's figure, above 1 is better):\n", bench.FRPVersion)
		for _, c := range cs {
			verdict := "passthrough ahead"
			if !c.PassthroughAhead() {
				verdict = "passthrough BEHIND"
			}
			if !c.TerminateMet() {
				verdict += fmt.Sprintf(", terminate below %.1f×", bench.FRPTerminateLimit)
			}
			fmt.Fprintf(os.Stderr, "%-66s passthrough %5.2f  terminate %5.2f  %s\n", c.Label, c.PassthroughX, c.TerminateX, verdict)
		}
	}
	fmt.Fprintf(os.Stderr, "wrote %s in %s\n", *out, time.Since(start).Round(time.Second))
	return nil
}

func trim(v float64) string {
	if v >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2f", v)
}
