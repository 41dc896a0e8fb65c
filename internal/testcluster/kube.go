package testcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	api "k8s.io/client-go/tools/clientcmd/api"

	"github.com/spectroproxy/spectro-proxy/internal/kubeconfig"
	"github.com/spectroproxy/spectro-proxy/internal/proctest"
)

// APIError is a non-2xx answer of the API server.
type APIError struct {
	Method, Path string
	StatusCode   int
	Body         string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s %s: %d %s: %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode),
		strings.TrimSpace(e.Body))
}

func isStatus(err error, code int) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.StatusCode == code
}

// raw sends a request as the admin and returns the body of a 2xx answer.
func (c *Cluster) raw(ctx context.Context, method, path string, body any) ([]byte, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.URL+path, r)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.httpClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		return nil, &APIError{Method: method, Path: path, StatusCode: resp.StatusCode, Body: string(b)}
	}
	return b, nil
}

// do is raw with a JSON-decoded answer (out may be nil).
func (c *Cluster) do(ctx context.Context, method, path string, body, out any) error {
	b, err := c.raw(ctx, method, path, body)
	if err != nil || out == nil {
		return err
	}
	return json.Unmarshal(b, out)
}

// create POSTs obj to path; an existing object is not an error.
func (c *Cluster) create(ctx context.Context, path string, obj any) error {
	err := c.do(ctx, http.MethodPost, path, obj, nil)
	if isStatus(err, http.StatusConflict) {
		return nil
	}
	return err
}

// Kubeconfig describes a kubeconfig file with one cluster, user and context.
type Kubeconfig struct {
	Server        string // e.g. Cluster.URL, or a proxy's https://127.0.0.1:PORT
	TLSServerName string // optional: SNI and name to verify, when Server is an address
	CAFile        string // CA to verify the server with
	CertFile      string // client certificate (with KeyFile), or
	KeyFile       string
	Token         string // a bearer token
	User          string // name of the user entry; default "user"
}

