package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubeconfig"
	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/proctest"
	"github.com/spectroproxy/spectro-proxy/internal/promtext"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// The fleet TestScaleOut runs (issue 13's proof).
const (
	scaleReplicas    = 3
	scaleClusters    = 20 // half passthrough, half terminate
	scaleAgentsEach  = 2
	scaleLeaseTTL    = 10 * time.Second
	scaleShutdown    = 2 * time.Second // --shutdown-delay: HAProxy's checks see /readyz fail first
	scaleDrain       = 8 * time.Second // --drain-timeout
	scaleEtcdOutage  = 30 * time.Second
	scaleEtcdPrefix  = "/spectro-proxy/"
	scaleNamespace   = "scale"
	scaleCreateEvery = 250 * time.Millisecond
	scaleDocPath     = "../docs/scale-out.md"
)

// scaleCluster is one cluster: its agents and a kubeconfig through HAProxy.
type scaleCluster struct {
	uid        string
	mode       tunnel.Mode
	kubeconfig string
	agents     []*scaleAgent
}

func (c *scaleCluster) host() string { return clusterHost(c.uid) }

type scaleAgent struct {
	id       string
	args     []string // without --health-addr
	health   string
	want     int // tunnels once settled, when the agent reports them
	restarts int
	p        *proctest.Process
}

// relaySlot is one replica: its id and ports stay across restarts.
type relaySlot struct {
	id, pub, peer, health string
	p                     *proctest.Process
}

// reqLog records every user request of the background loops.
type reqLog struct {
	mu sync.Mutex
	rs []reqResult
}

type reqResult struct {
	start, end time.Time
	what       string
	err        error
}

func (l *reqLog) add(r reqResult) {
	l.mu.Lock()
	l.rs = append(l.rs, r)
	l.mu.Unlock()
}

// window returns the requests started within [from, to] and the failures
// among them (up to 10 described).
func (l *reqLog) window(from, to time.Time) (total, failed int, errs []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.rs {
		if r.start.Before(from) || r.start.After(to) {
			continue
		}
		total++
		if r.err != nil {
			failed++
			if len(errs) < 10 {
				errs = append(errs, fmt.Sprintf("%s at +%v: %v", r.what, r.start.Sub(from).Round(time.Millisecond), oneLine(r.err.Error())))
			}
		}
	}
	return total, failed, errs
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}

// scaleTest is the running fleet and everything the test drives.
type scaleTest struct {
	t        *testing.T
	c        *testcluster.Cluster
	srvBin   string
	cliBin   string
	logs     string
	state    string
	etcd     *testcluster.Etcd
	relays   []*relaySlot
	lb       string // HAProxy's frontend
	lbSock   string // HAProxy's stats socket
	lbProc   *proctest.Process
	clusters []*scaleCluster
	relayCA  *x509.CertPool
	relayPEM []byte
	saToken  string // terminate mode's bearer token
	adminTLS *tls.Config
	key      []byte
	requests reqLog
}

// scaleFigures are what the test measures and writes to docs/scale-out.md.
type scaleFigures struct {
	setup, total time.Duration

	rollTook        time.Duration
	rollPerReplica  []time.Duration // SIGTERM to the replacement ready and settled
	rollRequests    int
	rollFailed      int
	rollErrs        []string
	watchCreated    int
	watch           map[tunnel.Mode]*watchStats
	exec            map[tunnel.Mode]*execStats
	killed          string
	killedClusters  int
	killRecovery    time.Duration
	killTwoTunnels  time.Duration // kill to every agent at two tunnels again (-1: not within a minute)
	killFirstSweep  string
	killRequests    int
	killFailed      int
	outageRequests  int
	outageFailed    int
	outageErrs      []string
	outageSweeps    int
	outageSweepErrs int
	outageReady     string
	lateFirst       time.Duration // etcd stop to the late cluster answering through HAProxy
	lateAttempts    int
	lateServedBy    string
	convergeTook    time.Duration
	afterRequests   int
	afterFailed     int
	afterErrs       []string
	tunnelsPerAgent int
}

type watchStats struct {
	mu       sync.Mutex
	seen     map[string]bool
	sessions int
	unclean  []string
}

type execStats struct {
	mu       sync.Mutex
	sessions int
	lines    int
	longest  time.Duration
	last     time.Time
	ends     []string
}

