package bench

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/promtext"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
	"github.com/spectroproxy/spectro-proxy/server"
)

// Scale-out case (issue 13): idle tunnels spread over replicas on one etcd.
const (
	scaleReplicas   = 3
	scaleLeaseTTL   = 10 * time.Second
	scaleRestWindow = 10 * time.Second
	scalePrefix     = "/spectro-proxy/"
	// Targets.
	scaleRSSTarget   = 32 << 10 // bytes per idle tunnel per replica, registry included
	scaleStormTarget = 60 * time.Second
)

// ScaleResult is the scale-out case.
type ScaleResult struct {
	Tunnels  int
	Replicas []ScaleReplica
	// At rest, per second over RestWindow: etcd's own counters, and the
	// relays' registry write counter summed.
	RestWindow                       time.Duration
	Puts, Deletes, KeepAlives, Renew float64
	RelayWrites                      map[string]float64 // by op
	// Storm: one replica SIGKILLed.
	Killed     string
	KilledHeld int
	// Reconnected: the survivors hold every tunnel again. Registered: etcd
	// lists every tunnel under a live replica. Expired: the killed
	// replica's keys are gone (its lease expired).
	Reconnected, Registered, Expired time.Duration
	Reconnects                       int
	RedialErrs                       map[string]int // failed redials by error
	// Refusals and Registrations are the survivors' counters over the
	// storm, by reason and by result.
	Refusals, Registrations map[string]float64
	// PutP99 is the announce put latency's 99th percentile during the
	// storm, from the survivors' spectro_proxy_registry_put_seconds (the
	// upper bound of its bucket); PutCount the puts it covers.
	PutP99   time.Duration
	PutCount int
	Took     time.Duration
}

// ScaleReplica is one replica's memory with its share of the tunnels.
type ScaleReplica struct {
	ID                  string
	Baseline, RSS       int64
	Held                int
	PerTunnel           float64 // bytes over the baseline per tunnel held
	HeapInuse           int64
	Goroutines          int
	ViewTunnels         int // tunnels in etcd when measured (every replica's view holds them all)
	Registrations, Fail float64
}

// scaleRelay is one replica process and its ports.
type scaleRelay struct {
	*Relay
	id, peer, health string
}

