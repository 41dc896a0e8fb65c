package testcluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

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
