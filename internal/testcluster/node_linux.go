package testcluster

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
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

// netnsPath is the namespace's file ("" without a real node).
func (c *Cluster) netnsPath() string {
	if c.node == nil || c.node.netns == "" {
		return ""
	}
	return filepath.Join(netnsRunDir, c.node.netns)
}

// DialContext dials addr inside the real node's network namespace (where
// the API server, the node IP, port-forwards and the relay live), or
// normally without a real node. The socket is made on an OS thread that has
// entered the namespace; once connected it works from any thread.
func (c *Cluster) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	ns := c.netnsPath()
	if ns == "" {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	type result struct {
		conn net.Conn
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// Not unlocked when the way back fails: the thread then ends with
		// the goroutine instead of serving others in the wrong namespace.
		back, err := enterNetns(ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, err}
			return
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, addr)
		if back() == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{conn, err}
	}()
	r := <-ch
	return r.conn, r.err
}

// enterNetns moves the calling (locked) thread into the namespace at path
// and returns the function that moves it back.
func enterNetns(path string) (back func() error, err error) {
	orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", syscall.Gettid()))
	if err != nil {
		return nil, err
	}
	target, err := os.Open(path)
	if err != nil {
		orig.Close()
		return nil, err
	}
	defer target.Close()
	if err := setns(int(target.Fd())); err != nil {
		orig.Close()
		return nil, fmt.Errorf("entering %s: %w", path, err)
	}
	return func() error {
		defer orig.Close()
		return setns(int(orig.Fd()))
	}, nil
}

func setns(fd int) error {
	if _, _, e := syscall.RawSyscall(unix.SYS_SETNS, uintptr(fd), syscall.CLONE_NEWNET, 0); e != 0 {
		return e
	}
	return nil
}

// NetnsCommand returns a command that runs bin inside the node's network
// namespace (a plain command without a real node). Like the cluster's
// processes it dies with the parent process.
func (c *Cluster) NetnsCommand(ctx context.Context, bin string, args ...string) *exec.Cmd {
	var cmd *exec.Cmd
	if ns := c.netnsPath(); ns != "" {
		cmd = exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + ns, "--", bin}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, bin, args...)
	}
	cmd.Env = nodeEnv()
	cmd.SysProcAttr = sysProcAttr()
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// ip runs `ip args...` (on the host).
func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// createNetns makes the node's network namespace.
func (c *Cluster) createNetns(ctx context.Context) error {
	if err := c.lockNode(ctx); err != nil {
		return err
	}
	c.node.startedAt = time.Now() // the node's own times start with the lock
	c.sweepStale()
	if err := ip(ctx, "netns", "add", c.node.netns); err != nil {
		return err
	}
	c.node.netnsCreate = true
	for _, args := range [][]string{
		{"-n", c.node.netns, "link", "set", "lo", "up"},
		{"-n", c.node.netns, "addr", "add", c.NodeIP + "/32", "dev", "lo"},
		{"-n", c.node.netns, "route", "add", "blackhole", "default"},
	} {
		if err := ip(ctx, args...); err != nil {
			return err
		}
	}
	return nil
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

func (c *Cluster) containerdDir(elem ...string) string {
	return filepath.Join(append([]string{c.Dir, "containerd"}, elem...)...)
}

func (c *Cluster) startContainerd(ctx context.Context) error {
	n := c.node
	// Root here may lack CAP_SYS_RESOURCE; runc then cannot set the pause
	// container's oom_score_adj and every sandbox fails.
	caps, _ := effectiveCaps()
	restrictOOM := caps&(1<<24) == 0
	cniConf := filepath.Join(c.Dir, "cni", "net.d")
	for _, d := range []string{c.containerdDir("root"), c.containerdDir("state"), c.containerdDir("opt"), cniConf,
		filepath.Join(c.Dir, "cni", "ipam"), filepath.Join(c.Dir, "runc")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	if err := writeJSON(filepath.Join(cniConf, "10-testcluster.conflist"), map[string]any{
		"cniVersion": "0.4.0",
		"name":       n.cniNetwork,
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  []any{[]any{map[string]any{"subnet": nodePodSubnet}}},
					"routes":  []any{map[string]any{"dst": "0.0.0.0/0"}},
					"dataDir": filepath.Join(c.Dir, "cni", "ipam"),
				},
			},
		},
	}); err != nil {
		return err
	}
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) } // TOML basic strings
	config := fmt.Sprintf(`version = 2
root = %s
state = %s

[grpc]
  address = %s

[ttrpc]
  address = %s

[plugins."io.containerd.internal.v1.opt"]
  path = %s

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %s
  disable_apparmor = true
  restrict_oom_score_adj = %t
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %s
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %s
    conf_dir = %s
`, q(c.containerdDir("root")), q(c.containerdDir("state")), q(n.sock), q(n.sock+".ttrpc"),
		q(c.containerdDir("opt")), q(pauseImageRef), restrictOOM, q(filepath.Join(c.Dir, "runc")), q(cniBinDir), q(cniConf))
	cfgPath := c.containerdDir("config.toml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		return err
	}
	bin, err := lookPath("containerd")
	if err != nil {
		return err
	}
	p, err := c.startBin("containerd", bin, []string{"--config=" + cfgPath, "--log-level=warn"})
	if err != nil {
		return err
	}
	return poll(ctx, 50*time.Millisecond, "containerd socket", func(ctx context.Context) (bool, error) {
		if err := p.exited(); err != nil {
			return true, err
		}
		conn, err := net.Dial("unix", n.sock)
		if err != nil {
			return false, err
		}
		conn.Close()
		return true, nil
	})
}

