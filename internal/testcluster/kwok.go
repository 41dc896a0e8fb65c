package testcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// kwokCRDs are the kwok kinds configured per pod at run time (--enable-crds).
// ClusterExec, which makes exec run commands on the host for every pod, is
// static and lives in kwok's --config file instead.
var kwokCRDs = []string{"execs", "logs", "portforwards"}

const kwokAPI = "/apis/kwok.x-k8s.io/v1alpha1"

// startKwok installs kwok's CRDs, registers the node, starts kwok and waits
// until the node is Ready and kwok's kubelet endpoint answers.
func (c *Cluster) startKwok(ctx context.Context) error {
	crdDir := filepath.Join(c.opts.BinDir, "kwok-crds")
	args := []string{"apply", "--server-side", "--force-conflicts"}
	for _, k := range kwokCRDs {
		args = append(args, "-f", filepath.Join(crdDir, "kwok.x-k8s.io_"+k+".yaml"))
	}
	if _, err := c.Kubectl(ctx, "", args...); err != nil {
		return fmt.Errorf("installing kwok CRDs: %w", err)
	}
	for _, k := range kwokCRDs {
		path := "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/" + k + ".kwok.x-k8s.io"
		err := poll(ctx, 50*time.Millisecond, "CRD "+k+" Established", func(ctx context.Context) (bool, error) {
			var crd struct {
				Status struct {
					Conditions []condition `json:"conditions"`
				} `json:"status"`
			}
			if err := c.do(ctx, http.MethodGet, path, nil, &crd); err != nil {
				return false, err
			}
			return conditionTrue(crd.Status.Conditions, "Established"), nil
		})
		if err != nil {
			return err
		}
	}

	config, err := c.writeKwokConfig()
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(c.Dir, "kubeconfigs", "kwok.kubeconfig")
	if err := WriteKubeconfig(kubeconfig, Kubeconfig{Server: c.URL, CAFile: c.pki.caCert,
		CertFile: c.pki.kwokClientCert, KeyFile: c.pki.kwokClientKey, User: "kwok-controller"}); err != nil {
		return err
	}
	if err := c.create(ctx, "/api/v1/nodes", map[string]any{
		"apiVersion": "v1", "kind": "Node",
		"metadata": map[string]any{
			"name":        c.NodeName,
			"annotations": map[string]any{kwokNodeAnnotation: "fake"},
			"labels": map[string]any{
				"kubernetes.io/hostname": c.NodeName, "kubernetes.io/os": "linux",
				"kubernetes.io/arch": "amd64", "type": "kwok",
			},
		},
	}); err != nil {
		return fmt.Errorf("creating node: %w", err)
	}

	for attempt := 1; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return err
		}
		p, err := c.start("kwok", []string{
			"--kubeconfig=" + kubeconfig,
			"--config=" + config,
			"--manage-nodes-with-annotation-selector=" + kwokNodeAnnotation + "=fake",
			"--node-ip=127.0.0.1",
			"--node-port=" + itoa(port),
			"--server-address=127.0.0.1:" + itoa(port),
			"--tls-cert-file=" + c.pki.kwokServingCert,
			"--tls-private-key-file=" + c.pki.kwokServingKey,
			"--cidr=" + podCIDR,
			"--enable-crds=Exec,Logs,PortForward",
		})
		if err != nil {
			return err
		}
		c.KubeletPort = port
		err = c.waitKwok(ctx, p, port)
		if err != nil && (p.portInUse() || p.raceAtStart()) && attempt < 3 {
			c.log.Warn("kwok died starting, retrying", "attempt", attempt, "error", err)
			c.dropLast()
			continue
		}
		return err
	}
}