// TestScaleOut is issue 13's proof: three relay processes on a real etcd
// behind HAProxy (round-robin TCP, health checks on /readyz), 20 clusters
// with two agents each against the real kube-apiserver, the real kubectl
// through HAProxy in both modes. While kubectl get loops, a watch per mode
// and a long exec per mode run, it rolls every replica, kills one, and
// stops etcd for 30 s; the figures go to docs/scale-out.md.
func TestScaleOut(t *testing.T) {
	if testing.Short() {
		t.Skip("TestScaleOut takes minutes")
	}
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		haproxy = "/usr/sbin/haproxy"
		if _, err := os.Stat(haproxy); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatal("CI must install haproxy (.ci/run does: apt-get install haproxy)")
			}
			t.Skip("haproxy not installed (Debian package haproxy; .ci/run installs it)")
		}
	}
	if err := testcluster.CheckBinaries("", true); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI must build the control plane first: %v", err)
		}
		t.Skipf("no cached etcd / control plane: %v", err)
	}
	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	s := &scaleTest{t: t}
	s.srvBin, s.cliBin = binaries(t)
	s.logs, err = os.MkdirTemp("", "scaleout-logs-")
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs kept in %s", s.logs)
			return
		}
		os.RemoveAll(s.logs)
	})

	// A control plane of its own: its serving certificate carries every
	// passthrough cluster's host name (the package's shared one carries
	// cluster-kube's only, and auto-mode tests rely on that).
	var sans []string
	for i := range scaleClusters + 1 {
		sans = append(sans, clusterHost(scaleUID(i)))
	}
	s.c, err = testcluster.Start(ctx, testcluster.Options{Kwok: true, ExtraSANs: sans})
	require.NoError(t, err)
	t.Logf("control plane up after %v", time.Since(began).Round(time.Millisecond))
	t.Cleanup(func() { s.c.Stop() })
	s.adminTLS, err = s.c.TLSConfig()
	require.NoError(t, err)

	etcdDir := t.TempDir()
	e, err := testcluster.StartEtcd(ctx, etcdDir, testLogger(t))
	require.NoError(t, err, "starting etcd")
	s.etcd = e
	t.Cleanup(s.etcd.Close)

	s.writeState()
	s.startRelays(ctx)
	s.lb, s.lbSock, s.lbProc = s.startHAProxy(ctx, haproxy)
	t.Logf("etcd, relays and haproxy up after %v", time.Since(began).Round(time.Millisecond))
	s.startClusters(ctx)
	t.Logf("agents started after %v", time.Since(began).Round(time.Millisecond))
	require.NoError(t, s.waitSettled(ctx, 90*time.Second), "fleet never settled after start")
	require.Empty(t, s.sweep(ctx, s.clusters[:scaleClusters], s.relayAddrs()), "every cluster answers via every replica")

	var fig scaleFigures
	fig.setup = time.Since(began)
	fig.tunnelsPerAgent = s.agentTunnels(ctx)
	t.Logf("setup took %v; %d tunnels per agent", fig.setup.Round(time.Millisecond), fig.tunnelsPerAgent)

	// The workload, until stopLoad.
	loadCtx, stopLoad := context.WithCancel(ctx)
	var load sync.WaitGroup
	created := &createdNames{}
	fig.watch = map[tunnel.Mode]*watchStats{}
	fig.exec = map[tunnel.Mode]*execStats{}
	for _, m := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		mine := s.byMode(m)
		load.Go(func() { s.getLoop(loadCtx, mine) })
		ws := &watchStats{seen: map[string]bool{}}
		fig.watch[m] = ws
		load.Go(func() { s.watchLoop(loadCtx, mine[0], ws) })
		es := &execStats{}
		fig.exec[m] = es
		load.Go(func() { s.execLoop(loadCtx, mine[1], es) })
	}
	load.Go(func() { s.createLoop(loadCtx, created) })
	t.Cleanup(func() { stopLoad(); load.Wait() })
	// A moment of steady load first: the loops must work before anything moves.
	require.NoError(t, s.waitFirstRequests(ctx, 20*time.Second))

	// 1. Rolling restart: one replica at a time.
	rollStart := time.Now()
	for i := range s.relays {
		took, err := s.roll(ctx, i)
		require.NoError(t, err, "rolling %s", s.relays[i].id)
		fig.rollPerReplica = append(fig.rollPerReplica, took)
		t.Logf("rolled %s in %v", s.relays[i].id, took.Round(time.Millisecond))
	}
	fig.rollTook = time.Since(rollStart)
	fig.rollRequests, fig.rollFailed, fig.rollErrs = s.requests.window(rollStart, time.Now())

	// 2. SIGKILL the replica holding the most clusters.
	killStart := time.Now()
	fig.killed, fig.killedClusters, fig.killRecovery, fig.killFirstSweep, err = s.kill(ctx)
	require.NoError(t, err)
	t.Logf("killed %s holding %d clusters: all answer again after %v (first sweep: %s)", fig.killed, fig.killedClusters,
		fig.killRecovery.Round(time.Millisecond), fig.killFirstSweep)
	killed := s.slot(fig.killed)
	require.NoError(t, s.startRelay(ctx, killed), "restarting %s", fig.killed)
	// Every agent tunnelled again, then (not asserted: the agents' backoff
	// decides) back at two tunnels on distinct replicas.
	require.NoError(t, s.waitTunnels(ctx, 60*time.Second, 1), "the agents are not all back after the kill")
	fig.killRequests, fig.killFailed, _ = s.requests.window(killStart, time.Now())
	if err := s.waitSettled(ctx, 60*time.Second); err != nil {
		t.Logf("after the kill: %v", err)
		fig.killTwoTunnels = -1
	} else {
		fig.killTwoTunnels = time.Since(killStart)
	}

	// 3. etcd stopped for 30 s.
	s.etcdOutage(ctx, &fig)

	// Let the watches catch up with the last creations, then stop the load.
	created.stop()
	lastNames := created.names()
	fig.watchCreated = len(lastNames)
	for _, m := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		ws := fig.watch[m]
		_ = pollUntil(ctx, 30*time.Second, func() bool { return len(missing(ws, lastNames)) == 0 })
	}
	stopLoad()
	load.Wait()
	fig.total = time.Since(began)

	// The verdicts.
	assert.Zero(t, fig.rollFailed, "kubectl requests failed during the rolling restart: %v", fig.rollErrs)
	for _, m := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		miss := missing(fig.watch[m], lastNames)
		assert.Empty(t, miss, "%s watch missed created ConfigMaps (sessions ended badly: %v)", m, fig.watch[m].unclean)
		assert.Positive(t, fig.exec[m].lines, "%s exec printed nothing", m)
	}
	assert.Positive(t, fig.watchCreated)
	assert.LessOrEqual(t, fig.killRecovery, scaleLeaseTTL+5*time.Second, "clusters of the killed replica answer again within lease TTL + 5 s")
	assert.Zero(t, fig.outageFailed, "existing tunnels keep serving while etcd is down: %v", fig.outageErrs)
	assert.Zero(t, fig.outageSweepErrs, "every cluster answers via every replica while etcd is down")
	assert.Positive(t, fig.lateAttempts, "the cluster registered during the outage was served")
	assert.NotEqual(t, "none", fig.lateServedBy, "the replica holding the new cluster's tunnel serves it while etcd is down")
	for _, m := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		t.Logf("%s watch: %d sessions, ended with an error: %v", m, fig.watch[m].sessions, fig.watch[m].unclean)
		t.Logf("%s exec: %d sessions, %d lines, longest pause %v, ends: %v", m, fig.exec[m].sessions, fig.exec[m].lines,
			fig.exec[m].longest.Round(time.Millisecond), fig.exec[m].ends)
	}
	t.Logf("figures: %+v", fig)
	if !t.Failed() {
		require.NoError(t, writeScaleDoc(&fig))
	}
}

func scaleUID(i int) string { return fmt.Sprintf("s%02d", i) }

func (s *scaleTest) byMode(m tunnel.Mode) []*scaleCluster {
	var out []*scaleCluster
	for _, c := range s.clusters[:scaleClusters] {
		if c.mode == m {
			out = append(out, c)
		}
	}
	return out
}