// ImportImage imports an OCI or docker archive (such as `make image`'s)
// into the real node's containerd, where pods can use it without a pull
// (imagePullPolicy IfNotPresent or Never).
func (c *Cluster) ImportImage(ctx context.Context, tarball string) error {
	if c.node == nil {
		return errors.New("ImportImage needs a cluster started with Options.RealNode")
	}
	out, err := exec.CommandContext(ctx, "ctr", "--address", c.node.sock, "--namespace", "k8s.io",
		"images", "import", tarball).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %w: %s", tarball, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (c *Cluster) startKubelet(ctx context.Context) error {
	n := c.node
	dir := filepath.Join(c.Dir, "kubelet")
	resolv := filepath.Join(dir, "resolv.conf")
	for _, d := range []string{dir, filepath.Join(c.Dir, "pod-logs"), filepath.Join(dir, "volume-plugins")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	// Pods get the cluster DNS server only: there is no upstream.
	if err := os.WriteFile(resolv, nil, 0o644); err != nil {
		return err
	}
	kc := filepath.Join(c.Dir, "kubeconfigs", "kubelet.kubeconfig")
	ck := c.pki.node["kubelet-client"]
	if err := WriteKubeconfig(kc, Kubeconfig{Server: c.URL, CAFile: c.pki.caCert, CertFile: ck.cert, KeyFile: ck.key,
		User: "kubelet"}); err != nil {
		return err
	}
	// kubelet requires its cgroupRoot to exist in every hierarchy.
	for _, m := range cgroupMounts() {
		d := filepath.Join(m, n.cgroupRoot)
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("creating cgroup %s: %w", d, err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} { // empty in a new cpuset cgroup (v1)
			if b, err := os.ReadFile(filepath.Join(m, f)); err == nil {
				_ = os.WriteFile(filepath.Join(d, f), b, 0o644)
			}
		}
	}
	serving := c.pki.node["kubelet"]
	cfg := filepath.Join(dir, "config.yaml")
	if err := writeJSON(cfg, map[string]any{
		"apiVersion":         "kubelet.config.k8s.io/v1beta1",
		"kind":               "KubeletConfiguration",
		"address":            c.NodeIP,
		"port":               10250,
		"readOnlyPort":       0,
		"healthzBindAddress": "127.0.0.1",
		"healthzPort":        10248,
		"tlsCertFile":        serving.cert,
		"tlsPrivateKeyFile":  serving.key,
		"authentication": map[string]any{
			"anonymous": map[string]any{"enabled": false},
			"webhook":   map[string]any{"enabled": true},
			"x509":      map[string]any{"clientCAFile": c.pki.caCert},
		},
		"authorization": map[string]any{"mode": "Webhook"},
		// containerd 1.6 lacks the RuntimeConfig CRI call: kubelet uses this.
		"cgroupDriver": "cgroupfs",
		// Its own root: two nodes on one machine would each kill the
		// other's pods as orphans under the default /kubepods.
		"cgroupRoot":               n.cgroupRoot,
		"cgroupsPerQOS":            true,
		"containerRuntimeEndpoint": "unix://" + n.sock,
		"podLogsDir":               filepath.Join(c.Dir, "pod-logs"),
		"volumePluginDir":          filepath.Join(dir, "volume-plugins"),
		"resolvConf":               resolv,
		"clusterDNS":               []string{c.NodeIP},
		"clusterDomain":            clusterDomain,
		// The imported images can never be pulled again: never collect them,
		// and never evict for disk pressure on a shared machine.
		"imageGCHighThresholdPercent": 100,
		"imageGCLowThresholdPercent":  99,
		"evictionHard":                map[string]string{"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
		"failSwapOn":                  false,
		"rotateCertificates":          false,
		"serializeImagePulls":         false,
		"staticPodPath":               "",
	}); err != nil {
		return err
	}
	_, err := c.start("kubelet", []string{
		"--config=" + cfg,
		"--kubeconfig=" + kc,
		"--root-dir=" + filepath.Join(dir, "root"),
		"--cert-dir=" + filepath.Join(dir, "pki"),
		"--hostname-override=" + c.NodeName,
		"--node-ip=" + c.NodeIP,
		"--v=1",
	})
	return err
}

// writeJSON writes v as JSON (which YAML readers accept).
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

// stopNode tears the real node down and returns what it could not remove.
//
// Order: the controllers first (nothing recreates pods), then every pod is
// deleted through the API so kubelet stops it and CNI DEL runs; then
// kubelet, kube-proxy and CoreDNS; containerd's shims by PID (found by the
// socket in their command line) and containerd; whatever is still in the
// node's cgroups; the rest of the processes; the mounts under Dir; the files
// containerd and kubelet leave outside Dir; the kernel settings; the
// namespace.
func (c *Cluster) stopNode() error {
	n := c.node
	var errs []error
	c.stopProcs("kube-controller-manager", "kube-scheduler")
	if c.procRunning("kubelet") && c.procRunning("kube-apiserver") {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		if err := c.deleteAllPods(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stopping pods through kubelet: %w", err))
		}
		cancel()
	}
	c.stopProcs("kube-proxy", "coredns", "kubelet")
	shims := c.findShims()
	for _, s := range shims {
		_ = syscall.Kill(s.pid, syscall.SIGKILL)
	}
	c.stopProcs("containerd")
	waitGone(shims, 10*time.Second)
	errs = append(errs, killCgroups(n.cgroupRoot))
	for i := len(c.procs) - 1; i >= 0; i-- {
		errs = append(errs, c.procs[i].stop(10*time.Second))
	}
	errs = append(errs, unmountUnder(c.Dir))
	for _, s := range shims {
		// The socket name is containerd 1.6's: sha256 of address/namespace/id.
		sum := sha256.Sum256([]byte(filepath.Join(s.address, s.namespace, s.id)))
		_ = os.Remove(filepath.Join(shimSocketDir, hex.EncodeToString(sum[:])))
	}
	if files, _ := filepath.Glob(filepath.Join(cniCacheDir, n.cniNetwork+"-*")); len(files) > 0 {
		for _, f := range files {
			_ = os.Remove(f)
		}
	}
	if ents, err := os.ReadDir(containerLinks); err == nil {
		for _, e := range ents {
			p := filepath.Join(containerLinks, e.Name())
			if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, c.Dir+"/") {
				_ = os.Remove(p)
			}
		}
	}
	for k, v := range n.sysctls {
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restoring %s: %w", k, err))
		}
	}
	if n.netnsCreate {
		if err := ip(context.Background(), "netns", "del", n.netns); err != nil {
			errs = append(errs, err)
		}
	}
	for _, d := range createdOutside {
		if n.existed[d] {
			continue
		}
		if d == netnsRunDir {
			if ents, err := os.ReadDir(d); err == nil && len(ents) == 0 {
				_ = syscall.Unmount(d, syscall.MNT_DETACH)
			}
		}
		_ = os.Remove(d) // only when empty
	}
	errs = append(errs, c.leftovers())
	if n.sysctlFile != "" {
		_ = os.Remove(n.sysctlFile)
	}
	if n.lock != nil {
		n.lock.Close() // releases the flock
	}
	return errors.Join(errs...)
}

