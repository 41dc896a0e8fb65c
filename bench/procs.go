package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/proctest"
)

// Binaries are the relay and agent executables under test.
type Binaries struct {
	Relay, Agent string
	// Forwarder is bench/cmd/tcp-forwarder, the floor, always built from
	// this tree: binaries of another tree given on the command line are
	// measured against the same floors.
	Forwarder string
}

// Build compiles the relay, the agent and the floor's forwarder from the
// module this package lives in into dir. Measuring the real binaries as
// separate processes keeps their CPU and memory apart from the load
// generator's.
func Build(ctx context.Context, dir string) (Binaries, error) {
	if err := goBuild(ctx, dir, "./server/cmd/spectro-proxy-server", "./client/cmd/spectro-proxy-client", "./bench/cmd/tcp-forwarder"); err != nil {
		return Binaries{}, fmt.Errorf("building relay and agent: %w", err)
	}
	return Binaries{Relay: filepath.Join(dir, "spectro-proxy-server"), Agent: filepath.Join(dir, "spectro-proxy-client"),
		Forwarder: filepath.Join(dir, "tcp-forwarder")}, nil
}

// BuildForwarder compiles only the floor's forwarder into dir, for
// relay and agent binaries given on the command line.
func BuildForwarder(ctx context.Context, dir string) (string, error) {
	if err := goBuild(ctx, dir, "./bench/cmd/tcp-forwarder"); err != nil {
		return "", fmt.Errorf("building the floor's forwarder: %w", err)
	}
	return filepath.Join(dir, "tcp-forwarder"), nil
}

// goBuild builds pkgs of this module into dir.
func goBuild(ctx context.Context, dir string, pkgs ...string) error {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("finding the module root: %w", err)
	}
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-o", dir + "/"}, pkgs...)...)
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(out)))
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	return nil
}

// StartForwarder starts a tcp-forwarder process to addr (with extra args)
// and returns it with the address it listens on.
func StartForwarder(ctx context.Context, bin, name, to string, args ...string) (*Proc, string, error) {
	return startListening(ctx, name, bin, "listening", append([]string{"--to", to}, args...)...)
}

// startListening starts bin and waits until it logs msg with the address
// it listens on.
func startListening(ctx context.Context, name, bin, msg string, args ...string) (*Proc, string, error) {
	addrc := make(chan string, 1)
	p, err := startProc(name, bin, func(line string) bool {
		if l := parseLog(line); l.Msg == msg {
			addrc <- l.Addr
			return true
		}
		return false
	}, args...)
	if err != nil {
		return nil, "", err
	}
	select {
	case addr := <-addrc:
		return p, addr, nil
	case <-p.Done():
		return nil, "", fmt.Errorf("%s exited before listening:\n%s", name, p.Tail(20))
	case <-time.After(30 * time.Second):
		p.Stop(time.Second)
		return nil, "", fmt.Errorf("%s did not listen within 30s:\n%s", name, p.Tail(20))
	case <-ctx.Done():
		p.Stop(time.Second)
		return nil, "", ctx.Err()
	}
}

// Proc is a child process (relay, agent, forwarder) whose output is kept
// in memory and read as it comes.
type Proc = proctest.Process

// startProc starts bin. Each output line goes to watch (when not nil)
// until watch returns true.
func startProc(name, bin string, watch func(line string) bool, args ...string) (*Proc, error) {
	return proctest.Start(proctest.Options{Name: name, Bin: bin, Args: args, Watch: watch})
}

// logLine is the part of the relay's and agent's JSON log lines we read.
type logLine struct {
	Msg  string `json:"msg"`
	Addr string `json:"addr"`
}

func parseLog(line string) logLine {
	var l logLine
	_ = json.Unmarshal([]byte(line), &l)
	return l
}
