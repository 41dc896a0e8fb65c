package testcluster

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

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
