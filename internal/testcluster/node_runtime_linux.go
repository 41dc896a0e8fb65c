package testcluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

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