func runScale(ctx context.Context, o Options, bins Binaries, res *Results, say func(string)) error {
	started := time.Now()
	if err := testcluster.CheckBinaries("", false); err != nil {
		return fmt.Errorf("the scale case needs the cached etcd (make kube-bins): %w", err)
	}
	dir, err := stateDir(o, "scale")
	if err != nil {
		return err
	}
	say("scale: starting etcd and 3 relay replicas")
	etcd, err := testcluster.StartEtcd(ctx, filepath.Join(dir, "etcd"), o.Log)
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer etcd.Close()
	// StartEtcd polls /health with the default transport.
	defer http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	state := filepath.Join(dir, "state")
	var relays []*scaleRelay
	defer func() {
		for _, r := range relays {
			r.Stop(10 * time.Second)
		}
	}()
	for i := range scaleReplicas {
		r := &scaleRelay{id: fmt.Sprintf("r%d", i+1), peer: freeLocalAddr(), health: freeLocalAddr()}
		// The first creates the state (CA, certificate, signing key); the
		// others read the same files, as replicas mount the same Secrets.
		r.Relay, err = startRelayNamed(ctx, "relay-"+r.id, bins.Relay, state,
			"--replica-id", r.id, "--etcd-endpoints", etcd.Endpoint(), "--etcd-prefix", scalePrefix,
			"--lease-ttl", scaleLeaseTTL.String(), "--peer-listen", r.peer, "--peer-advertise", r.peer,
			"--health-addr", r.health)
		if err != nil {
			return fmt.Errorf("starting replica %s: %w", r.id, err)
		}
		relays = append(relays, r)
		if err := waitReadyz(ctx, r.health, 30*time.Second); err != nil {
			return fmt.Errorf("replica %s: %w\n%s", r.id, err, r.Tail(20))
		}
	}
	rest := o.ScaleRest
	if rest <= 0 {
		rest = scaleRestWindow
	}
	sr := &ScaleResult{Tunnels: o.ScaleTunnels, RestWindow: rest}
	res.Scale = sr
	for _, r := range relays {
		base, err := SettledRSS(ctx, r.Pid(), 10*time.Second)
		if err != nil {
			return err
		}
		sr.Replicas = append(sr.Replicas, ScaleReplica{ID: r.id, Baseline: base})
	}

	var addrs []string
	for _, r := range relays {
		addrs = append(addrs, r.Addr)
	}
	agents := NewFleetAgents(relays[0].Relay, addrs)
	defer agents.Close()
	say(fmt.Sprintf("scale: connecting %d idle tunnels over %d replicas", o.ScaleTunnels, len(relays)))
	if err := agents.Grow(ctx, o.ScaleTunnels, 32); err != nil {
		return err
	}
	if err := waitCond(ctx, 2*time.Minute, func() (bool, string) {
		held, err := etcdTunnelKeys(ctx, etcd.Endpoint())
		if err != nil {
			return false, err.Error()
		}
		n := 0
		for _, v := range held {
			n += v
		}
		return n == o.ScaleTunnels, fmt.Sprintf("etcd lists %d tunnels, want %d", n, o.ScaleTunnels)
	}); err != nil {
		return err
	}
	held, err := etcdTunnelKeys(ctx, etcd.Endpoint())
	if err != nil {
		return err
	}
	say("scale: relay memory with the tunnels up")
	for i, r := range relays {
		rss, err := SettledRSS(ctx, r.Pid(), 30*time.Second)
		if err != nil {
			return err
		}
		m, err := r.Metrics(ctx)
		if err != nil {
			return err
		}
		p := &sr.Replicas[i]
		p.RSS, p.Held = rss, int(m["spectro_proxy_tunnels_connected"])
		p.HeapInuse, p.Goroutines = int64(m["go_memstats_heap_inuse_bytes"]), int(m["go_goroutines"])
		p.ViewTunnels = o.ScaleTunnels
		if p.Held > 0 {
			p.PerTunnel = float64(rss-p.Baseline) / float64(p.Held)
		}
		if held[r.id] != p.Held {
			say(fmt.Sprintf("scale: %s holds %d tunnels, etcd lists %d for it", r.id, p.Held, held[r.id]))
		}
	}

	say(fmt.Sprintf("scale: etcd writes at rest over %v", rest))
	before, err := etcdMetrics(ctx, etcd.Endpoint())
	if err != nil {
		return err
	}
	relayBefore := relayWrites(ctx, relays)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(rest):
	}
	after, err := etcdMetrics(ctx, etcd.Endpoint())
	if err != nil {
		return err
	}
	per := func(m string) float64 { return (after.sum(m) - before.sum(m)) / rest.Seconds() }
	sr.Puts, sr.Deletes = per("etcd_mvcc_put_total"), per("etcd_mvcc_delete_total")
	sr.KeepAlives = per(`grpc_server_msg_received_total{grpc_method="LeaseKeepAlive"`)
	sr.Renew = per("etcd_debugging_lease_renewed_total")
	sr.RelayWrites = map[string]float64{}
	for op, v := range relayWrites(ctx, relays) {
		sr.RelayWrites[op] = (v - relayBefore[op]) / rest.Seconds()
	}

	// The storm: the replica holding the most tunnels dies at once.
	victim := 0
	for i, r := range relays {
		if held[r.id] > held[relays[victim].id] {
			victim = i
		}
	}
	dead := relays[victim]
	survivors := slices.Delete(slices.Clone(relays), victim, victim+1)
	sr.Killed, sr.KilledHeld = dead.id, held[dead.id]
	putsBefore := putHistogram(ctx, survivors)
	refusedBefore := sumByLabel(ctx, survivors, "spectro_proxy_refusals_total", "reason")
	registeredBefore := sumByLabel(ctx, survivors, "spectro_proxy_tunnel_registrations_total", "result")
	reconnectsBefore := agents.Reconnects()
	say(fmt.Sprintf("scale: SIGKILL %s holding %d tunnels", dead.id, sr.KilledHeld))
	kill := time.Now()
	if err := dead.Kill(10 * time.Second); err != nil {
		return err
	}
	// The agents keep dialing all three addresses: the dead one refuses
	// at once and the dial moves on, as HAProxy's redispatch does before
	// its health checks mark the server down.
	lastSaid := time.Now()
	err = waitCond(ctx, 3*time.Minute, func() (bool, string) {
		n := 0
		var errs []string
		for _, r := range survivors {
			t, err := r.Tunnels(ctx)
			if err != nil {
				errs = append(errs, r.id+": "+err.Error())
				n = -1
				break
			}
			n += t
		}
		if n == o.ScaleTunnels && sr.Reconnected == 0 {
			sr.Reconnected = time.Since(kill)
		}
		keys, err := etcdTunnelKeys(ctx, etcd.Endpoint())
		if err != nil {
			return false, err.Error()
		}
		liveKeys := 0
		for _, r := range survivors {
			liveKeys += keys[r.id]
		}
		if liveKeys == o.ScaleTunnels && sr.Registered == 0 {
			sr.Registered = time.Since(kill)
		}
		if keys[dead.id] == 0 && sr.Expired == 0 {
			sr.Expired = time.Since(kill)
		}
		if time.Since(lastSaid) >= 10*time.Second {
			lastSaid = time.Now()
			say(fmt.Sprintf("scale: +%.0fs: survivors hold %d tunnels %v, etcd lists %v, %d agents connected, %d reconnects",
				time.Since(kill).Seconds(), n, errs, keys, agents.Count(), agents.Reconnects()-reconnectsBefore))
		}
		return sr.Reconnected > 0 && sr.Registered > 0 && sr.Expired > 0,
			fmt.Sprintf("survivors hold %d tunnels, etcd lists %d under them and %d under %s", n, liveKeys, keys[dead.id], dead.id)
	})
	sr.Reconnects = agents.Reconnects() - reconnectsBefore
	sr.RedialErrs = agents.RedialErrors()
	sr.Refusals, sr.Registrations = map[string]float64{}, map[string]float64{}
	for k, v := range sumByLabel(ctx, survivors, "spectro_proxy_refusals_total", "reason") {
		if d := v - refusedBefore[k]; d > 0 {
			sr.Refusals[k] = d
		}
	}
	for k, v := range sumByLabel(ctx, survivors, "spectro_proxy_tunnel_registrations_total", "result") {
		if d := v - registeredBefore[k]; d > 0 {
			sr.Registrations[k] = d
		}
	}
	if err != nil {
		var tails []string
		for _, r := range survivors {
			tails = append(tails, r.id+":\n"+r.Tail(15))
		}
		return fmt.Errorf("after the kill: %w\n%s", err, strings.Join(tails, "\n"))
	}
	sr.PutP99, sr.PutCount = histQuantile(putsBefore, putHistogram(ctx, survivors), 0.99)
	sr.Took = time.Since(started)
	return nil
}