func (s *scaleTest) slot(id string) *relaySlot {
	for _, r := range s.relays {
		if r.id == id {
			return r
		}
	}
	s.t.Fatalf("no replica %q", id)
	return nil
}

func (s *scaleTest) relayAddrs() []string {
	var out []string
	for _, r := range s.relays {
		out = append(out, r.pub)
	}
	return out
}

// writeState creates the relays' shared state once: CA, wildcard
// certificate, signing key. Every replica is pointed at the same files, as
// the chart mounts the same Secrets into every pod.
func (s *scaleTest) writeState() {
	t := s.t
	s.state = t.TempDir()
	ca, err := pki.NewCA("spectro-proxy relay CA")
	require.NoError(t, err)
	leaf, err := ca.Issue(domain, []string{domain, "*." + domain, "localhost", "127.0.0.1"}, nil, false)
	require.NoError(t, err)
	s.key, err = token.NewKey()
	require.NoError(t, err)
	require.NoError(t, pki.WriteFiles(s.state, map[string][]byte{
		"ca.crt": ca.CertPEM, "ca.key": ca.KeyPEM, "tls.crt": leaf.CertPEM, "tls.key": leaf.KeyPEM, "signing.key": s.key,
		"revoked": nil,
	}))
	s.relayPEM = ca.CertPEM
	s.relayCA, err = pki.Pool(ca.CertPEM)
	require.NoError(t, err)
}

func (s *scaleTest) startRelays(ctx context.Context) {
	for i := range scaleReplicas {
		r := &relaySlot{id: fmt.Sprintf("r%d", i+1), pub: freeAddr(s.t), peer: freeAddr(s.t), health: freeAddr(s.t)}
		s.relays = append(s.relays, r)
		require.NoError(s.t, s.startRelay(ctx, r))
	}
	s.t.Cleanup(func() {
		for _, r := range s.relays {
			if r.p != nil {
				_ = r.p.Stop(0)
				if s.t.Failed() {
					s.t.Logf("relay %s log (last lines):\n%s", r.id, r.p.Tail(40))
				}
			}
		}
	})
}

// startRelay starts the replica's process and waits until /readyz says ok.
func (s *scaleTest) startRelay(ctx context.Context, r *relaySlot) error {
	p, err := proctest.Start(proctest.Options{Name: "relay-" + r.id, Bin: s.srvBin, LogFile: filepath.Join(s.logs, "relay-"+r.id+".log"),
		Args: []string{
			"--domain", domain, "--listen", r.pub, "--state-dir", s.state,
			"--tls-cert-file", filepath.Join(s.state, "tls.crt"), "--tls-key-file", filepath.Join(s.state, "tls.key"),
			"--signing-key-file", filepath.Join(s.state, "signing.key"), "--revocation-file", filepath.Join(s.state, "revoked"),
			"--health-addr", r.health, "--replica-id", r.id,
			"--etcd-endpoints", s.etcd.Endpoint(), "--etcd-prefix", scaleEtcdPrefix, "--lease-ttl", scaleLeaseTTL.String(),
			"--peer-listen", r.peer, "--peer-advertise", r.peer,
			"--shutdown-delay", scaleShutdown.String(), "--drain-timeout", scaleDrain.String(),
			// Every user connection arrives from HAProxy on 127.0.0.1.
			"--max-streams-per-source", "10000", "--max-idle-conns-per-source", "10000",
			"--registrations-per-second", "10000",
			"--log-level", "info",
		}})
	if err != nil {
		return err
	}
	r.p = p
	err = pollUntil(ctx, 30*time.Second, func() bool {
		select {
		case <-p.Done():
			return true
		default:
		}
		return httpStatus(ctx, "http://"+r.health+"/readyz") == http.StatusOK
	})
	select {
	case <-p.Done():
		return fmt.Errorf("relay %s exited at start: %v\n%s", r.id, p.Err(), p.Tail(30))
	default:
	}
	if err != nil {
		return fmt.Errorf("relay %s not ready: %w\n%s", r.id, err, p.Tail(30))
	}
	return nil
}

// startHAProxy runs Debian's HAProxy in front of the replicas: round-robin
// TCP, HTTP checks on each replica's /readyz, another server on a failed
// connect.
func (s *scaleTest) startHAProxy(ctx context.Context, bin string) (addr, sock string, p *proctest.Process) {
	t := s.t
	addr = freeAddr(s.t)
	sock = filepath.Join(s.logs, "haproxy.sock")
	var servers strings.Builder
	for _, r := range s.relays {
		_, hp, _ := net.SplitHostPort(r.health)
		fmt.Fprintf(&servers, "  server %s %s check port %s\n", r.id, r.pub, hp)
	}
	conf := fmt.Sprintf(`global
  maxconn 4000 # two descriptors each: within the open-files limit
  stats socket %s mode 600 level admin

defaults
  mode tcp
  timeout connect 1s
  timeout client 10m
  timeout server 10m
  timeout check 1s
  retries 3
  option redispatch 1

frontend relays
  bind %s
  default_backend relays

backend relays
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 250ms fall 2 rise 2
%s`, sock, addr, servers.String())
	cfg := filepath.Join(s.logs, "haproxy.cfg")
	require.NoError(t, os.WriteFile(cfg, []byte(conf), 0o600))
	out, err := exec.Command(bin, "-c", "-f", cfg).CombinedOutput()
	require.NoError(t, err, "haproxy -c: %s", out)
	p, err = proctest.Start(proctest.Options{Name: "haproxy", Bin: bin, Args: []string{"-db", "-f", cfg},
		LogFile: filepath.Join(s.logs, "haproxy.log")})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = p.Stop(2 * time.Second)
		if t.Failed() {
			t.Logf("haproxy log:\n%s", p.Tail(40))
		}
	})
	require.NoError(t, pollUntil(ctx, 20*time.Second, func() bool {
		if p.Exited() != nil {
			return true
		}
		st, err := s.lbStatus(sock)
		if err != nil {
			return false
		}
		for _, r := range s.relays {
			if st[r.id] != "UP" {
				return false
			}
		}
		return true
	}), "haproxy never saw every replica up")
	require.NoError(t, p.Exited(), "haproxy exited:\n%s", p.Tail(20))
	return addr, sock, p
}

