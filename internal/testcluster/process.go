package testcluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/proctest"
)

// process is one child process (etcd, kube-apiserver, kwok) whose combined
// output goes to a log file.
type process struct {
	*proctest.Process
	name string
}

// startProcess starts bin with args and env. Output is appended to logPath
// (and copied to out with a "[name] " prefix when out is not nil).
func startProcess(name, bin string, args []string, dir, logPath string, out io.Writer, log *slog.Logger, env []string) (*process, error) {
	p, err := proctest.Start(proctest.Options{Name: name, Bin: bin, Args: args, Dir: dir, Env: env,
		LogFile: logPath, Output: out, Log: log, Group: true})
	if err != nil {
		return nil, err
	}
	return &process{p, name}, nil
}

// exited reports whether the process has exited, and if so an error that
// describes the exit and ends with the tail of its log.
func (p *process) exited() error { return p.Exited() }

// portInUse reports whether the process died because a port was taken
// between our picking it and the process binding it.
func (p *process) portInUse() bool {
	return p.Exited() != nil && strings.Contains(p.Output(), "address already in use")
}

// raceAtStart reports whether the process died of a Go map written from
// two goroutines. kwok v0.8.0 does, now and then, as it starts: its CEL
// environments are built concurrently and share easycel's unguarded type
// cache (typeValueMap in easycel v0.6.0's types.go); CI hit it once. A
// second start is a fresh roll of the dice.
func (p *process) raceAtStart() bool {
	return p.Exited() != nil && strings.Contains(p.Output(), "concurrent map")
}

// stop kills the process group (kwok's exec children die with it) and waits
// for the exit. None of the processes hold state worth a graceful shutdown:
// etcd's data is thrown away, and SIGTERM makes kube-apiserver drain for
// seconds.
func (p *process) stop(timeout time.Duration) error { return p.Kill(timeout) }

// sysProcAttr is what proctest sets for a process in its own group, for
// the commands testcluster runs itself (kubectl).
func sysProcAttr() *syscall.SysProcAttr { return proctest.SysProcAttr() }

// childEnv is the parent's environment without variables that would change
// the children's behaviour: etcd reads every ETCD_* variable as a flag, and
// KUBECONFIG must not redirect kubectl or kwok.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "ETCD_") || strings.HasPrefix(kv, "KUBECONFIG=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// None of etcd, kube-apiserver and kwok can report a port they picked
// themselves or take over a listener, so the callers retry a start when
// the port was taken in between (see portInUse).
func freePort() (int, error) { return proctest.FreePort() }

func itoa(i int) string { return strconv.Itoa(i) }

// poll calls check every interval until it returns done, an error, or ctx
// ends. It returns check's last error (or ctx's) on timeout.
func poll(ctx context.Context, interval time.Duration, what string, check func(context.Context) (done bool, err error)) error {
	var last error
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		done, err := check(ctx)
		if done {
			return err
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("waiting for %s: %w (last error: %v)", what, ctx.Err(), last)
			}
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-t.C:
		}
	}
}