// scaleVerdicts are the scale case's targets.
func (s *ScaleResult) verdicts() []Verdict {
	if s == nil {
		return nil
	}
	var out []Verdict
	for _, r := range s.Replicas {
		kib := r.PerTunnel / 1024
		out = append(out, Verdict{Label: fmt.Sprintf("relay RSS per idle tunnel, %d tunnels over %d replicas on etcd (KiB)", s.Tunnels, len(s.Replicas)),
			Mode: r.ID, Target: "≤ 32 KiB", Value: kib, Met: r.PerTunnel <= scaleRSSTarget})
	}
	out = append(out, Verdict{Label: "etcd puts + deletes per second at rest (keep-alives only)", Mode: "etcd", Target: "0",
		Value: s.Puts + s.Deletes, Met: s.Puts+s.Deletes == 0})
	out = append(out, Verdict{Label: fmt.Sprintf("replica with %d tunnels SIGKILLed: all re-registered (s)", s.KilledHeld), Mode: "fleet",
		Target: fmt.Sprintf("≤ %.0f s", scaleStormTarget.Seconds()), Value: s.Registered.Seconds(), Met: s.Registered > 0 && s.Registered <= scaleStormTarget})
	return out
}

// writeScaleMarkdown writes the scale section of the results file.
func (s *ScaleResult) writeMarkdown(b *strings.Builder) {
	fmt.Fprintf(b, "\n## Scale-out: %d idle tunnels over %d replicas on etcd\n\n", s.Tunnels, len(s.Replicas))
	fmt.Fprintf(b, "Three relay processes (`--etcd-endpoints`, `--lease-ttl %v`, one shared CA and signing key) on a real etcd 3.6 "+
		"(`testcluster.StartEtcd`, one member, `--unsafe-no-fsync`); the idle agents of [Relay memory with idle tunnels](#relay-memory-with-idle-tunnels), each dialing the next replica "+
		"in turn and the one after when a replica refuses the connection (a load balancer's round robin and redispatch), and dialing "+
		"again after a drop with the real agent's backoff (250 ms doubling, jittered). Registration rate limits are lifted as for every "+
		"relay in this benchmark (the default, 200 per second per replica, would add about 8 s to the storm below). Took %s.\n\n",
		scaleLeaseTTL, s.Took.Round(time.Second))
	fmt.Fprintf(b, "| figure | where | target | measured | met |\n|---|---|---|---|---|\n")
	for _, v := range s.verdicts() {
		fmt.Fprintf(b, "| %s | %s | %s | %.2f | %s |\n", v.Label, v.Mode, v.Target, v.Value, v.metWord())
	}
	fmt.Fprintf(b, "\n| replica | tunnels held | RSS before | RSS with tunnels | per tunnel held | Go heap in use | goroutines |\n|---|---|---|---|---|---|---|\n")
	for _, r := range s.Replicas {
		fmt.Fprintf(b, "| %s | %d | %.1f MiB | %.1f MiB | %.1f KiB | %.1f MiB | %d |\n", r.ID, r.Held, float64(r.Baseline)/(1<<20),
			float64(r.RSS)/(1<<20), r.PerTunnel/1024, float64(r.HeapInuse)/(1<<20), r.Goroutines)
	}
	fmt.Fprintf(b, "\nEvery replica's registry view holds all %d tunnels (it watches the whole prefix), so the per-tunnel figure "+
		"includes the view of the other replicas' tunnels.\n\n", s.Tunnels)
	fmt.Fprintf(b, "| at rest, per second over %v | |\n|---|---|\n", s.RestWindow)
	fmt.Fprintf(b, "| etcd puts (`etcd_mvcc_put_total`) | %.2f |\n| etcd deletes (`etcd_mvcc_delete_total`) | %.2f |\n", s.Puts, s.Deletes)
	fmt.Fprintf(b, "| lease keep-alive messages (`grpc_server_msg_received_total{grpc_method=\"LeaseKeepAlive\"}`) | %.2f |\n", s.KeepAlives)
	fmt.Fprintf(b, "| leases renewed (`etcd_debugging_lease_renewed_total`) | %.2f |\n", s.Renew)
	ops := slices.Sorted(maps.Keys(s.RelayWrites))
	for _, op := range ops {
		fmt.Fprintf(b, "| relays' registry writes, op %s (`spectro_proxy_registry_etcd_writes_total`, summed) | %.2f |\n", op, s.RelayWrites[op])
	}
	p99 := "not measured (no `spectro_proxy_registry_put_seconds` on the survivors)"
	switch {
	case s.PutCount > 0 && s.PutP99 < 0:
		p99 = fmt.Sprintf("above the largest bucket, over %d puts", s.PutCount)
	case s.PutCount > 0:
		p99 = fmt.Sprintf("≤ %v over %d puts", s.PutP99, s.PutCount)
	}
	fmt.Fprintf(b, "\n| storm: %s SIGKILLed holding %d tunnels | time after the kill |\n|---|---|\n", s.Killed, s.KilledHeld)
	fmt.Fprintf(b, "| the survivors hold every tunnel again (%d reconnects) | %.1f s |\n", s.Reconnects, s.Reconnected.Seconds())
	fmt.Fprintf(b, "| etcd lists every tunnel under a live replica (re-registered) | %.1f s |\n", s.Registered.Seconds())
	fmt.Fprintf(b, "| the killed replica's keys are gone (its lease expired) | %.1f s |\n", s.Expired.Seconds())
	fmt.Fprintf(b, "| announce put latency p99 during the storm (bucket bound) | %s |\n", p99)
	counts := func(m map[string]float64) string {
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(m)) {
			parts = append(parts, fmt.Sprintf("%s %.0f", k, m[k]))
		}
		if len(parts) == 0 {
			return "none"
		}
		return strings.Join(parts, ", ")
	}
	fmt.Fprintf(b, "| the survivors' tunnel registrations during the storm (`spectro_proxy_tunnel_registrations_total`) | %s |\n", counts(s.Registrations))
	fmt.Fprintf(b, "| the survivors' refusals during the storm (`spectro_proxy_refusals_total`) | %s |\n", counts(s.Refusals))
	if len(s.RedialErrs) > 0 {
		var parts []string
		for _, e := range slices.Sorted(maps.Keys(s.RedialErrs)) {
			parts = append(parts, fmt.Sprintf("%s: %d", e, s.RedialErrs[e]))
		}
		fmt.Fprintf(b, "\nFailed redials during the storm (each retried with backoff): %s. Every agent dials from 127.0.0.1, so the relay's cap "+
			"of %d TLS handshakes pending per source address refuses part of the storm (EOF); agents behind NAT, or a TCP load "+
			"balancer without the PROXY protocol, share a source address the same way.\n", strings.Join(parts, "; "), server.DefaultMaxPendingHellosPerSource)
	}
}