// lbStatus reads HAProxy's view of each server (UP, DOWN, ...) from its
// stats socket.
func (s *scaleTest) lbStatus(sock string) (map[string]string, error) {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "show stat\n"); err != nil {
		return nil, err
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return nil, err
	}
	r := csv.NewReader(bytes.NewReader(bytes.TrimPrefix(b, []byte("# "))))
	r.FieldsPerRecord = -1
	rows, err := r.ReadAll()
	if err != nil || len(rows) < 1 {
		return nil, fmt.Errorf("parsing haproxy stats: %w", err)
	}
	col := slices.Index(rows[0], "status")
	if col < 0 {
		return nil, errors.New("haproxy stats lack status")
	}
	st := map[string]string{}
	for _, row := range rows[1:] {
		if len(row) > col && len(row) > 1 && row[0] == "relays" {
			st[row[1]] = row[col]
		}
	}
	return st, nil
}

// startClusters starts 20 clusters' agents (two each) through HAProxy and
// writes their kubeconfigs; cluster 20 is started later (the etcd outage).
func (s *scaleTest) startClusters(ctx context.Context) {
	t := s.t
	require.NoError(t, s.c.BindClusterRole(ctx, testcluster.ProxyUserNamespace, testcluster.ProxyUser, "cluster-admin"))
	var err error
	s.saToken, err = s.c.ServiceAccountToken(ctx, testcluster.ProxyUserNamespace, testcluster.ProxyUser, time.Hour)
	require.NoError(t, err)
	require.NoError(t, s.c.RunPod(ctx, scaleNamespace, "app"))
	for i := range scaleClusters + 1 {
		mode := tunnel.Passthrough
		if i >= scaleClusters/2 && i < scaleClusters {
			mode = tunnel.Terminate
		}
		cl := &scaleCluster{uid: scaleUID(i), mode: mode}
		cl.kubeconfig = s.writeKubeconfig(ctx, cl)
		s.clusters = append(s.clusters, cl)
		if i < scaleClusters {
			s.startAgents(cl, scaleAgentsEach)
		}
	}
	t.Cleanup(func() {
		for _, cl := range s.clusters {
			for _, a := range cl.agents {
				_ = a.p.Stop(0)
			}
		}
	})
}

func (s *scaleTest) writeKubeconfig(ctx context.Context, cl *scaleCluster) string {
	t := s.t
	opts := kubeconfig.Options{Mode: cl.mode, Server: domain, Port: 443, Subdomain: hostname.DefaultSubdomain(cl.uid), Connect: s.lb}
	var kc []byte
	var err error
	if cl.mode == tunnel.Passthrough {
		kc, err = s.c.ProxiedKubeconfig(ctx, opts, nil, 0)
	} else {
		opts.CAPEM, opts.BearerToken = s.relayPEM, s.saToken
		kc, err = kubeconfig.New(opts)
	}
	require.NoError(t, err)
	path := filepath.Join(s.logs, "kubeconfig-"+cl.uid)
	require.NoError(t, os.WriteFile(path, kc, 0o600))
	return path
}

// startAgents starts the cluster's agent processes (the shipped binary),
// all dialing HAProxy, with extra flags.
func (s *scaleTest) startAgents(cl *scaleCluster, n int, extra ...string) {
	t := s.t
	tok, _, err := token.Issue(s.key, cl.uid, "", time.Hour, time.Now())
	require.NoError(t, err)
	tokFile := filepath.Join(s.logs, "token-"+cl.uid)
	require.NoError(t, os.WriteFile(tokFile, []byte(tok), 0o600))
	for j := range n {
		a := &scaleAgent{id: fmt.Sprintf("%s-%c", cl.uid, 'a'+j), want: 2}
		if slices.Contains(extra, "--tunnels") {
			a.want = 1
		}
		a.args = append([]string{"--server", domain, "--relay-address", s.lb, "--relay-ca-file", filepath.Join(s.state, "ca.crt"),
			"--cluster-uid", cl.uid, "--token-file", tokFile, "--mode", string(cl.mode), "--agent-id", a.id,
			"--api-server", s.c.URL, "--api-server-ca-file", s.c.CAFile,
			"--drain-timeout", "5s", "--log-level", "info"}, extra...)
		require.NoError(t, s.startAgent(a))
		cl.agents = append(cl.agents, a)
	}
}

// startAgent starts (or starts again) one agent process on a new health port.
func (s *scaleTest) startAgent(a *scaleAgent) error {
	a.health = freeAddr(s.t)
	p, err := proctest.Start(proctest.Options{Name: "agent-" + a.id, Bin: s.cliBin, LogFile: filepath.Join(s.logs, "agent-"+a.id+".log"),
		Args: append(slices.Clone(a.args), "--health-addr", a.health),
		Env:  append(os.Environ(), "HTTPS_PROXY=", "https_proxy=", "HTTP_PROXY=", "http_proxy=")})
	if err != nil {
		return err
	}
	a.p = p
	return nil
}

// agentAlive reports an agent process that exited; one whose health port
// was taken meanwhile (by anything else on the machine) is started again on
// another, at most 3 times.
func (s *scaleTest) agentAlive(a *scaleAgent) error {
	err := a.p.Exited()
	if err == nil {
		return nil
	}
	if a.restarts < 3 && strings.Contains(a.p.Tail(5), "address already in use") {
		a.restarts++
		return errors.Join(errors.New("agent "+a.id+" restarted: its health port was taken"), s.startAgent(a))
	}
	return err
}

// agentTunnels is the tunnels one agent holds once settled: 2 when agents
// report spectro_proxy_agent_tunnels (--tunnels auto with several
// replicas), else 1.
func (s *scaleTest) agentTunnels(ctx context.Context) int {
	m, err := scrapePlain(ctx, "http://"+s.clusters[0].agents[0].health+"/metrics")
	if err != nil {
		return 1
	}
	if v, ok := m["spectro_proxy_agent_tunnels"]; ok {
		return int(v)
	}
	return 1
}

// waitSettled polls until every replica is ready and up in HAProxy, every
// agent ready with all its tunnels, and the replicas hold as many tunnels
// as the agents say they have.
func (s *scaleTest) waitSettled(ctx context.Context, within time.Duration) error {
	return s.waitTunnels(ctx, within, 2)
}

