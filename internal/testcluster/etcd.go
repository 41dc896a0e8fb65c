package testcluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Etcd is a lone etcd member for tests on their own (the relay's registry,
// its fleet tests): the real binary from the cached bin directory, plain
// http on 127.0.0.1. Unlike the one inside a Cluster it can be stopped and
// started again on the same data and ports, to play an etcd outage.
type Etcd struct {
	bin        string
	dataDir    string
	logFile    string
	clientPort int
	peerPort   int
	log        *slog.Logger
	http       *http.Client

	mu sync.Mutex
	p  *process // nil while stopped
}

// etcdStopGrace is how long Stop lets etcd exit on SIGTERM before SIGKILL.
const etcdStopGrace = 10 * time.Second

// StartEtcd starts etcd with its data in dir/etcd-data and its log in
// dir/etcd.log, and returns once it answers /health. The binary is etcd in
// DefaultBinDir (ErrBinariesMissing when absent).
func StartEtcd(ctx context.Context, dir string, log *slog.Logger) (*Etcd, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	bin := filepath.Join(DefaultBinDir(), "etcd")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("%w: %s: %v (set %s)", ErrBinariesMissing, bin, err, EnvBinDir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating etcd directory: %w", err)
	}
	e := &Etcd{
		bin:     bin,
		dataDir: filepath.Join(dir, "etcd-data"),
		logFile: filepath.Join(dir, "etcd.log"),
		log:     log,
		http:    &http.Client{Timeout: 5 * time.Second},
	}
	// The ports are picked here and kept for restarts; a port taken between
	// the pick and etcd's bind only costs another pick on this first start.
	for attempt := 1; ; attempt++ {
		var err error
		if e.clientPort, err = freePort(); err != nil {
			return nil, fmt.Errorf("picking etcd client port: %w", err)
		}
		if e.peerPort, err = freePort(); err != nil {
			return nil, fmt.Errorf("picking etcd peer port: %w", err)
		}
		err = e.Start(ctx)
		if err == nil {
			return e, nil
		}
		retry := e.p != nil && e.p.portInUse() && attempt < 3
		e.kill()
		if !retry {
			return nil, err
		}
		// The data directory records the peer URL: start afresh.
		if err := os.RemoveAll(e.dataDir); err != nil {
			return nil, fmt.Errorf("removing etcd data after a failed start: %w", err)
		}
		log.Warn("etcd port was taken, retrying", "attempt", attempt)
	}
}

// Endpoint is the client URL, "http://127.0.0.1:N"; it stays the same
// across Stop and Start.
func (e *Etcd) Endpoint() string { return "http://127.0.0.1:" + itoa(e.clientPort) }

// Start starts etcd again after Stop, on the same data directory and ports,
// and waits for /health. Starting a running etcd does nothing.
func (e *Etcd) Start(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.p != nil && e.p.exited() == nil {
		return nil
	}
	clientURL := e.Endpoint()
	peerURL := "http://127.0.0.1:" + itoa(e.peerPort)
	p, err := startProcess("etcd", e.bin, etcdArgs("etcd", e.dataDir, clientURL, peerURL),
		filepath.Dir(e.dataDir), e.logFile, nil, e.log, childEnv())
	if err != nil {
		return err
	}
	e.p = p
	return waitEtcd(ctx, e.http, p, clientURL)
}

// Stop ends etcd with SIGTERM (SIGKILL after 10s) and keeps its data, so
// that Start resumes it: clients see an outage, not a new cluster.
func (e *Etcd) Stop() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.p == nil {
		return nil
	}
	err := e.p.Process.Stop(etcdStopGrace)
	e.p = nil
	if err != nil {
		return fmt.Errorf("stopping etcd: %w", err)
	}
	return nil
}

// Close stops etcd and removes its data directory (the log stays).
func (e *Etcd) Close() {
	if err := e.Stop(); err != nil {
		e.log.Warn("closing etcd", "err", err)
		e.kill()
	}
	if err := os.RemoveAll(e.dataDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		e.log.Warn("removing etcd data", "err", err)
	}
}

// kill ends etcd at once, for a start that failed.
func (e *Etcd) kill() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.p != nil {
		_ = e.p.stop(etcdStopGrace)
		e.p = nil
	}
}

// etcdArgs are a single-member test etcd's flags.
func etcdArgs(name, dataDir, clientURL, peerURL string) []string {
	return []string{
		"--name=" + name,
		"--data-dir=" + dataDir,
		"--listen-client-urls=" + clientURL,
		"--advertise-client-urls=" + clientURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=" + name + "=" + peerURL,
		"--unsafe-no-fsync", // test data: durability is not worth the fsyncs
		"--log-level=warn",
	}
}

// waitEtcd polls etcd's /health until it says true, or p exits.
func waitEtcd(ctx context.Context, hc *http.Client, p *process, clientURL string) error {
	return poll(ctx, 50*time.Millisecond, "etcd /health", func(ctx context.Context) (bool, error) {
		if err := p.exited(); err != nil {
			return true, err
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, clientURL+"/health", nil)
		if err != nil {
			return true, err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return false, err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && strings.Contains(string(body), `"true"`) {
			return true, nil
		}
		return false, fmt.Errorf("etcd /health: %s: %s", resp.Status, body)
	})
}