// leftovers reports anything of the node still on the machine.
func (c *Cluster) leftovers() error {
	n := c.node
	var left []string
	if _, err := os.Stat(filepath.Join(netnsRunDir, n.netns)); err == nil {
		left = append(left, "network namespace "+n.netns)
	}
	for _, p := range c.procs {
		if p.exited() == nil {
			left = append(left, fmt.Sprintf("process %s (pid %d)", p.name, p.Pid()))
		}
	}
	for _, s := range c.findShims() {
		left = append(left, fmt.Sprintf("containerd shim pid %d", s.pid))
	}
	for _, m := range cgroupMounts() {
		if _, err := os.Stat(filepath.Join(m, n.cgroupRoot)); err == nil {
			left = append(left, "cgroup "+filepath.Join(m, n.cgroupRoot))
		}
	}
	for _, m := range mountsUnder(c.Dir) {
		left = append(left, "mount "+m)
	}
	for k, v := range n.sysctls {
		if b, err := os.ReadFile("/proc/sys/" + k); err == nil && strings.TrimSpace(string(b)) != v {
			left = append(left, fmt.Sprintf("sysctl %s = %s (was %s)", k, strings.TrimSpace(string(b)), v))
		}
	}
	for d, before := range n.dirsBefore {
		for name := range listDir(d) {
			if before == nil || !before[name] {
				if d == "/run" && name == "netns" || d == "/run/netns" {
					// Another test's namespace can appear meanwhile; ours is checked above.
					continue
				}
				left = append(left, "new "+filepath.Join(d, name))
			}
		}
	}
	if len(left) > 0 {
		sort.Strings(left)
		return fmt.Errorf("teardown left behind: %s", strings.Join(left, "; "))
	}
	return nil
}