// waitTunnels is waitSettled with agents counted as settled once they hold
// min tunnels (or all they want, when fewer).
func (s *scaleTest) waitTunnels(ctx context.Context, within time.Duration, min int) error {
	var why string
	err := pollUntil(ctx, within, func() bool {
		why = s.unsettled(ctx, min)
		return why == ""
	})
	if err != nil {
		return fmt.Errorf("%w: %s", err, why)
	}
	return nil
}

func (s *scaleTest) unsettled(ctx context.Context, min int) string {
	st, err := s.lbStatus(s.lbSock)
	if err != nil {
		return "haproxy stats: " + err.Error()
	}
	held := 0
	for _, r := range s.relays {
		if st[r.id] != "UP" {
			return fmt.Sprintf("haproxy has %s %s", r.id, st[r.id])
		}
		m, err := scrapePlain(ctx, "http://"+r.health+"/metrics")
		if err != nil {
			return err.Error()
		}
		held += int(m["spectro_proxy_tunnels_connected"])
	}
	agents := 0
	for _, cl := range s.clusters {
		for _, a := range cl.agents {
			if err := s.agentAlive(a); err != nil {
				return err.Error()
			}
			m, err := scrapePlain(ctx, "http://"+a.health+"/metrics")
			if err != nil {
				return "agent " + a.id + ": " + err.Error()
			}
			n, ok := m["spectro_proxy_agent_tunnels"]
			if !ok {
				n = 1 // an agent without two-tunnel support
				if httpStatus(ctx, "http://"+a.health+"/readyz") != http.StatusOK {
					return "agent " + a.id + " not ready"
				}
			} else if int(n) < a.want && int(n) < min {
				return fmt.Sprintf("agent %s has %v tunnels", a.id, n)
			}
			agents += int(n)
		}
	}
	if held != agents {
		return fmt.Sprintf("replicas hold %d tunnels, agents have %d", held, agents)
	}
	return ""
}

// answers reports whether cluster cl's API server answers GET /version
// through addr (a replica's public port, or HAProxy) on a new connection.
func (s *scaleTest) answers(ctx context.Context, addr string, cl *scaleCluster) error {
	cfg := &tls.Config{ServerName: cl.host(), MinVersion: tls.VersionTLS12}
	if cl.mode == tunnel.Passthrough {
		cfg.RootCAs, cfg.Certificates = s.adminTLS.RootCAs, s.adminTLS.Certificates
	} else {
		cfg.RootCAs = s.relayCA
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
		TLSClientConfig:   cfg,
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+cl.host()+"/version", nil)
	if cl.mode == tunnel.Terminate {
		req.Header.Set("Authorization", "Bearer "+s.saToken)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", resp.Status, oneLine(string(body)))
	}
	return nil
}

// sweep asks every cluster through every address once and returns the
// failures.
func (s *scaleTest) sweep(ctx context.Context, clusters []*scaleCluster, addrs []string) []string {
	var mu sync.Mutex
	var errs []string
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for _, cl := range clusters {
		for _, addr := range addrs {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := s.answers(ctx, addr, cl); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Sprintf("%s via %s: %s", cl.uid, s.addrName(addr), oneLine(err.Error())))
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	sort.Strings(errs)
	return errs
}

func (s *scaleTest) addrName(addr string) string {
	if addr == s.lb {
		return "haproxy"
	}
	for _, r := range s.relays {
		if r.pub == addr {
			return r.id
		}
	}
	return addr
}

// getLoop runs kubectl get through HAProxy for each cluster in turn until
// ctx ends (at most 5000 requests).
func (s *scaleTest) getLoop(ctx context.Context, clusters []*scaleCluster) {
	for i := 0; i < 5000 && ctx.Err() == nil; i++ {
		cl := clusters[i%len(clusters)]
		start := time.Now()
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := proctest.Run(s.c.KubectlCmd(rctx, cl.kubeconfig, "get", "namespace", "default", "-o", "name", "--request-timeout=20s"))
		cancel()
		if ctx.Err() != nil {
			return // ended by the test, not by the fleet
		}
		s.requests.add(reqResult{start: start, end: time.Now(), what: "kubectl get via " + cl.uid + " (" + string(cl.mode) + ")", err: err})
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond): // leave the 2 cores some room
		}
	}
}

func (s *scaleTest) waitFirstRequests(ctx context.Context, within time.Duration) error {
	err := pollUntil(ctx, within, func() bool {
		n, failed, _ := s.requests.window(time.Time{}, time.Now())
		return n >= 4 && failed == 0
	})
	if err != nil {
		_, _, errs := s.requests.window(time.Time{}, time.Now())
		return fmt.Errorf("the kubectl loops do not work before anything moves: %w: %v", err, errs)
	}
	return nil
}

// createdNames are the ConfigMaps createLoop made.
type createdNames struct {
	mu      sync.Mutex
	list    []string
	stopped bool
}

func (c *createdNames) add(n string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return false
	}
	c.list = append(c.list, n)
	return true
}

func (c *createdNames) stop() {
	c.mu.Lock()
	c.stopped = true
	c.mu.Unlock()
}

func (c *createdNames) names() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.list)
}

// createLoop creates a ConfigMap every 250 ms straight at the API server
// (not through the relays: what is measured is what the watches see).
func (s *scaleTest) createLoop(ctx context.Context, created *createdNames) {
	hc := s.c.HTTPClient()
	for i := 0; i < 4000 && ctx.Err() == nil; i++ {
		name := fmt.Sprintf("cm-%04d", i)
		body := fmt.Sprintf(`{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":%q}}`, name)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.c.URL+"/api/v1/namespaces/"+scaleNamespace+"/configmaps",
			strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		resp, err := hc.Do(req)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusCreated && !created.add(name) {
				return
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(scaleCreateEvery):
		}
	}
}

func missing(ws *watchStats, names []string) []string {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	var out []string
	for _, n := range names {
		if !ws.seen[n] {
			out = append(out, n)
		}
	}
	return out
}

