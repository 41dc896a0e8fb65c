package testcluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// A real node (Options.RealNode): everything runs inside a network
// namespace the cluster creates, whose only addresses are 127.0.0.1 and the
// node IP (a /32 on lo) and whose default route is a blackhole, so no packet
// leaves the machine. Processes enter it with `nsenter --net` (not `ip netns
// exec`, which would also give them their own mount namespace and hide
// kubelet's volume mounts from containerd and runc). The test process
// reaches it through Cluster.DialContext.
//
// Ports inside the namespace are fixed: nothing else listens there.
const (
	nodeEtcdPort      = 2379
	nodeEtcdPeerPort  = 2380
	nodeAPIServerPort = 6443

	// DefaultNodeIP is the real node's address in its network namespace.
	DefaultNodeIP = "10.200.0.2"
	// DefaultRealNodeName is the real node's name.
	DefaultRealNodeName = "spx-node-0"

	nodePodSubnet  = "10.244.0.0/24" // the node's share of podCIDR
	clusterDomain  = "cluster.local"
	pauseImageRef  = "registry.k8s.io/pause:3.10.1"
	cniBinDir      = "/usr/lib/cni"
	netnsRunDir    = "/run/netns"
	shimSocketDir  = "/run/containerd/s"
	cniCacheDir    = "/var/lib/cni/results"
	containerLinks = "/var/log/containers"
)

// ErrRealNodeUnsupported is wrapped by the error CheckRealNode (and Start
// with Options.RealNode) returns when this machine cannot run a real node.
var ErrRealNodeUnsupported = errors.New("real node not possible here")

// kernelSettings are the global (not per network namespace) sysctls kubelet
// sets at start (setupKernelTunables); they are saved before and restored
// after.
var kernelSettings = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// globalDirs are the directories outside Dir that the node's parts write
// to whatever their configuration says; Stop checks that it added nothing
// to them.
var globalDirs = []string{"/run", "/run/containerd", shimSocketDir, netnsRunDir, "/var/lib", "/var/lib/cni",
	cniCacheDir, "/var/log", containerLinks, "/etc", "/etc/cni", "/opt", "/usr/libexec"}

// createdOutside are the paths outside Dir that the node's parts create
// whatever their configuration says, innermost first: ip's /run/netns
// mount, containerd's shim socket directory, libcni's cache, kubelet's
// /var/log/containers links and device-plugin socket (both hard-coded),
// libmount's utab, iptables' lock, the controller-manager's flex volume
// directory. Stop removes those that did not exist before Start (files, and
// directories once empty).
var createdOutside = []string{
	netnsRunDir, shimSocketDir, "/run/containerd/fifo", "/run/containerd/runc", "/run/containerd",
	cniCacheDir, "/var/lib/cni", containerLinks, "/run/xtables.lock", "/run/mount/utab", "/run/mount",
	"/var/lib/kubelet/device-plugins/kubelet.sock", "/var/lib/kubelet/device-plugins", "/var/lib/kubelet",
}

// nodeState is what a real node's teardown needs.
type nodeState struct {
	netns       string // name under /run/netns
	cgroupRoot  string // kubelet's cgroupRoot, e.g. /spx-node-ab12cd
	cniNetwork  string // CNI network name (names libcni's cache files)
	sock        string // containerd's grpc socket
	sysctls     map[string]string
	dirsBefore  map[string]map[string]bool
	existed     map[string]bool // createdOutside paths that existed before Start
	netnsCreate bool            // the namespace exists (delete it)
	readyAt     time.Duration
	startedAt   time.Time
	lock        *os.File // held from Start to the end of Stop
	sysctlFile  string   // the saved kernel settings, beside the lock
}

// lockNode waits (within ctx) for the machine-wide real-node lock: two
// nodes at once would share kubelet's hard-coded paths and the kernel
// settings each one saves and restores, so they take turns.
func (c *Cluster) lockNode(ctx context.Context) error {
	path := filepath.Join(filepath.Dir(c.opts.BinDir), "realnode.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		path = filepath.Join(os.TempDir(), "spectro-proxy-realnode.lock")
		if f, err = os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600); err != nil {
			return err
		}
	}
	waiting := false
	err = poll(ctx, 200*time.Millisecond, "the real-node lock "+path+" (another real node is running)",
		func(context.Context) (bool, error) {
			err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
			if err != nil && !waiting {
				waiting = true
				c.log.Info("waiting for another real node to stop", "lock", path)
			}
			return err == nil, err
		})
	if err != nil {
		f.Close()
		return err
	}
	c.node.lock = f
	return nil
}

