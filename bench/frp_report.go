package bench

import (
	"fmt"
	"strings"
)

// FRPTerminateLimit is issue 12's bar for terminate mode on small
// requests: at least 0.8 of frp's figure (passthrough must be ahead).
const FRPTerminateLimit = 0.8

// FRPComparison is one figure of passthrough and terminate against frp's.
type FRPComparison struct {
	Key, Label, Unit            string
	Passthrough, Terminate, FRP float64
	// PassthroughX and TerminateX are each mode's figure as a multiple of
	// frp's, turned so that above 1 is better than frp whichever way the
	// figure runs (frp's latency over the mode's, the mode's rate over
	// frp's).
	PassthroughX, TerminateX float64
	// Small marks the small-request figures, where terminate must reach
	// FRPTerminateLimit.
	Small bool
}

// PassthroughAhead is whether passthrough beats frp on this figure.
func (c FRPComparison) PassthroughAhead() bool { return c.PassthroughX > 1 }

// TerminateMet is whether terminate reaches the bar on a small-
// request figure (always true on the others, which have none).
func (c FRPComparison) TerminateMet() bool { return !c.Small || c.TerminateX >= FRPTerminateLimit }

// AgainstFRP compares every figure frp was measured on.
func (r *Results) AgainstFRP() []FRPComparison {
	var out []FRPComparison
	for _, f := range figures {
		frp := spread(r.Values[f.key][ModeFRP]).Median
		if frp == 0 {
			continue
		}
		c := FRPComparison{Key: f.key, Label: f.label, Unit: f.unit, FRP: frp,
			Passthrough: spread(r.Values[f.key][ModePassthrough]).Median,
			Terminate:   spread(r.Values[f.key][ModeTerminate]).Median,
			Small:       strings.HasPrefix(f.key, "get_")}
		c.PassthroughX, c.TerminateX = better(c.Passthrough, frp, f.lower), better(c.Terminate, frp, f.lower)
		out = append(out, c)
	}
	// Memory under load: frps against the relay, which in this run also
	// carried the terminate agent's load.
	if frps, relay := r.Values["rss_load_frps"][""], r.Values["rss_load_relay"][""]; len(frps) > 0 && len(relay) > 0 {
		c := FRPComparison{Key: "rss_load", Label: "relay (frps) RSS peak under load", Unit: "MiB",
			Passthrough: relay[0] / (1 << 20), Terminate: relay[0] / (1 << 20), FRP: frps[0] / (1 << 20)}
		c.PassthroughX, c.TerminateX = better(c.Passthrough, c.FRP, true), better(c.Terminate, c.FRP, true)
		out = append(out, c)
	}
	return out
}

// better is v as a multiple of base, above 1 when v is the better one.
func better(v, base float64, lower bool) float64 {
	if v == 0 || base == 0 {
		return 0
	}
	if lower {
		return base / v
	}
	return v / base
}

func (r *Results) writeFRP(b *strings.Builder) {
	cs := r.AgainstFRP()
	if len(cs) == 0 {
		return
	}
	fmt.Fprintf(b, "\n## Against frp\n\n"+
		"frp %s measured in the same run on the same client, backend and certificate: frps's HTTPS vhost routes the client's TLS by SNI, "+
		"frpc dials the backend, TLS and yamux between them (frp's defaults), so the client's TLS ends at the backend as in passthrough. "+
		"Each mode's figure is given as a multiple of frp's, turned so that above 1 is better than frp (frp's latency or CPU over the mode's; "+
		"the mode's rate over frp's). Issue 12 asks passthrough to be ahead of frp on every figure, and terminate at %.1f× frp or better on small requests.\n\n",
		FRPVersion, FRPTerminateLimit)
	fmt.Fprintf(b, "| figure | unit | frp | passthrough | × frp | ahead | terminate | × frp | |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range cs {
		ahead := "yes"
		if !c.PassthroughAhead() {
			ahead = "**no**"
		}
		tm := ""
		if c.Small {
			tm = fmt.Sprintf("≥ %.1f×: met", FRPTerminateLimit)
			if !c.TerminateMet() {
				tm = fmt.Sprintf("≥ %.1f×: **not met**", FRPTerminateLimit)
			}
		}
		fmt.Fprintf(b, "| %s | %s | %s | %s | %.2f | %s | %s | %.2f | %s |\n", c.Label, c.Unit, r.shown(c, ModeFRP, c.FRP), r.shown(c, ModePassthrough, c.Passthrough), c.PassthroughX, ahead,
			r.shown(c, ModeTerminate, c.Terminate), c.TerminateX, tm)
	}
}

// shown is c's figure for mode with its range over the repetitions, as
// the other tables give it: medians of noisy figures (watch p99) are
// only read with their spread.
func (r *Results) shown(c FRPComparison, mode string, median float64) string {
	if v := r.Values[c.Key][mode]; len(v) > 0 {
		return spread(v).String()
	}
	return num(median)
}