// watchLoop keeps one `kubectl get configmaps --watch` running through
// HAProxy, starting a new one whenever it ends (each starts with a list,
// as kubectl's own retry does), and records every name it prints.
func (s *scaleTest) watchLoop(ctx context.Context, cl *scaleCluster, ws *watchStats) {
	s.kubectlLoop(ctx, cl.kubeconfig, []string{"get", "configmaps", "-n", scaleNamespace, "--watch", "-o", "name",
		"--field-selector", "metadata.name!=kube-root-ca.crt"}, kubectlRun{
		started: func() {
			ws.mu.Lock()
			ws.sessions++
			ws.mu.Unlock()
		},
		line: func(l string) {
			ws.mu.Lock()
			ws.seen[strings.TrimPrefix(strings.TrimSpace(l), "configmap/")] = true
			ws.mu.Unlock()
		},
		ended: func(end string, err error) {
			if err != nil {
				ws.mu.Lock()
				ws.unclean = append(ws.unclean, end)
				ws.mu.Unlock()
			}
		},
	})
}

// execLoop keeps one long `kubectl exec` running through HAProxy: a shell
// on the kwok pod printing a line every 100 ms. A session a drain ends is
// started again; the longest pause between two lines is the figure.
func (s *scaleTest) execLoop(ctx context.Context, cl *scaleCluster, es *execStats) {
	s.kubectlLoop(ctx, cl.kubeconfig, []string{"exec", "-n", scaleNamespace, "app", "--", "sh", "-c",
		"i=0; while [ $i -lt 6000 ]; do echo $i; i=$((i+1)); sleep 0.1; done"}, kubectlRun{
		started: func() {
			es.mu.Lock()
			es.sessions++
			es.mu.Unlock()
		},
		line: func(string) {
			now := time.Now()
			es.mu.Lock()
			if !es.last.IsZero() {
				es.longest = max(es.longest, now.Sub(es.last))
			}
			es.last = now
			es.lines++
			es.mu.Unlock()
		},
		ended: func(end string, _ error) {
			es.mu.Lock()
			es.ends = append(es.ends, end)
			es.mu.Unlock()
		},
	})
}

// kubectlRun is what kubectlLoop reports of each kubectl it runs.
type kubectlRun struct {
	started func()
	line    func(string)
	// ended gets how the run ended ("15:04:05.000 exit 0", or the time,
	// the error and kubectl's stderr) and the error itself: a failed start
	// too, after which the loop stops.
	ended func(end string, err error)
}

// kubectlLoop runs kubectl with args against kubeconfig again and again
// (up to 200 times) until ctx ends, reporting to r. A run that failed is
// not retried at once: with no replica up yet it would fail in a hot loop.
func (s *scaleTest) kubectlLoop(ctx context.Context, kubeconfig string, args []string, r kubectlRun) {
	for session := 0; session < 200 && ctx.Err() == nil; session++ {
		cmd := s.c.KubectlCmd(ctx, kubeconfig, args...)
		var stderr proctest.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		if err == nil {
			err = cmd.Start()
		}
		if err != nil {
			r.ended("start: "+err.Error(), err)
			return
		}
		r.started()
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			r.line(sc.Text())
		}
		err = cmd.Wait()
		if ctx.Err() != nil {
			return
		}
		end := time.Now().UTC().Format("15:04:05.000") + " exit 0"
		if err != nil {
			end = fmt.Sprintf("%s: %v: %s", time.Now().UTC().Format("15:04:05.000"), err, oneLine(stderr.String()))
		}
		r.ended(end, err)
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
}