// NodeFigures are a real node's start and stop times.
type NodeFigures struct {
	// Start is the whole of Start; NodeReady the time from Start's
	// beginning until the node was Ready.
	Start, NodeReady time.Duration
	// Stop is the whole teardown.
	Stop time.Duration
}

// CheckRealNode returns nil when this machine can run a real node with the
// binaries in binDir (DefaultBinDir if empty), else an error wrapping
// ErrRealNodeUnsupported (or ErrBinariesMissing) that names everything missing.
func CheckRealNode(binDir string) error {
	if binDir == "" {
		binDir = DefaultBinDir()
	}
	// What the machine lacks first: no build fixes that.
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (running as uid "+strconv.Itoa(os.Geteuid())+")")
	} else if caps, err := effectiveCaps(); err != nil || caps&(1<<21) == 0 {
		missing = append(missing, "CAP_SYS_ADMIN (network namespaces, mounts)")
	}
	for _, cmd := range []string{"ip", "nsenter", "containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "mount"} {
		if _, err := lookPath(cmd); err != nil {
			missing = append(missing, cmd+" (apt-get install containerd runc iptables iproute2 util-linux)")
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			missing = append(missing, cniBinDir+"/"+p+" (apt-get install containernetworking-plugins)")
		}
	}
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		missing = append(missing, "network namespaces (/proc/self/ns/net)")
	}
	if len(cgroupMounts()) == 0 {
		missing = append(missing, "cgroups (nothing of type cgroup or cgroup2 mounted)")
	} else if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		if b, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err != nil || !strings.Contains(string(b), "memory") {
			missing = append(missing, "the memory cgroup controller")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: missing %s", ErrRealNodeUnsupported, strings.Join(missing, "; "))
	}
	if err := CheckBinaries(binDir, false); err != nil {
		return err
	}
	var bins []string
	for _, b := range []string{"kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler", "coredns"} {
		if st, err := os.Stat(filepath.Join(binDir, b)); err != nil || st.Mode()&0o111 == 0 {
			bins = append(bins, b)
		}
	}
	for _, img := range []string{"pause.tar", "busybox.tar"} {
		if _, err := os.Stat(filepath.Join(binDir, "images", img)); err != nil {
			bins = append(bins, "images/"+img)
		}
	}
	if len(bins) > 0 {
		return fmt.Errorf("%w: %s not found in %s: run `make kube-bins` (hack/kube-bins.sh)", ErrBinariesMissing,
			strings.Join(bins, ", "), binDir)
	}
	return nil
}

func lookPath(cmd string) (string, error) {
	if p, err := exec.LookPath(cmd); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		if st, err := os.Stat(filepath.Join(d, cmd)); err == nil && st.Mode()&0o111 != 0 {
			return filepath.Join(d, cmd), nil
		}
	}
	return "", fmt.Errorf("%s not found", cmd)
}

// effectiveCaps returns the process's effective capability set.
func effectiveCaps() (uint64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff in /proc/self/status")
}