// deleteAllPods deletes every pod (1 s grace) and waits until kubelet has
// stopped them and the API server no longer lists any.
func (c *Cluster) deleteAllPods(ctx context.Context) error {
	type podList struct {
		Items []struct {
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		} `json:"items"`
	}
	var pods podList
	if err := c.do(ctx, http.MethodGet, "/api/v1/pods", nil, &pods); err != nil {
		return err
	}
	for _, p := range pods.Items {
		err := c.do(ctx, http.MethodDelete, "/api/v1/namespaces/"+p.Metadata.Namespace+"/pods/"+p.Metadata.Name,
			map[string]any{"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 1}, nil)
		if err != nil && !isStatus(err, http.StatusNotFound) {
			return err
		}
	}
	err := poll(ctx, 200*time.Millisecond, "pods stopped by kubelet", func(ctx context.Context) (bool, error) {
		var pods podList
		if err := c.do(ctx, http.MethodGet, "/api/v1/pods", nil, &pods); err != nil {
			return false, err
		}
		if len(pods.Items) > 0 {
			return false, fmt.Errorf("%d pods left, e.g. %s/%s", len(pods.Items), pods.Items[0].Metadata.Namespace,
				pods.Items[0].Metadata.Name)
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	// CNI DEL ran for every sandbox: host-local has released every address
	// (it keeps one file per allocated IP in its data directory).
	ipam := filepath.Join(c.Dir, "cni", "ipam", c.node.cniNetwork)
	return poll(ctx, 100*time.Millisecond, "CNI DEL of every pod", func(context.Context) (bool, error) {
		ips, _ := filepath.Glob(filepath.Join(ipam, "10.*"))
		if len(ips) > 0 {
			return false, fmt.Errorf("addresses still allocated in %s: %d", ipam, len(ips))
		}
		return true, nil
	})
}

func (c *Cluster) procRunning(name string) bool {
	for _, p := range c.procs {
		if p.name == name && p.exited() == nil {
			return true
		}
	}
	return false
}

// stopProcs kills the named processes and waits for them.
func (c *Cluster) stopProcs(names ...string) {
	for _, p := range c.procs {
		for _, name := range names {
			if p.name == name {
				_ = p.stop(10 * time.Second)
			}
		}
	}
}

type shim struct {
	pid                    int
	address, namespace, id string
}

// findShims returns the containerd shims serving this node's containerd:
// they outlive containerd by design and carry its socket in their command line.
func (c *Cluster) findShims() []shim {
	var out []shim
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !strings.Contains(string(b), "containerd-shim") {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		s := shim{pid: pid}
		for i := 0; i+1 < len(args); i++ {
			switch args[i] {
			case "-address":
				s.address = args[i+1]
			case "-namespace":
				s.namespace = args[i+1]
			case "-id":
				s.id = args[i+1]
			}
		}
		if s.address == c.node.sock {
			out = append(out, s)
		}
	}
	return out
}

func waitGone(shims []shim, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, s := range shims {
		for time.Now().Before(deadline) {
			if err := syscall.Kill(s.pid, 0); err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond) // polling a PID: no event to wait on
		}
	}
}

// cgroupMounts returns the mount points of every cgroup hierarchy.
func cgroupMounts() []string {
	var out []string
	for _, m := range readMountinfo() {
		if m.fstype == "cgroup" || m.fstype == "cgroup2" {
			out = append(out, m.point)
		}
	}
	return out
}

// killCgroups kills every process left in the node's cgroups (in every
// hierarchy) and removes the cgroups, innermost first.
func killCgroups(root string) error {
	var dirs []string
	for _, m := range cgroupMounts() {
		top := filepath.Join(m, root)
		_ = filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	sort.Slice(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
	deadline := time.Now().Add(15 * time.Second)
	var last error
	for _, d := range dirs {
		for {
			if b, err := os.ReadFile(filepath.Join(d, "cgroup.procs")); err == nil {
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil {
						_ = syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
			err := syscall.Rmdir(d)
			if err == nil || errors.Is(err, syscall.ENOENT) {
				break
			}
			if time.Now().After(deadline) {
				last = fmt.Errorf("removing cgroup %s: %w", d, err)
				break
			}
			time.Sleep(20 * time.Millisecond) // the kernel frees a cgroup after its last process is reaped
		}
	}
	return last
}

type mountEntry struct{ point, fstype string }

func readMountinfo() []mountEntry {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []mountEntry
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 10 {
			continue
		}
		e := mountEntry{point: unescapeMount(fields[4])}
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) {
				e.fstype = fields[i+1]
				break
			}
		}
		out = append(out, e)
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func mountsUnder(dir string) []string {
	var out []string
	for _, m := range readMountinfo() {
		if m.point == dir || strings.HasPrefix(m.point, dir+"/") {
			out = append(out, m.point)
		}
	}
	return out
}

// unmountUnder unmounts everything mounted under dir, innermost first (a
// lazy unmount for what stays busy), until nothing is left.
func unmountUnder(dir string) error {
	for round := 0; round < 10; round++ {
		ms := mountsUnder(dir)
		if len(ms) == 0 {
			return nil
		}
		sort.Slice(ms, func(i, j int) bool { return len(ms[i]) > len(ms[j]) })
		for _, m := range ms {
			if err := syscall.Unmount(m, 0); err != nil {
				_ = syscall.Unmount(m, syscall.MNT_DETACH)
			}
		}
	}
	if ms := mountsUnder(dir); len(ms) > 0 {
		return fmt.Errorf("still mounted: %s", strings.Join(ms, ", "))
	}
	return nil
}

// ProcessRSS returns the resident memory of each of the node's processes
// (and all of containerd's shims together as "containerd-shims"), in bytes.
func (c *Cluster) ProcessRSS() map[string]int64 {
	out := map[string]int64{}
	for _, p := range c.procs {
		if p.exited() == nil {
			out[p.name] += rss(p.Pid())
		}
	}
	if c.node != nil {
		for _, s := range c.findShims() {
			out["containerd-shims"] += rss(s.pid)
		}
	}
	return out
}

func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// PodsRSS returns the resident memory of every process of the given pods
// (by pod UID), found through the pods' cgroups.
func (c *Cluster) PodsRSS(uids []string) int64 {
	if c.node == nil {
		return 0
	}
	want := map[string]bool{}
	for _, u := range uids {
		want["pod"+u] = true
		want["pod"+strings.ReplaceAll(u, "-", "_")] = true
	}
	seen := map[int]bool{}
	var total int64
	for _, m := range cgroupMounts() {
		_ = filepath.WalkDir(filepath.Join(m, c.node.cgroupRoot), func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() || !want[d.Name()] {
				return nil
			}
			_ = filepath.WalkDir(p, func(q string, d os.DirEntry, err error) error {
				if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
					return nil
				}
				b, _ := os.ReadFile(q)
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil && !seen[pid] {
						seen[pid] = true
						total += rss(pid)
					}
				}
				return nil
			})
			return filepath.SkipDir
		})
	}
	return total
}

// sweepStale removes what a real node left behind when its test process
// died without Stop (Pdeathsig kills the cluster's processes, not
// containerd's shims, the containers, the namespace, mounts or cgroups).
// Called with the real-node lock held, so every spx-node-* namespace
// left is stale.
func (c *Cluster) sweepStale() {
	ents, _ := os.ReadDir(netnsRunDir)
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, "spx-node-") || name == c.node.netns {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(netnsRunDir, name), &st); err != nil {
			continue
		}
		c.log.Warn("removing a stale real node", "netns", name)
		// Its processes (shims, a surviving part) are in the namespace;
		// the shims name the old directory in their command line.
		want := fmt.Sprintf("net:[%d]", st.Ino)
		dirs := map[string]bool{}
		procs, _ := os.ReadDir("/proc")
		for _, p := range procs {
			pid, err := strconv.Atoi(p.Name())
			if err != nil {
				continue
			}
			if l, err := os.Readlink("/proc/" + p.Name() + "/ns/net"); err != nil || l != want {
				continue
			}
			if b, err := os.ReadFile("/proc/" + p.Name() + "/cmdline"); err == nil {
				args := strings.Split(string(b), "\x00")
				var sh shim
				for i := 0; i+1 < len(args); i++ {
					switch args[i] {
					case "-address":
						sh.address = args[i+1]
					case "-namespace":
						sh.namespace = args[i+1]
					case "-id":
						sh.id = args[i+1]
					}
				}
				if strings.HasSuffix(sh.address, "/containerd/containerd.sock") && sh.id != "" {
					dirs[filepath.Dir(filepath.Dir(sh.address))] = true
					sum := sha256.Sum256([]byte(filepath.Join(sh.address, sh.namespace, sh.id)))
					defer os.Remove(filepath.Join(shimSocketDir, hex.EncodeToString(sum[:])))
					// libcni's cache of the sandbox's two networks (the shim's id is the sandbox's).
					defer os.Remove(filepath.Join(cniCacheDir, "cni-loopback-"+sh.id+"-lo"))
					defer os.Remove(filepath.Join(cniCacheDir, name+"-"+sh.id+"-eth0"))
				}
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		_ = killCgroups("/" + name)
		for d := range dirs {
			_ = unmountUnder(d)
			if ents, err := os.ReadDir(containerLinks); err == nil {
				for _, e := range ents {
					p := filepath.Join(containerLinks, e.Name())
					if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, d+"/") {
						_ = os.Remove(p)
					}
				}
			}
		}
		if files, _ := filepath.Glob(filepath.Join(cniCacheDir, name+"-*")); len(files) > 0 {
			for _, f := range files {
				_ = os.Remove(f)
			}
		}
		_ = ip(context.Background(), "netns", "del", name)
	}
}