func (c *Cluster) waitKwok(ctx context.Context, p *process, port int) error {
	err := poll(ctx, 100*time.Millisecond, "node "+c.NodeName+" Ready", func(ctx context.Context) (bool, error) {
		if err := p.exited(); err != nil {
			return true, err
		}
		var node struct {
			Status struct {
				Conditions      []condition `json:"conditions"`
				DaemonEndpoints struct {
					KubeletEndpoint struct {
						Port int `json:"Port"`
					} `json:"kubeletEndpoint"`
				} `json:"daemonEndpoints"`
			} `json:"status"`
		}
		if err := c.do(ctx, http.MethodGet, "/api/v1/nodes/"+c.NodeName, nil, &node); err != nil {
			return false, err
		}
		if !conditionTrue(node.Status.Conditions, "Ready") || node.Status.DaemonEndpoints.KubeletEndpoint.Port != port {
			return false, errors.New("node not Ready yet")
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	// The node turns Ready before kwok's kubelet endpoint listens.
	healthz := "https://127.0.0.1:" + itoa(port) + "/healthz"
	return poll(ctx, 50*time.Millisecond, "kwok "+healthz, func(ctx context.Context) (bool, error) {
		if err := p.exited(); err != nil {
			return true, err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, healthz, nil)
		resp, err := c.httpClient.Do(req)
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return false, fmt.Errorf("%s: %s", healthz, resp.Status)
		}
		return true, nil
	})
}

// writeKwokConfig concatenates kwok's stages (copied by hack/kube-bins.sh)
// and a ClusterExec that runs exec'd commands on the host, in Dir.
func (c *Cluster) writeKwokConfig() (string, error) {
	stageDir := filepath.Join(c.opts.BinDir, "kwok-stages")
	files, err := filepath.Glob(filepath.Join(stageDir, "*.yaml"))
	if err != nil {
		return "", err
	}
	sort.Strings(files)
	var b bytes.Buffer
	var nodeStages, podStages int
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		if !bytes.Contains(data, []byte("\nkind: Stage\n")) {
			continue // not a stage (such as a kustomization.yaml)
		}
		switch {
		case bytes.Contains(data, []byte("\n    kind: Node\n")):
			nodeStages++
		case bytes.Contains(data, []byte("\n    kind: Pod\n")):
			podStages++
		}
		b.WriteString("---\n")
		b.Write(bytes.TrimSpace(data))
		b.WriteString("\n")
	}
	if nodeStages == 0 || podStages == 0 {
		return "", fmt.Errorf("%w: %s has %d node and %d pod kwok stages, needs both: run `make kube-bins`",
			ErrBinariesMissing, stageDir, nodeStages, podStages)
	}
	workDir, _ := json.Marshal(c.Dir)
	fmt.Fprintf(&b, `---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterExec
metadata:
  name: testcluster-host
spec:
  execs:
  - local:
      workDir: %s
`, workDir)
	path := filepath.Join(c.Dir, "kwok", "kwok.yaml")
	return path, os.WriteFile(path, b.Bytes(), 0o600)
}

// apply creates or replaces a kwok object with server-side apply.
func (c *Cluster) apply(ctx context.Context, namespace, resource, name string, obj map[string]any) error {
	path := kwokAPI + "/namespaces/" + url.PathEscape(namespace) + "/" + resource + "/" + url.PathEscape(name) +
		"?fieldManager=testcluster&force=true"
	body, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPatch, c.URL+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/apply-patch+yaml") // JSON is YAML
	resp, err := c.httpClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return &APIError{Method: http.MethodPatch, Path: path, StatusCode: resp.StatusCode, Body: string(b)}
	}
	return nil
}

// PodLog is the log file kwok serves as the output of every container of one
// pod, for `kubectl logs` and `kubectl logs -f`.
type PodLog struct {
	// Path is the file, in CRI log format.
	Path string
	mu   sync.Mutex
}

