// Package testcluster runs a real Kubernetes control plane on 127.0.0.1 for
// end-to-end tests and local development: etcd, kube-apiserver and,
// optionally, kwok as a fake node that serves exec, logs and port-forward.
// It needs no *testing.T, so TestMain functions and dev commands can use it.
//
// The binaries come from hack/kube-bins.sh (`make kube-bins`), which builds
// them once per machine and caches them outside the repository. Start
// returns an error wrapping ErrBinariesMissing when they are not there.
//
// Every certificate is generated at start, every port is picked at start,
// and all state lives in Options.Dir (a temporary directory by default).
// Child processes are killed by Stop, and on Linux also by the kernel when
// the parent process dies.
package testcluster

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

const (
	// AdminUser is the user name of the admin client certificate and the
	// admin token; both carry the group system:masters.
	AdminUser = "admin"

	// DefaultNodeName is the name of the kwok node.
	DefaultNodeName = "kwok-node-0"

	serviceCIDR = "10.96.0.0/16"
	serviceIP   = "10.96.0.1" // first address of serviceCIDR: the kubernetes Service
	podCIDR     = "10.244.0.0/16"

	// kwokNodeAnnotation marks the nodes kwok manages.
	kwokNodeAnnotation = "kwok.x-k8s.io/node"

	// EnvBinDir overrides the default binary directory.
	EnvBinDir = "SPECTRO_PROXY_KUBE_BIN"
)

// ErrBinariesMissing is wrapped by the error Start returns when etcd,
// kube-apiserver, kwok or kwok's stage and CRD files are not in BinDir.
var ErrBinariesMissing = errors.New("control-plane binaries missing")

// Options configure Start. The zero value is usable.
type Options struct {
	// BinDir holds etcd, kube-apiserver and kwok, plus the kwok-stages and
	// kwok-crds directories, as hack/kube-bins.sh lays them out. Default:
	// $SPECTRO_PROXY_KUBE_BIN, else $SPECTRO_PROXY_CACHE/bin, else
	// $HOME/.cache/spectro-proxy/bin.
	BinDir string

	// Dir holds certificates, kubeconfigs, etcd data, pod log files and the
	// processes' logs (Dir/logs/*.log). When empty, Start makes a temporary
	// directory and Stop removes it. A given Dir is kept; its etcd data is
	// wiped at start.
	Dir string

	// ExtraSANs are added to the API server's serving certificate (DNS names,
	// or IP addresses), e.g. the name a proxy in front of it is reached by.
	ExtraSANs []string

	// Kwok starts kwok and registers one fake node (Cluster.NodeName) that
	// runs pods, exec, logs and port-forward. It needs kubectl.
	Kwok bool

	// RealNode runs a real node instead (node_linux.go): everything in a
	// network namespace the cluster creates (Cluster.Netns, no route out),
	// with the controllers, the scheduler, containerd, kubelet, kube-proxy
	// and CoreDNS, and the pause and busybox images imported. It needs
	// root, cgroups and the Debian packages .ci/run installs; see
	// CheckRealNode. Stop then tears down everything, outside Dir too.
	RealNode bool

	// NodeIP is the real node's address in its namespace. Default DefaultNodeIP.
	NodeIP string

	// Log receives the harness's progress and warnings (such as a process
	// that exits unexpectedly). Default: discard.
	Log *slog.Logger

	// Output, when set, also receives the processes' output, each line
	// prefixed with "[etcd] ", "[kube-apiserver] " or "[kwok] ". The log
	// files in Dir/logs are written either way.
	Output io.Writer

	// Kubectl is the kubectl binary. Default: "kubectl" from PATH, else
	// /usr/bin/kubectl.
	Kubectl string

	// StartTimeout bounds Start in addition to its context. Default 2 minutes.
	StartTimeout time.Duration
}

// Cluster is a running control plane. Its fields are read-only.
type Cluster struct {
	// URL is the API server's address, https://127.0.0.1:PORT.
	URL string
	// Port is the API server's port on 127.0.0.1.
	Port int

	// CAFile (and CAPEM, its contents) is the CA that signed every
	// certificate of the cluster, including the serving certificate.
	CAFile string
	CAPEM  []byte

	// AdminCertFile and AdminKeyFile are a client certificate for user
	// "admin" in group system:masters.
	AdminCertFile, AdminKeyFile string
	// AdminToken is a static bearer token for the same user.
	AdminToken string
	// AdminKubeconfig uses URL, CAFile and the admin client certificate.
	AdminKubeconfig string

	// NodeName is the kwok or real node's name, "" without a node.
	NodeName string
	// NodeIP and Netns are the real node's address and network namespace
	// (under /run/netns), "" without Options.RealNode. The API server (URL)
	// and everything else of a real node live in Netns: reach them through
	// DialContext, HTTPClient, Kubectl and NetnsCommand.
	NodeIP, Netns string
	// Figures are the real node's start and stop times (Stop's after Stop).
	Figures NodeFigures
	// KubeletPort is the kwok node's kubelet port on 127.0.0.1, 0 without kwok.
	KubeletPort int

	// Dir is the cluster's working directory; logs are in Dir/logs.
	Dir string

	opts       Options
	log        *slog.Logger
	kubectl    string
	pki        *pkiFiles
	ownDir     bool
	httpClient *http.Client
	node       *nodeState // RealNode only
	procs      []*process // in start order
	stopOnce   sync.Once
	stopErr    error
	mu         sync.Mutex                       // guards forwards
	forwards   map[string]map[int]forwardTarget // namespace/pod -> pod port -> target
}

