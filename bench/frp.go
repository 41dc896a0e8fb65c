package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/proctest"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
)

// ModeFRP is frp, the peer issue 12 compares against, set up as the issue
// measured it: frps's HTTPS vhost routing by SNI, frpc reaching the
// backend, TLS between them and one multiplexed (yamux) connection. The
// client's TLS ends at the backend, as in passthrough.
const ModeFRP = "frp"

// FRPVersion is the frp release measured. The issue measured v0.71; this
// is the release the Go module proxy serves here.
const FRPVersion = "v0.61.0"

// frpModule is frp's module path.
const frpModule = "github.com/fatedier/frp"

// frpHost is the name the client asks frps for (SNI), which frpc
// registers as its proxy's custom domain.
const frpHost = "frp." + Domain

// FRPBinaries are frps and frpc.
type FRPBinaries struct{ Server, Client string }

// BuildFRP builds frps and frpc of FRPVersion from the Go module proxy into
// dir/frp-<version> (by default testcluster.DefaultBinDir(), where the
// control plane's binaries are cached), unless they are there already.
func BuildFRP(ctx context.Context, dir string) (FRPBinaries, error) {
	if dir == "" {
		dir = testcluster.DefaultBinDir()
	}
	out := filepath.Join(dir, "frp-"+FRPVersion)
	bins := FRPBinaries{Server: filepath.Join(out, "frps"), Client: filepath.Join(out, "frpc")}
	if executable(bins.Server) && executable(bins.Client) {
		return bins, nil
	}
	// Outside any module (and workspace), so that this module's go.mod
	// neither resolves frp's dependencies nor is touched.
	tmp, err := os.MkdirTemp("", "frp-build-")
	if err != nil {
		return FRPBinaries{}, err
	}
	defer os.RemoveAll(tmp)
	env := append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	dl := exec.CommandContext(ctx, "go", "mod", "download", "-json", frpModule+"@"+FRPVersion)
	dl.Dir, dl.Env = tmp, env
	b, err := dl.Output()
	if err != nil {
		return FRPBinaries{}, fmt.Errorf("downloading %s@%s: %w: %s", frpModule, FRPVersion, err, stderrOf(err))
	}
	var mod struct{ Dir, Error string }
	if err := json.Unmarshal(b, &mod); err != nil {
		return FRPBinaries{}, fmt.Errorf("reading go mod download's answer for frp: %w", err)
	}
	if mod.Error != "" || mod.Dir == "" {
		return FRPBinaries{}, fmt.Errorf("downloading %s@%s: %s", frpModule, FRPVersion, mod.Error)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return FRPBinaries{}, err
	}
	for name, bin := range map[string]string{"./cmd/frps": bins.Server, "./cmd/frpc": bins.Client} {
		// Written under a temporary name: a build cut short must not
		// leave a binary the next run takes as built.
		build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", bin+".tmp", name)
		build.Dir, build.Env = mod.Dir, env
		if o, err := build.CombinedOutput(); err != nil {
			return FRPBinaries{}, fmt.Errorf("building frp's %s: %w: %s", name, err, o)
		}
		if err := os.Rename(bin+".tmp", bin); err != nil {
			return FRPBinaries{}, err
		}
	}
	return bins, nil
}

func executable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(ee.Stderr)
	}
	return ""
}

// frpPair is a running frps and frpc.
type frpPair struct {
	server, client *Proc
	target         Target
}

func (p frpPair) stop() {
	p.client.Stop(time.Second)
	p.server.Stop(time.Second)
}

// startFRP starts frps and frpc in front of be and waits until a request
// through them reaches it. be's certificate must name frpHost.
func startFRP(ctx context.Context, o Options, bins FRPBinaries, be *Backend) (frpPair, error) {
	dir, err := stateDir(o, "frp")
	if err != nil {
		return frpPair{}, err
	}
	ports := make([]int, 2)
	for i := range ports {
		if ports[i], err = proctest.FreePort(); err != nil {
			return frpPair{}, err
		}
	}
	bindPort, vhostPort := ports[0], ports[1]
	_, bePort, err := splitPort(be.Addr)
	if err != nil {
		return frpPair{}, err
	}
	// frp's defaults otherwise: TLS from frpc to frps and yamux over the
	// one connection (transport.tls.enable, transport.tcpMux), as the
	// issue measured.
	server := fmt.Sprintf(`bindAddr = "127.0.0.1"
bindPort = %d
vhostHTTPSPort = %d
proxyBindAddr = "127.0.0.1"
log.level = "warn"
`, bindPort, vhostPort)
	client := fmt.Sprintf(`serverAddr = "127.0.0.1"
serverPort = %d
loginFailExit = false
log.level = "warn"

[[proxies]]
name = "bench"
type = "https"
localIP = "127.0.0.1"
localPort = %d
customDomains = [%q]
`, bindPort, bePort, frpHost)
	files := map[string]string{"frps.toml": server, "frpc.toml": client}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600); err != nil {
			return frpPair{}, fmt.Errorf("writing frp's %s: %w", name, err)
		}
	}
	p := frpPair{target: Target{Name: ModeFRP, Addr: "127.0.0.1:" + strconv.Itoa(vhostPort), Host: frpHost, Roots: be.Roots}}
	if p.server, err = startProc("frps", bins.Server, nil, "-c", filepath.Join(dir, "frps.toml")); err != nil {
		return frpPair{}, err
	}
	if err := waitListening(ctx, "127.0.0.1:"+strconv.Itoa(bindPort), 30*time.Second); err != nil {
		p.server.Stop(time.Second)
		return frpPair{}, fmt.Errorf("frps: %w\n%s", err, p.server.Tail(20))
	}
	if p.client, err = startProc("frpc", bins.Client, nil, "-c", filepath.Join(dir, "frpc.toml")); err != nil {
		p.server.Stop(time.Second)
		return frpPair{}, err
	}
	// frps routes once frpc has logged in and registered its proxy: a GET
	// that reaches the backend says both.
	if err := p.target.WaitReady(ctx, 30*time.Second); err != nil {
		p.stop()
		return frpPair{}, fmt.Errorf("frp: %w\nfrps:\n%s\nfrpc:\n%s", err, p.server.Tail(20), p.client.Tail(20))
	}
	return p, nil
}

func splitPort(addr string) (string, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		return "", 0, fmt.Errorf("port of %q: %w", addr, err)
	}
	return host, n, nil
}

// waitListening polls until addr accepts a connection or timeout passes.
func waitListening(ctx context.Context, addr string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			return c.Close()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not listening within %v: %w", addr, timeout, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