// PodLog makes kwok serve a new, empty file as the logs of the pod's
// containers (following it for `logs -f`) and returns it. It returns once
// the API server serves the pod's logs from that file. Calling it again
// for the same pod starts a new, empty file.
func (c *Cluster) PodLog(ctx context.Context, namespace, pod string) (*PodLog, error) {
	var p struct {
		Spec struct {
			Containers []struct {
				Name string `json:"name"`
			} `json:"containers"`
		} `json:"spec"`
	}
	podPath := "/api/v1/namespaces/" + url.PathEscape(namespace) + "/pods/" + url.PathEscape(pod)
	if err := c.do(ctx, http.MethodGet, podPath, nil, &p); err != nil {
		return nil, err
	}
	if len(p.Spec.Containers) == 0 {
		return nil, fmt.Errorf("pod %s/%s has no containers", namespace, pod)
	}
	f, err := os.CreateTemp(filepath.Join(c.Dir, "pod-logs"), namespace+"_"+pod+"_*.log")
	if err != nil {
		return nil, err
	}
	f.Close()
	l := &PodLog{Path: f.Name()}
	if err := c.apply(ctx, namespace, "logs", pod, map[string]any{
		"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs",
		"metadata": map[string]any{"name": pod, "namespace": namespace},
		"spec":     map[string]any{"logs": []any{map[string]any{"logsFile": l.Path, "follow": true}}},
	}); err != nil {
		return nil, err
	}
	// Wait until kwok has picked up the new file: its content differs from
	// the old one's by a marker line that is then removed.
	marker := "testcluster-sync-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := l.Append(marker); err != nil {
		return nil, err
	}
	logPath := podPath + "/log?container=" + url.QueryEscape(p.Spec.Containers[0].Name)
	err = poll(ctx, 50*time.Millisecond, "kwok to serve "+l.Path, func(ctx context.Context) (bool, error) {
		b, err := c.raw(ctx, http.MethodGet, logPath, nil)
		if err != nil {
			return false, err
		}
		return strings.Contains(string(b), marker), nil
	})
	if err != nil {
		return nil, err
	}
	return l, os.Truncate(l.Path, 0)
}

// Append writes lines to the pod's stdout.
func (l *PodLog) Append(lines ...string) error { return l.write("stdout", lines) }

// AppendStderr writes lines to the pod's stderr.
func (l *PodLog) AppendStderr(lines ...string) error { return l.write("stderr", lines) }

func (l *PodLog) write(stream string, lines []string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, line := range lines {
		for _, part := range strings.Split(strings.TrimSuffix(line, "\n"), "\n") {
			// CRI format: <RFC3339Nano time> <stream> <F(ull)|P(artial)> <text>
			fmt.Fprintf(&b, "%s %s F %s\n", time.Now().UTC().Format(time.RFC3339Nano), stream, part)
		}
	}
	f, err := os.OpenFile(l.Path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(b.String()); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// PortForward makes `kubectl port-forward` to port podPort of the pod reach
// target, a host:port on this machine (such as a 127.0.0.1 listener of the
// test). Forwards of a pod accumulate; the same podPort again replaces its
// target. kwok watches the rule: it is in effect within moments, not
// necessarily before PortForward returns.
func (c *Cluster) PortForward(ctx context.Context, namespace, pod string, podPort int, target string) error {
	host, portStr, err := net.SplitHostPort(target)
	if err != nil {
		return fmt.Errorf("port-forward target: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("port-forward target %q: %w", target, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.forwards == nil {
		c.forwards = map[string]map[int]forwardTarget{}
	}
	key := namespace + "/" + pod
	if c.forwards[key] == nil {
		c.forwards[key] = map[int]forwardTarget{}
	}
	c.forwards[key][podPort] = forwardTarget{host, port}
	var ports []int
	for p := range c.forwards[key] {
		ports = append(ports, p)
	}
	sort.Ints(ports)
	var fw []any
	for _, p := range ports {
		t := c.forwards[key][p]
		fw = append(fw, map[string]any{"ports": []int{p}, "target": map[string]any{"address": t.address, "port": t.port}})
	}
	return c.apply(ctx, namespace, "portforwards", pod, map[string]any{
		"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward",
		"metadata": map[string]any{"name": pod, "namespace": namespace},
		"spec":     map[string]any{"forwards": fw},
	})
}

type forwardTarget struct {
	address string
	port    int
}