// DefaultBinDir returns the binary directory used when Options.BinDir is empty.
func DefaultBinDir() string {
	if d := os.Getenv(EnvBinDir); d != "" {
		return d
	}
	if d := os.Getenv("SPECTRO_PROXY_CACHE"); d != "" {
		return filepath.Join(d, "bin")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "spectro-proxy", "bin")
	}
	return filepath.Join(home, ".cache", "spectro-proxy", "bin")
}

// CheckBinaries returns an error wrapping ErrBinariesMissing when binDir
// (DefaultBinDir if empty) lacks what Start needs, with or without kwok.
func CheckBinaries(binDir string, kwok bool) error {
	if binDir == "" {
		binDir = DefaultBinDir()
	}
	type entry struct {
		name string
		dir  bool
	}
	need := []entry{{"etcd", false}, {"kube-apiserver", false}}
	if kwok {
		need = append(need, entry{"kwok", false}, entry{"kwok-stages", true}, entry{"kwok-crds", true})
	}
	var missing []string
	for _, n := range need {
		st, err := os.Stat(filepath.Join(binDir, n.name))
		switch {
		case err != nil || st.IsDir() != n.dir:
			missing = append(missing, n.name)
		case !n.dir && st.Mode()&0o111 == 0:
			missing = append(missing, n.name+" (not executable)")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: %s not found in %s: run `make kube-bins` (hack/kube-bins.sh, about 12 minutes "+
			"the first time), or set %s to a directory holding them", ErrBinariesMissing,
			strings.Join(missing, ", "), binDir, EnvBinDir)
	}
	return nil
}

// Start starts etcd and kube-apiserver (and kwok with a Ready node when
// opts.Kwok is set) and returns once the API server's /readyz answers ok.
// On error everything started so far is stopped again.
func Start(ctx context.Context, opts Options) (_ *Cluster, err error) {
	started := time.Now()
	if opts.BinDir == "" {
		opts.BinDir = DefaultBinDir()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 2 * time.Minute
		if opts.RealNode {
			opts.StartTimeout = 4 * time.Minute
		}
	}
	if opts.Kwok && opts.RealNode {
		return nil, errors.New("testcluster: Options.Kwok and Options.RealNode are exclusive")
	}
	if err := CheckBinaries(opts.BinDir, opts.Kwok); err != nil {
		return nil, err
	}
	if opts.RealNode {
		if err := CheckRealNode(opts.BinDir); err != nil {
			return nil, err
		}
	}
	c := &Cluster{opts: opts, log: opts.Log, Dir: opts.Dir}
	if opts.RealNode {
		c.NodeName, c.NodeIP = DefaultRealNodeName, opts.NodeIP
		if c.NodeIP == "" {
			c.NodeIP = DefaultNodeIP
		}
	}
	if opts.Kwok {
		c.NodeName = DefaultNodeName
		if c.kubectl, err = findKubectl(opts.Kubectl); err != nil {
			return nil, err
		}
	} else if c.kubectl, err = findKubectl(opts.Kubectl); err != nil {
		c.kubectl = "" // Kubectl() reports it when called
	}
	if c.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "testcluster-"); err != nil {
			return nil, err
		}
		c.ownDir = true
	}
	if c.Dir, err = filepath.Abs(c.Dir); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("testcluster: %w (logs in %s)", err, filepath.Join(c.Dir, "logs"))
			_ = c.Stop()
		}
	}()
	if opts.RealNode {
		c.initNode()
	}
	for _, d := range []string{"logs", "kubeconfigs", "pod-logs", "kwok"} {
		if err := os.MkdirAll(filepath.Join(c.Dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	if err := os.RemoveAll(filepath.Join(c.Dir, "etcd")); err != nil {
		return nil, err
	}

	ctx, cancel := context.WithTimeout(ctx, opts.StartTimeout)
	defer cancel()

	tok := make([]byte, 16)
	_, _ = rand.Read(tok)
	c.AdminToken = hex.EncodeToString(tok)
	nodeName := c.NodeName
	if nodeName == "" {
		nodeName = DefaultNodeName
	}
	if c.pki, c.CAPEM, err = writePKI(filepath.Join(c.Dir, "pki"), opts.ExtraSANs, nodeName, c.NodeIP, c.AdminToken); err != nil {
		return nil, fmt.Errorf("writing certificates: %w", err)
	}
	c.CAFile, c.AdminCertFile, c.AdminKeyFile = c.pki.caCert, c.pki.adminCert, c.pki.adminKey
	if err := c.initHTTPClient(); err != nil {
		return nil, err
	}
	if opts.RealNode {
		if err := c.createNetns(ctx); err != nil {
			return nil, err
		}
	}

	etcdURL, err := c.startEtcd(ctx)
	if err != nil {
		return nil, err
	}
	if err := c.startAPIServer(ctx, etcdURL); err != nil {
		return nil, err
	}
	c.AdminKubeconfig = filepath.Join(c.Dir, "kubeconfigs", "admin.kubeconfig")
	if err := WriteKubeconfig(c.AdminKubeconfig, Kubeconfig{
		Server: c.URL, CAFile: c.CAFile, CertFile: c.AdminCertFile, KeyFile: c.AdminKeyFile, User: AdminUser,
	}); err != nil {
		return nil, err
	}
	c.log.Info("kube-apiserver ready", "url", c.URL, "elapsed", time.Since(started).Round(time.Millisecond))
	if opts.Kwok {
		if err := c.startKwok(ctx); err != nil {
			return nil, err
		}
		c.log.Info("kwok node ready", "node", c.NodeName, "elapsed", time.Since(started).Round(time.Millisecond))
	}
	if opts.RealNode {
		if err := c.startNode(ctx); err != nil {
			return nil, err
		}
		// From the node lock on: the time waiting for another node is not the start.
		c.Figures.Start, c.Figures.NodeReady = time.Since(c.node.startedAt), c.node.readyAt
		c.log.Info("real node ready", "node", c.NodeName, "elapsed", c.Figures.Start.Round(time.Millisecond))
	}
	return c, nil
}

// Stop kills the processes (kwok, kube-apiserver, etcd), waits for them to
// exit and removes Dir if Start created it. It is safe to call more than once.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		if c.node != nil {
			started := time.Now()
			errs = append(errs, c.stopNode())
			c.Figures.Stop = time.Since(started)
		}
		for i := len(c.procs) - 1; i >= 0; i-- {
			errs = append(errs, c.procs[i].stop(10*time.Second))
		}
		if c.httpClient != nil {
			c.httpClient.CloseIdleConnections()
		}
		if c.ownDir && c.Dir != "" {
			errs = append(errs, os.RemoveAll(c.Dir))
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// LogFile returns the path of a process's log: "etcd", "kube-apiserver" or "kwok".
func (c *Cluster) LogFile(process string) string {
	return filepath.Join(c.Dir, "logs", process+".log")
}

// HTTPClient returns a client that trusts the cluster CA and authenticates
// as the admin with its client certificate.
func (c *Cluster) HTTPClient() *http.Client { return c.httpClient }

// TLSConfig returns a new TLS client configuration that trusts the cluster
// CA and presents the admin client certificate.
func (c *Cluster) TLSConfig() (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(c.CAPEM) {
		return nil, errors.New("parsing cluster CA")
	}
	cert, err := tls.LoadX509KeyPair(c.AdminCertFile, c.AdminKeyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

func (c *Cluster) initHTTPClient() error {
	cfg, err := c.TLSConfig()
	if err != nil {
		return err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = cfg
	tr.DialContext = c.DialContext // into the real node's namespace, if any
	tr.ForceAttemptHTTP2 = true
	c.httpClient = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	return nil
}

// startEtcd starts etcd and waits for its /health; it returns the client URL.
func (c *Cluster) startEtcd(ctx context.Context) (string, error) {
	for attempt := 1; ; attempt++ {
		clientPort, err := c.port(nodeEtcdPort)
		if err != nil {
			return "", err
		}
		peerPort, err := c.port(nodeEtcdPeerPort)
		if err != nil {
			return "", err
		}
		clientURL := "http://127.0.0.1:" + itoa(clientPort)
		peerURL := "http://127.0.0.1:" + itoa(peerPort)
		p, err := c.start("etcd", etcdArgs("testcluster", filepath.Join(c.Dir, "etcd"), clientURL, peerURL))
		if err != nil {
			return "", err
		}
		err = waitEtcd(ctx, c.httpClient, p, clientURL)
		if err != nil && p.portInUse() && attempt < 3 {
			c.log.Warn("etcd port was taken, retrying", "attempt", attempt)
			c.dropLast()
			continue
		}
		return clientURL, err
	}
}

// startAPIServer starts kube-apiserver and waits for /readyz.
func (c *Cluster) startAPIServer(ctx context.Context, etcdURL string) error {
	for attempt := 1; ; attempt++ {
		port, err := c.port(nodeAPIServerPort)
		if err != nil {
			return err
		}
		bind, advertise, host := "127.0.0.1", "127.0.0.1", "127.0.0.1"
		if c.NodeIP != "" {
			// Pods reach it through the kubernetes Service, which the lease
			// endpoint reconciler points at the advertised node IP.
			bind, advertise, host = "0.0.0.0", c.NodeIP, c.NodeIP
		}
		args := []string{
			"--bind-address=" + bind,
			"--advertise-address=" + advertise,
			"--secure-port=" + itoa(port),
			"--cert-dir=" + filepath.Join(c.Dir, "pki", "generated"),
			"--etcd-servers=" + etcdURL,
			"--tls-cert-file=" + c.pki.apiserverCert,
			"--tls-private-key-file=" + c.pki.apiserverKey,
			"--client-ca-file=" + c.pki.caCert,
			"--token-auth-file=" + c.pki.tokenAuth,
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + c.pki.serviceAccountPub,
			"--service-account-signing-key-file=" + c.pki.serviceAccountKey,
			"--authorization-mode=Node,RBAC",
			"--anonymous-auth=false",
			"--service-cluster-ip-range=" + serviceCIDR,
			// No controller-manager: nothing would maintain the
			// kubernetes Service's endpoints or give namespaces a
			// default ServiceAccount (which the admission plugin requires).
			"--endpoint-reconciler-type=none",
			"--disable-admission-plugins=ServiceAccount",
			"--kubelet-client-certificate=" + c.pki.kubeletClientCert,
			"--kubelet-client-key=" + c.pki.kubeletClientKey,
			"--kubelet-certificate-authority=" + c.pki.caCert,
			"--kubelet-preferred-address-types=InternalIP",
			"--enable-priority-and-fairness=false",
			"--allow-privileged=true",
			"--profiling=false",
		}
		if c.NodeIP != "" {
			// Real pods need the controllers' defaults: endpoints for the
			// kubernetes Service, and the ServiceAccount admission plugin.
			args = slices.DeleteFunc(args, func(a string) bool {
				return a == "--endpoint-reconciler-type=none" || a == "--disable-admission-plugins=ServiceAccount"
			})
		}
		p, err := c.start("kube-apiserver", args)
		if err != nil {
			return err
		}
		c.Port = port
		c.URL = "https://" + host + ":" + itoa(port)
		err = poll(ctx, 100*time.Millisecond, "kube-apiserver /readyz", func(ctx context.Context) (bool, error) {
			if err := p.exited(); err != nil {
				return true, err
			}
			body, err := c.raw(ctx, http.MethodGet, "/readyz", nil)
			if err != nil {
				return false, err
			}
			return string(body) == "ok", nil
		})
		if err != nil && p.portInUse() && attempt < 3 {
			c.log.Warn("kube-apiserver port was taken, retrying", "attempt", attempt)
			c.dropLast()
			continue
		}
		return err
	}
}

// port returns def inside a real node's namespace, where nothing else
// listens, else a free port on 127.0.0.1.
func (c *Cluster) port(def int) (int, error) {
	if c.NodeIP != "" {
		return def, nil
	}
	return freePort()
}

// start starts one of the binaries with its log in Dir/logs/name.log.
func (c *Cluster) start(name string, args []string) (*process, error) {
	return c.startBin(name, filepath.Join(c.opts.BinDir, name), args)
}

// startBin starts bin, inside the real node's namespace if there is one.
func (c *Cluster) startBin(name, bin string, args []string) (*process, error) {
	env := childEnv()
	if ns := c.netnsPath(); ns != "" {
		args = append([]string{"--net=" + ns, "--", bin}, args...)
		bin, env = "nsenter", nodeEnv()
	}
	p, err := startProcess(name, bin, args, c.Dir, c.LogFile(name), c.opts.Output, c.log, env)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, p)
	return p, nil
}

// dropLast forgets the last started process (which has exited).
func (c *Cluster) dropLast() {
	c.procs[len(c.procs)-1].stop(time.Second)
	c.procs = c.procs[:len(c.procs)-1]
}

func findKubectl(path string) (string, error) {
	if path != "" {
		return path, nil
	}
	if p, err := exec.LookPath("kubectl"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/bin/kubectl"); err == nil {
		return "/usr/bin/kubectl", nil
	}
	return "", errors.New("kubectl not found in PATH or /usr/bin (set Options.Kubectl)")
}