// freeLocalAddr is a free 127.0.0.1 port, for listeners whose address must
// be known before they start (a peer address is advertised).
func freeLocalAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "127.0.0.1:0"
	}
	defer l.Close()
	return l.Addr().String()
}

// plainClient reads health ports and etcd; no keep-alive, so nothing is
// left open between polls (or after the run).
var plainClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func waitReadyz(ctx context.Context, addr string, within time.Duration) error {
	return waitCond(ctx, within, func() (bool, string) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/readyz", nil)
		resp, err := plainClient.Do(req)
		if err != nil {
			return false, err.Error()
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, fmt.Sprintf("/readyz %s: %s", resp.Status, strings.TrimSpace(string(body)))
	})
}

// waitCond polls cond every 250 ms until it holds or within passes.
func waitCond(ctx context.Context, within time.Duration, cond func() (bool, string)) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		ok, why := cond()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", why, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// etcdTunnelKeys counts the registry's tunnel keys per replica id, through
// etcd's JSON gateway (keys <prefix>tunnels/<label>/<replica>/<uid>/<agent>).
func etcdTunnelKeys(ctx context.Context, endpoint string) (map[string]int, error) {
	prefix := scalePrefix + "tunnels/"
	end := prefix[:len(prefix)-1] + "0" // '/' + 1
	body, _ := json.Marshal(map[string]any{
		"key":       base64.StdEncoding.EncodeToString([]byte(prefix)),
		"range_end": base64.StdEncoding.EncodeToString([]byte(end)),
		"keys_only": true,
	})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, endpoint+"/v3/kv/range", bytes.NewReader(body))
	resp, err := plainClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("listing tunnel keys in etcd: %w", err)
	}
	defer resp.Body.Close()
	var out struct {
		Kvs []struct {
			Key []byte `json:"key"`
		} `json:"kvs"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("decoding etcd range: %w", err)
	}
	n := map[string]int{}
	for _, kv := range out.Kvs {
		parts := strings.Split(strings.TrimPrefix(string(kv.Key), prefix), "/")
		if len(parts) >= 2 {
			n[parts[1]]++
		}
	}
	return n, nil
}

// samples are Prometheus samples by full name.
type samples map[string]float64

// sum adds every sample whose name (labels included) starts with prefix.
func (s samples) sum(prefix string) float64 {
	var t float64
	for k, v := range s {
		if k == prefix || strings.HasPrefix(k, prefix) && (strings.HasPrefix(k[len(prefix):], "{") || strings.HasSuffix(prefix, `"`)) {
			t += v
		}
	}
	return t
}