// roll replaces replica i as a rollout does: SIGTERM, wait for the exit, a
// new process with the same id and ports, wait until it is ready, up in
// HAProxy and every agent is tunnelled.
func (s *scaleTest) roll(ctx context.Context, i int) (time.Duration, error) {
	r := s.relays[i]
	start := time.Now()
	if err := r.p.Signal(syscall.SIGTERM); err != nil {
		return 0, fmt.Errorf("SIGTERM %s: %w", r.id, err)
	}
	select {
	case <-r.p.Done():
	case <-time.After(scaleShutdown + scaleDrain + 20*time.Second):
		// Where it hangs: the Go runtime's goroutine dump goes to its log.
		_ = r.p.Signal(syscall.SIGQUIT)
		select {
		case <-r.p.Done():
		case <-time.After(5 * time.Second):
		}
		return 0, fmt.Errorf("%s did not exit within %v of SIGTERM (goroutine dump in %s)",
			r.id, scaleShutdown+scaleDrain+20*time.Second, filepath.Join(s.logs, "relay-"+r.id+".log"))
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	if err := r.p.Err(); err != nil {
		return 0, fmt.Errorf("%s exit status after SIGTERM: %w\n%s", r.id, err, r.p.Tail(30))
	}
	if err := s.startRelay(ctx, r); err != nil {
		return 0, err
	}
	// As a rollout goes on once the new pod is ready: every agent
	// tunnelled, not necessarily back at two tunnels (their backoff
	// decides when the second finds a distinct replica).
	if err := s.waitTunnels(ctx, 60*time.Second, 1); err != nil {
		return 0, fmt.Errorf("after rolling %s: %w", r.id, err)
	}
	return time.Since(start), nil
}

// etcdTunnels reads the registry's tunnel keys from etcd (JSON gateway):
// replica id -> cluster uids it holds a tunnel for.
func (s *scaleTest) etcdTunnels(ctx context.Context) (map[string]map[string]bool, error) {
	prefix := scaleEtcdPrefix + "tunnels/"
	end := prefix[:len(prefix)-1] + string(rune(prefix[len(prefix)-1]+1))
	body, _ := json.Marshal(map[string]any{
		"key": base64.StdEncoding.EncodeToString([]byte(prefix)), "range_end": base64.StdEncoding.EncodeToString([]byte(end)),
		"keys_only": true,
	})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.etcd.Endpoint()+"/v3/kv/range", bytes.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("listing tunnels in etcd: %w", err)
	}
	defer resp.Body.Close()
	var out struct {
		Kvs []struct {
			Key []byte `json:"key"` // base64 in JSON: []byte decodes it
		} `json:"kvs"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("decoding etcd range: %w", err)
	}
	held := map[string]map[string]bool{}
	for _, kv := range out.Kvs {
		// tunnels/<label>/<replicaID>/<clusterUID>/<agentID>
		parts := strings.Split(strings.TrimPrefix(string(kv.Key), prefix), "/")
		if len(parts) < 4 {
			continue
		}
		if held[parts[1]] == nil {
			held[parts[1]] = map[string]bool{}
		}
		held[parts[1]][parts[2]] = true
	}
	return held, nil
}

// kill SIGKILLs the replica holding the most clusters and measures how long
// until each of them answers through HAProxy and through every surviving
// replica, in one sweep.
func (s *scaleTest) kill(ctx context.Context) (id string, n int, recovery time.Duration, first string, err error) {
	held, err := s.etcdTunnels(ctx)
	if err != nil {
		return "", 0, 0, "", err
	}
	for _, r := range s.relays {
		if len(held[r.id]) > n || id == "" {
			id, n = r.id, len(held[r.id])
		}
	}
	if n == 0 {
		return "", 0, 0, "", fmt.Errorf("etcd lists no tunnels on any replica: %v", held)
	}
	var victims []*scaleCluster
	for _, cl := range s.clusters {
		if held[id][cl.uid] {
			victims = append(victims, cl)
		}
	}
	addrs := []string{s.lb}
	for _, r := range s.relays {
		if r.id != id {
			addrs = append(addrs, r.pub)
		}
	}
	r := s.slot(id)
	start := time.Now()
	if err := r.p.Kill(10 * time.Second); err != nil {
		return "", 0, 0, "", err
	}
	var last []string
	for sweep := 0; sweep < 500; sweep++ {
		errs := s.sweep(ctx, victims, addrs)
		if sweep == 0 {
			first = fmt.Sprintf("%d of %d requests failed", len(errs), len(victims)*len(addrs))
		}
		if len(errs) == 0 {
			return id, n, time.Since(start), first, nil
		}
		last = errs
		if time.Since(start) > scaleLeaseTTL+30*time.Second {
			break
		}
		select {
		case <-ctx.Done():
			return "", 0, 0, "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return "", 0, 0, "", fmt.Errorf("clusters of killed %s still fail after %v: %v", id, time.Since(start).Round(time.Second), last)
}

// etcdOutage stops etcd for 30 s: the tunnels up keep serving, a cluster
// that registers meanwhile is served by the replica its tunnel lands on,
// and after etcd is back every cluster answers via every replica.
func (s *scaleTest) etcdOutage(ctx context.Context, fig *scaleFigures) {
	t := s.t
	all := s.clusters[:scaleClusters]
	start := time.Now()
	require.NoError(t, s.etcd.Stop(), "stopping etcd")
	t.Logf("etcd stopped")

	// The late cluster registers while etcd is down: one agent with one
	// tunnel, so one replica holds it and the others cannot know.
	late := s.clusters[scaleClusters]
	s.startAgents(late, 1, "--tunnels", "1")
	lateDone := false
	var unready []string
	for tick := 0; time.Since(start) < scaleEtcdOutage && tick < 1000; tick++ {
		if !lateDone {
			fig.lateAttempts++
			_, err := proctest.Run(s.c.KubectlCmd(ctx, late.kubeconfig, "get", "namespace", "default", "-o", "name", "--request-timeout=5s"))
			if err == nil {
				lateDone = true
				fig.lateFirst = time.Since(start)
				var by []string
				for _, r := range s.relays {
					if s.answers(ctx, r.pub, late) == nil {
						by = append(by, r.id)
					}
				}
				fig.lateServedBy = strings.Join(by, ", ")
				if fig.lateServedBy == "" {
					fig.lateServedBy = "none" // asserted
				}
				t.Logf("late cluster served after %v and %d attempts; directly by: %s", fig.lateFirst.Round(time.Millisecond), fig.lateAttempts, fig.lateServedBy)
			}
		}
		if tick%10 == 0 {
			errs := s.sweep(ctx, all, s.relayAddrs())
			fig.outageSweeps++
			fig.outageSweepErrs += len(errs)
			if len(errs) > 0 {
				t.Logf("sweep during the outage: %v", errs)
			}
		}
		for _, r := range s.relays {
			if httpStatus(ctx, "http://"+r.health+"/readyz") != http.StatusOK && !slices.Contains(unready, r.id) {
				unready = append(unready, r.id)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
	if !lateDone {
		fig.lateAttempts = 0 // asserted: the late cluster was never served
	}
	fig.outageReady = "every replica stayed ready"
	if len(unready) > 0 {
		fig.outageReady = "not ready at some point: " + strings.Join(unready, ", ")
	}
	stopped := time.Now()
	fig.outageRequests, fig.outageFailed, fig.outageErrs = s.requests.window(start, stopped)

	back := time.Now()
	require.NoError(t, s.etcd.Start(ctx), "starting etcd again")
	var last []string
	err := pollUntil(ctx, 60*time.Second, func() bool {
		last = s.sweep(ctx, s.clusters, s.relayAddrs())
		return len(last) == 0
	})
	require.NoError(t, err, "not every cluster answers via every replica after etcd came back: %v", last)
	fig.convergeTook = time.Since(back)
	t.Logf("etcd back: every cluster answers via every replica after %v", fig.convergeTook.Round(time.Millisecond))
	require.NoError(t, s.waitTunnels(ctx, 60*time.Second, 1), "the agents are not all back after the etcd outage")
	fig.afterRequests, fig.afterFailed, fig.afterErrs = s.requests.window(back, time.Now())
}

// pollUntil calls cond every 100 ms until it is true, within bounds.
func pollUntil(ctx context.Context, within time.Duration, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not within %v: %w", within, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

var plainHTTP = &http.Client{Timeout: 2 * time.Second}

func httpStatus(ctx context.Context, url string) int {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := plainHTTP.Do(req)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func scrapePlain(ctx context.Context, url string) (map[string]float64, error) {
	return promtext.Scrape(ctx, plainHTTP, url)
}

// writeScaleDoc rewrites the "## Measured" section of docs/scale-out.md
// (creating the file with just that section when it is missing).
func writeScaleDoc(f *scaleFigures) error {
	ms := func(d time.Duration) string { return d.Round(100 * time.Millisecond).String() }
	var b strings.Builder
	fmt.Fprintf(&b, "## Measured\n\nWritten by `TestScaleOut` (e2e/scaleout_test.go) on its last green run; do not edit by hand. "+
		"%d cores (%s), %s, load average %s at the end; the run took %s (setup %s).\n\n",
		runtime.NumCPU(), cpuModel(), time.Now().UTC().Format("2006-01-02 15:04 UTC"), loadAvg(), ms(f.total), ms(f.setup))
	fmt.Fprintf(&b, "Set-up: a real etcd 3.6, %d relay processes (`--lease-ttl %v --shutdown-delay %v --drain-timeout %v`, one CA, "+
		"certificate and signing key shared) behind Debian's HAProxy (mode tcp, balance roundrobin, `option httpchk GET /readyz` "+
		"every 250 ms, fall 2 rise 2, `option redispatch`, retries 3), %d clusters (%d passthrough, %d terminate) with %d agent "+
		"processes each (%d tunnels per agent), all dialing HAProxy, against a real kube-apiserver with a kwok node. During the "+
		"whole run: a `kubectl get` loop per mode over its clusters, one `kubectl get configmaps --watch` per mode (started again "+
		"whenever it ends) while the test creates a ConfigMap every %v, and one `kubectl exec` per mode (a shell on the kwok pod "+
		"printing a line every 100 ms, started again when it ends), all through HAProxy.\n\n",
		scaleReplicas, scaleLeaseTTL, scaleShutdown, scaleDrain, scaleClusters, scaleClusters/2, scaleClusters/2, scaleAgentsEach,
		f.tunnelsPerAgent, scaleCreateEvery)
	b.WriteString("| figure | measured | bound |\n| --- | --- | --- |\n")
	var per []string
	for _, d := range f.rollPerReplica {
		per = append(per, ms(d))
	}
	fmt.Fprintf(&b, "| rolling restart of all %d replicas (each: SIGTERM to the replacement ready, up in HAProxy, every agent tunnelled) | %s (%s) | |\n",
		scaleReplicas, ms(f.rollTook), strings.Join(per, ", "))
	fmt.Fprintf(&b, "| kubectl requests failed during the rolling restart | %d of %d | 0 |\n", f.rollFailed, f.rollRequests)
	for _, m := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		ws := f.watch[m]
		fmt.Fprintf(&b, "| %s watch: created ConfigMaps never seen | 0 of %d (%d watch sessions, %d ended with an error) | 0 |\n",
			m, f.watchCreated, ws.sessions, len(ws.unclean))
	}
	for _, m := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		es := f.exec[m]
		fmt.Fprintf(&b, "| %s exec: sessions (ended with an error), lines, longest pause between two lines (restarts included) | %d (%d), %d, %s | |\n",
			m, es.sessions, len(es.ends)-countPrefix(es.ends, "exit 0"), es.lines, ms(es.longest))
	}
	fmt.Fprintf(&b, "| SIGKILL of %s (held %d clusters): until each answers through HAProxy and every surviving replica | %s (first sweep: %s) | ≤ %s |\n",
		f.killed, f.killedClusters, ms(f.killRecovery), f.killFirstSweep, scaleLeaseTTL+5*time.Second)
	fmt.Fprintf(&b, "| kubectl requests failed from the kill until every agent is tunnelled again | %d of %d | |\n", f.killFailed, f.killRequests)
	two := "not within a minute (the agents' reconnect backoff grows while their second tunnel keeps landing on the first one's replica)"
	if f.killTwoTunnels > 0 {
		two = ms(f.killTwoTunnels)
	}
	fmt.Fprintf(&b, "| from the kill (replacement started once all answered) until every agent holds two tunnels on distinct replicas again | %s | |\n", two)
	fmt.Fprintf(&b, "| etcd stopped %s: kubectl requests failed | %d of %d | 0 |\n", scaleEtcdOutage, f.outageFailed, f.outageRequests)
	fmt.Fprintf(&b, "| etcd stopped: every cluster via every replica (sweeps, failures) | %d, %d | 0 failures |\n", f.outageSweeps, f.outageSweepErrs)
	fmt.Fprintf(&b, "| etcd stopped: replicas' /readyz | %s | |\n", f.outageReady)
	fmt.Fprintf(&b, "| etcd stopped: a new cluster's agent registers (one agent, `--tunnels 1`); first kubectl answer through HAProxy | after %s, attempt %d; then asked directly, answered by %s | |\n",
		ms(f.lateFirst), f.lateAttempts, f.lateServedBy)
	fmt.Fprintf(&b, "| etcd back: until every cluster (the new one too) answers via every replica | %s | |\n", ms(f.convergeTook))
	fmt.Fprintf(&b, "| kubectl requests failed after etcd came back | %d of %d | |\n", f.afterFailed, f.afterRequests)
	b.WriteString("\nA `kubectl exec` cannot outlive the replica that carries its connection: when that replica is rolled or " +
		"killed the session ends (kubectl reports `websocket: close 1006 (abnormal closure)`) and, as kubectl does not retry an exec, " +
		"the test starts a new one; the longest pause is what a user retyping the command would see. A watch ends cleanly (exit 0) " +
		"and its next start lists what it missed, which is what kubectl's own watch retry does.\n")
	b.WriteString("\nRun it: `go test -count=1 -run TestScaleOut ./e2e` (needs `make kube-bins` and Debian's haproxy; skips naming what is missing).\n")

	old, err := os.ReadFile(scaleDocPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	doc := string(old)
	if i := strings.Index(doc, "## Measured"); i >= 0 {
		rest := doc[i+len("## Measured"):]
		tail := ""
		if j := strings.Index(rest, "\n## "); j >= 0 {
			tail = rest[j:]
		}
		doc = doc[:i] + b.String() + tail
	} else {
		if doc != "" && !strings.HasSuffix(doc, "\n\n") {
			doc = strings.TrimRight(doc, "\n") + "\n\n"
		}
		doc += b.String()
	}
	return os.WriteFile(scaleDocPath, []byte(doc), 0o644)
}

// countPrefix counts the strings whose time-stamped text (after the first
// space) starts with p.
func countPrefix(list []string, p string) int {
	n := 0
	for _, l := range list {
		if _, rest, ok := strings.Cut(l, " "); ok && strings.HasPrefix(rest, p) {
			n++
		}
	}
	return n
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