// nodeEnv is the environment of the node's processes: kubelet and
// kube-proxy run iptables, containerd finds its shim on PATH.
func nodeEnv() []string {
	env := childEnv()
	for i, kv := range env {
		if strings.HasPrefix(kv, "PATH=") {
			env[i] = kv + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
			return env
		}
	}
	return append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

// startNode starts everything after kube-apiserver: controllers,
// scheduler, containerd (with the pause and busybox images), CoreDNS,
// kubelet and kube-proxy; it returns when the node is Ready, the default
// ServiceAccount exists and cluster DNS answers.
func (c *Cluster) startNode(ctx context.Context) error {
	n := c.node
	kc := func(component string) (string, error) {
		path := filepath.Join(c.Dir, "kubeconfigs", component+".kubeconfig")
		ck := c.pki.node[component]
		if component == "coredns" {
			ck = certKey{c.pki.adminCert, c.pki.adminKey}
		}
		return path, WriteKubeconfig(path, Kubeconfig{Server: c.URL, CAFile: c.pki.caCert, CertFile: ck.cert,
			KeyFile: ck.key, User: component})
	}

	// Controllers and scheduler.
	cmKC, err := kc("kube-controller-manager")
	if err != nil {
		return err
	}
	if _, err := c.start("kube-controller-manager", []string{
		"--kubeconfig=" + cmKC, "--authentication-kubeconfig=" + cmKC, "--authorization-kubeconfig=" + cmKC,
		"--bind-address=127.0.0.1", "--secure-port=10257",
		"--use-service-account-credentials=true", // else kube-root-ca.crt never appears
		"--service-account-private-key-file=" + c.pki.serviceAccountKey,
		"--root-ca-file=" + c.pki.caCert,
		"--cluster-signing-cert-file=" + c.pki.caCert, "--cluster-signing-key-file=" + c.pki.caKey,
		"--leader-elect=false", "--allocate-node-cidrs=false",
		"--cert-dir=" + filepath.Join(c.Dir, "pki", "controller-manager"),
		"--flex-volume-plugin-dir=" + filepath.Join(c.Dir, "kube-controller-manager", "volume-plugins"),
		"--profiling=false",
	}); err != nil {
		return err
	}
	schedKC, err := kc("kube-scheduler")
	if err != nil {
		return err
	}
	if _, err := c.start("kube-scheduler", []string{
		"--kubeconfig=" + schedKC, "--authentication-kubeconfig=" + schedKC, "--authorization-kubeconfig=" + schedKC,
		"--bind-address=127.0.0.1", "--secure-port=10259", "--leader-elect=false",
		"--cert-dir=" + filepath.Join(c.Dir, "pki", "scheduler"),
		"--profiling=false",
	}); err != nil {
		return err
	}

	// containerd.
	if err := c.startContainerd(ctx); err != nil {
		return err
	}
	for _, img := range []string{"pause.tar", "busybox.tar"} {
		if err := c.ImportImage(ctx, filepath.Join(c.opts.BinDir, "images", img)); err != nil {
			return err
		}
	}

	// CoreDNS on the node IP, answering the cluster's names (NXDOMAIN for
	// everything else: there is no upstream).
	dnsKC, err := kc("coredns")
	if err != nil {
		return err
	}
	corefile := filepath.Join(c.Dir, "coredns", "Corefile")
	if err := os.MkdirAll(filepath.Dir(corefile), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(corefile, fmt.Appendf(nil, `%[1]s:53 {
    bind %[2]s
    errors
    kubernetes %[1]s {
        kubeconfig %[3]s
    }
}
.:53 {
    bind %[2]s
    template ANY ANY {
        rcode NXDOMAIN
    }
}
`, clusterDomain, c.NodeIP, dnsKC), 0o600); err != nil {
		return err
	}
	dns, err := c.start("coredns", []string{"-conf", corefile})
	if err != nil {
		return err
	}

	// kubelet.
	if err := c.saveKernelSettings(); err != nil {
		return err
	}
	if err := c.startKubelet(ctx); err != nil {
		return err
	}

	// kube-proxy.
	proxyKC, err := kc("kube-proxy")
	if err != nil {
		return err
	}
	proxyCfg := filepath.Join(c.Dir, "kube-proxy", "config.yaml")
	if err := writeJSON(proxyCfg, map[string]any{
		"apiVersion":       "kubeproxy.config.k8s.io/v1alpha1",
		"kind":             "KubeProxyConfiguration",
		"mode":             "iptables",
		"clientConnection": map[string]any{"kubeconfig": proxyKC},
		"hostnameOverride": c.NodeName,
		"bindAddress":      c.NodeIP,
		"clusterCIDR":      podCIDR,
		// 0: leave the machine-wide conntrack table size and timeouts alone.
		"conntrack": map[string]any{"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
			"tcpCloseWaitTimeout": "0s", "udpTimeout": "0s", "udpStreamTimeout": "0s"},
		"healthzBindAddress": "127.0.0.1:10256",
		"metricsBindAddress": "127.0.0.1:10249",
	}); err != nil {
		return err
	}
	if _, err := c.start("kube-proxy", []string{"--config=" + proxyCfg, "--v=1"}); err != nil {
		return err
	}

	// Ready: the node, the default ServiceAccount (the controllers work),
	// and cluster DNS.
	if err := poll(ctx, 200*time.Millisecond, "node "+c.NodeName+" Ready", func(ctx context.Context) (bool, error) {
		if err := c.anyExited(); err != nil {
			return true, err
		}
		var node struct {
			Status struct {
				Conditions []condition `json:"conditions"`
			} `json:"status"`
		}
		if err := c.do(ctx, http.MethodGet, "/api/v1/nodes/"+c.NodeName, nil, &node); err != nil {
			return false, err
		}
		if !conditionTrue(node.Status.Conditions, "Ready") {
			return false, errors.New("node not Ready yet")
		}
		return true, nil
	}); err != nil {
		return err
	}
	n.readyAt = time.Since(n.startedAt)
	c.log.Info("node Ready", "node", c.NodeName, "elapsed", n.readyAt.Round(time.Millisecond))
	if err := c.WaitServiceAccount(ctx, "default"); err != nil {
		return err
	}
	res := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return c.DialContext(ctx, network, net.JoinHostPort(c.NodeIP, "53"))
	}}
	name := "kubernetes.default.svc." + clusterDomain
	return poll(ctx, 200*time.Millisecond, "cluster DNS ("+name+")", func(ctx context.Context) (bool, error) {
		if err := dns.exited(); err != nil {
			return true, err
		}
		addrs, err := res.LookupHost(ctx, name)
		if err != nil {
			return false, err
		}
		if len(addrs) != 1 || addrs[0] != serviceIP {
			return false, fmt.Errorf("%s resolves to %v", name, addrs)
		}
		return true, nil
	})
}