func etcdMetrics(ctx context.Context, endpoint string) (samples, error) {
	m, err := promtext.Scrape(ctx, plainClient, endpoint+"/metrics")
	if err != nil {
		return nil, fmt.Errorf("reading etcd metrics: %w", err)
	}
	return m, nil
}

// relayWrites sums the relays' registry writes by op.
func relayWrites(ctx context.Context, relays []*scaleRelay) map[string]float64 {
	return sumByLabel(ctx, relays, "spectro_proxy_registry_etcd_writes_total", "op")
}

// sumByLabel sums a counter of the relays by the value of one label.
func sumByLabel(ctx context.Context, relays []*scaleRelay, name, label string) map[string]float64 {
	t := map[string]float64{}
	for _, r := range relays {
		m, err := r.Metrics(ctx)
		if err != nil {
			continue
		}
		for k, v := range m {
			rest, ok := strings.CutPrefix(k, name+"{")
			if !ok {
				continue
			}
			val := rest
			if i := strings.Index(rest, label+`="`); i >= 0 {
				val = rest[i+len(label)+2:]
				val = val[:strings.IndexByte(val, '"')]
			}
			t[val] += v
		}
	}
	return t
}

// putHistogram sums the relays' put latency buckets: upper bound -> count.
func putHistogram(ctx context.Context, relays []*scaleRelay) map[float64]float64 {
	h := map[float64]float64{}
	for _, r := range relays {
		m, err := r.Metrics(ctx)
		if err != nil {
			continue
		}
		for k, v := range m {
			rest, ok := strings.CutPrefix(k, "spectro_proxy_registry_put_seconds_bucket{")
			if !ok {
				continue
			}
			i := strings.Index(rest, `le="`)
			if i < 0 {
				continue
			}
			le := rest[i+4:]
			le = le[:strings.IndexByte(le, '"')]
			bound := math.Inf(1)
			if le != "+Inf" {
				if bound, err = strconv.ParseFloat(le, 64); err != nil {
					continue
				}
			}
			h[bound] += v
		}
	}
	return h
}