// WriteKubeconfig writes kc to path (mode 0600), with the product's writer.
func WriteKubeconfig(path string, kc Kubeconfig) error {
	const name = "testcluster"
	if kc.User == "" {
		kc.User = "user"
	}
	cl := api.NewCluster()
	cl.Server, cl.TLSServerName, cl.CertificateAuthority = kc.Server, kc.TLSServerName, kc.CAFile
	user := api.NewAuthInfo()
	user.ClientCertificate, user.ClientKey, user.Token = kc.CertFile, kc.KeyFile, kc.Token
	cfg := api.NewConfig()
	cfg.Clusters[name] = cl
	cfg.AuthInfos[kc.User] = user
	cfg.Contexts[name] = &api.Context{Cluster: name, AuthInfo: kc.User}
	cfg.CurrentContext = name
	b, err := kubeconfig.Write(cfg)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// TokenKubeconfig writes Dir/kubeconfigs/<name>.kubeconfig that reaches the
// API server directly with a bearer token, and returns its path.
func (c *Cluster) TokenKubeconfig(name, token string) (string, error) {
	path := filepath.Join(c.Dir, "kubeconfigs", name+".kubeconfig")
	return path, WriteKubeconfig(path, Kubeconfig{Server: c.URL, CAFile: c.CAFile, Token: token, User: name})
}

// KubectlCmd returns a kubectl command using kubeconfig (AdminKubeconfig
// when ""), for streaming uses such as `logs -f` and `port-forward`. Like
// the cluster's processes it dies with the parent process on Linux.
func (c *Cluster) KubectlCmd(ctx context.Context, kubeconfig string, args ...string) *exec.Cmd {
	if kubeconfig == "" {
		kubeconfig = c.AdminKubeconfig
	}
	bin := c.kubectl
	if bin == "" {
		bin = "kubectl"
	}
	args = append([]string{"--kubeconfig=" + kubeconfig}, args...)
	if ns := c.netnsPath(); ns != "" {
		// The API server, and port-forward's listeners, are in the node's namespace.
		args = append([]string{"--net=" + ns, "--", bin}, args...)
		bin = "nsenter"
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	// Keep kubectl's discovery cache out of $HOME/.kube.
	cmd.Env = append(childEnv(), "KUBECACHEDIR="+filepath.Join(c.Dir, "kubectl-cache"))
	cmd.SysProcAttr = sysProcAttr()
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Kubectl runs kubectl with kubeconfig (AdminKubeconfig when "") and returns
// its stdout. On failure the error holds the exit status and stderr.
func (c *Cluster) Kubectl(ctx context.Context, kubeconfig string, args ...string) (string, error) {
	return proctest.Run(c.KubectlCmd(ctx, kubeconfig, args...))
}

// EnsureNamespace creates the namespace unless it exists.
func (c *Cluster) EnsureNamespace(ctx context.Context, name string) error {
	return c.create(ctx, "/api/v1/namespaces", map[string]any{
		"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": name},
	})
}

// ServiceAccountToken creates the namespace and service account if missing
// (there is no controller-manager to do it) and returns a token from the
// TokenRequest API, valid for ttl (0: the API server's default of one hour;
// the API server's minimum is ten minutes). The account has no permissions
// beyond those of every authenticated user; see BindClusterRole.
func (c *Cluster) ServiceAccountToken(ctx context.Context, namespace, name string, ttl time.Duration) (string, error) {
	if err := c.EnsureNamespace(ctx, namespace); err != nil {
		return "", err
	}
	base := "/api/v1/namespaces/" + url.PathEscape(namespace) + "/serviceaccounts"
	if err := c.create(ctx, base, map[string]any{
		"apiVersion": "v1", "kind": "ServiceAccount", "metadata": map[string]any{"name": name},
	}); err != nil {
		return "", err
	}
	spec := map[string]any{}
	if ttl > 0 {
		spec["expirationSeconds"] = int64(ttl / time.Second)
	}
	var tr struct {
		Status struct {
			Token string `json:"token"`
		} `json:"status"`
	}
	err := c.do(ctx, http.MethodPost, base+"/"+url.PathEscape(name)+"/token", map[string]any{
		"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec,
	}, &tr)
	if err != nil {
		return "", err
	}
	return tr.Status.Token, nil
}

// BindClusterRole binds the ClusterRole (e.g. "cluster-admin") to the
// service account cluster-wide. RBAC takes effect within moments, not
// necessarily before BindClusterRole returns.
func (c *Cluster) BindClusterRole(ctx context.Context, namespace, serviceAccount, clusterRole string) error {
	return c.create(ctx, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", map[string]any{
		"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
		"metadata": map[string]any{"name": "testcluster:" + namespace + ":" + serviceAccount + ":" + clusterRole},
		"roleRef":  map[string]any{"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": clusterRole},
		"subjects": []any{map[string]any{"kind": "ServiceAccount", "name": serviceAccount, "namespace": namespace}},
	})
}

// RunPod creates a pod on the kwok node with the given containers (one
// named "main" when none are given) and waits until it is Running and
// Ready. Images are never pulled; kwok only pretends. Requires Options.Kwok.
func (c *Cluster) RunPod(ctx context.Context, namespace, name string, containers ...string) error {
	if c.NodeName == "" {
		return errors.New("RunPod needs a cluster started with Options.Kwok")
	}
	if len(containers) == 0 {
		containers = []string{"main"}
	}
	if err := c.EnsureNamespace(ctx, namespace); err != nil {
		return err
	}
	var cs []any
	for _, n := range containers {
		cs = append(cs, map[string]any{"name": n, "image": "testcluster.invalid/" + n})
	}
	path := "/api/v1/namespaces/" + url.PathEscape(namespace) + "/pods"
	err := c.do(ctx, http.MethodPost, path, map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": name},
		"spec": map[string]any{
			"nodeName":                      c.NodeName, // no scheduler here
			"containers":                    cs,
			"terminationGracePeriodSeconds": 0,
		},
	}, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return poll(ctx, 100*time.Millisecond, "pod "+namespace+"/"+name+" Ready", func(ctx context.Context) (bool, error) {
		var pod struct {
			Status struct {
				Phase      string      `json:"phase"`
				Conditions []condition `json:"conditions"`
			} `json:"status"`
		}
		if err := c.do(ctx, http.MethodGet, path+"/"+url.PathEscape(name), nil, &pod); err != nil {
			return false, err
		}
		if pod.Status.Phase == "Running" && conditionTrue(pod.Status.Conditions, "Ready") {
			return true, nil
		}
		return false, fmt.Errorf("pod phase %q", pod.Status.Phase)
	})
}

type condition struct {
	Type   string `json:"type"`
	Status string `json:"status"`
}

func conditionTrue(cs []condition, typ string) bool {
	for _, c := range cs {
		if c.Type == typ {
			return c.Status == "True"
		}
	}
	return false
}