// anyExited returns the exit of any cluster process that has died.
func (c *Cluster) anyExited() error {
	for _, p := range c.procs {
		if err := p.exited(); err != nil {
			return err
		}
	}
	return nil
}

// WaitServiceAccount waits for the controllers to create the "default"
// ServiceAccount of a namespace (the ServiceAccount admission plugin
// rejects pods until then). With a real node only.
func (c *Cluster) WaitServiceAccount(ctx context.Context, namespace string) error {
	return poll(ctx, 100*time.Millisecond, "ServiceAccount "+namespace+"/default", func(ctx context.Context) (bool, error) {
		err := c.do(ctx, http.MethodGet, "/api/v1/namespaces/"+namespace+"/serviceaccounts/default", nil, nil)
		return err == nil, err
	})
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// saveKernelSettings records the settings kubelet changes, in memory and
// in a file beside the node lock: a node whose test process died without
// Stop leaves that file, and the next node restores the true originals
// from it instead of saving kubelet's values.
func (c *Cluster) saveKernelSettings() error {
	c.node.sysctls = map[string]string{}
	if c.node.lock != nil {
		c.node.sysctlFile = c.node.lock.Name() + ".sysctls"
		if b, err := os.ReadFile(c.node.sysctlFile); err == nil && json.Unmarshal(b, &c.node.sysctls) == nil &&
			len(c.node.sysctls) > 0 {
			c.log.Warn("restoring the kernel settings a stale real node saved", "file", c.node.sysctlFile)
			return nil
		}
	}
	for _, k := range kernelSettings {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			continue // not on this kernel
		}
		c.node.sysctls[k] = strings.TrimSpace(string(b))
	}
	if c.node.sysctlFile != "" {
		b, _ := json.Marshal(c.node.sysctls)
		return os.WriteFile(c.node.sysctlFile, b, 0o600)
	}
	return nil
}

// initNode prepares the node's state and records what exists outside Dir.
func (c *Cluster) initNode() {
	suffix := make([]byte, 3)
	_, _ = rand.Read(suffix)
	id := "spx-node-" + hex.EncodeToString(suffix)
	c.node = &nodeState{
		netns:      id,
		cgroupRoot: "/" + id,
		cniNetwork: id,
		sock:       filepath.Join(c.Dir, "containerd", "containerd.sock"),
		startedAt:  time.Now(),
		dirsBefore: map[string]map[string]bool{},
		existed:    map[string]bool{},
	}
	for _, p := range createdOutside {
		_, err := os.Lstat(p)
		c.node.existed[p] = err == nil
	}
	c.Netns = id
	for _, d := range globalDirs {
		c.node.dirsBefore[d] = listDir(d)
	}
}

func listDir(d string) map[string]bool {
	ents, err := os.ReadDir(d)
	if err != nil {
		return nil
	}
	m := map[string]bool{}
	for _, e := range ents {
		m[e.Name()] = true
	}
	return m
}