// histQuantile is the q-quantile's bucket bound of the difference of two
// cumulative histograms, and the observations in it.
func histQuantile(before, after map[float64]float64, q float64) (time.Duration, int) {
	var bounds []float64
	for b := range after {
		bounds = append(bounds, b)
	}
	sort.Float64s(bounds)
	if len(bounds) == 0 {
		return 0, 0
	}
	total := after[math.Inf(1)] - before[math.Inf(1)]
	if total <= 0 {
		return 0, 0
	}
	for _, b := range bounds {
		if after[b]-before[b] >= q*total {
			if math.IsInf(b, 1) {
				return -1, int(total)
			}
			return time.Duration(b * float64(time.Second)), int(total)
		}
	}
	return -1, int(total)
}

// scaleRow is a Targets table row of a scale verdict, as WriteMarkdown
// writes it.
func scaleRow(v Verdict) string { return absoluteRow(v) }

// isScaleRow recognises the scale verdicts' rows in a results file.
func isScaleRow(line string) bool {
	return strings.HasPrefix(line, "| ") && (strings.Contains(line, "replicas on etcd") ||
		strings.Contains(line, "etcd puts + deletes") || strings.Contains(line, "SIGKILLed: all re-registered"))
}

// SpliceScale returns the results file old with the scale case's rows of
// the Targets table and its section replaced by r's (`make bench-scale`
// runs only this case and keeps the rest of the file).
func SpliceScale(old []byte, r *Results) []byte {
	if r.Scale == nil {
		return old
	}
	var sec strings.Builder
	r.Scale.writeMarkdown(&sec)
	doc := string(old)
	if doc == "" {
		doc = "# Benchmark results\n\n## Targets\n\n| figure | mode | target | measured | met | floor | with this mode's TLS |\n|---|---|---|---|---|---|---|\n\n"
	}
	// Targets rows: drop the old ones, add the new ones at the table's end.
	lines := strings.Split(doc, "\n")
	var out []string
	inTargets, added := false, false
	for i, l := range lines {
		if strings.HasPrefix(l, "## ") {
			inTargets = l == "## Targets"
		}
		if isScaleRow(l) {
			continue
		}
		out = append(out, l)
		if inTargets && !added && strings.HasPrefix(l, "|") && isLastTableRow(lines, i) {
			for _, v := range r.Scale.verdicts() {
				out = append(out, scaleRow(v))
			}
			added = true
		}
	}
	doc = strings.Join(out, "\n")
	// The section: replace it, else put it before the integrity checks.
	body := strings.TrimPrefix(sec.String(), "\n")
	if i := strings.Index(doc, "\n## Scale-out"); i >= 0 {
		rest := doc[i+1:]
		end := len(rest)
		if j := strings.Index(rest[1:], "\n## "); j >= 0 {
			end = j + 2
		}
		return []byte(doc[:i+1] + body + "\n" + rest[end:])
	}
	if i := strings.Index(doc, "\n## Integrity checks"); i >= 0 {
		return []byte(doc[:i+1] + body + doc[i:])
	}
	return []byte(strings.TrimRight(doc, "\n") + "\n\n" + body)
}

// isLastTableRow reports whether lines[i] is the last row of its table
// once the scale rows (which are dropped) are skipped.
func isLastTableRow(lines []string, i int) bool {
	for _, l := range lines[i+1:] {
		if isScaleRow(l) {
			continue
		}
		return !strings.HasPrefix(l, "|")
	}
	return true
}
