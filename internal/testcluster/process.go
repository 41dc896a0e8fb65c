package testcluster

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// process is one child process (etcd, kube-apiserver, kwok) whose combined
// output goes to a log file.
type process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	logFile *os.File
	done    chan struct{} // closed when the process has exited
	err     error         // Wait's result, valid after done
	stopped bool          // set by stop, so an exit is not reported as a crash
	mu      sync.Mutex
}

// startProcess starts bin with args. Output is appended to logPath (and
// copied to out with a "[name] " prefix when out is not nil).
func startProcess(name, bin string, args []string, dir, logPath string, out io.Writer, log *slog.Logger, env []string) (*process, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(f, "\n=== %s %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = env
	var w io.Writer = f
	if out != nil {
		w = io.MultiWriter(f, &prefixWriter{w: out, prefix: "[" + name + "] "})
	}
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, logPath: logPath, cmd: cmd, logFile: f, done: make(chan struct{})}
	log.Debug("started process", "name", name, "pid", cmd.Process.Pid, "log", logPath)
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		stopped := p.stopped
		p.mu.Unlock()
		close(p.done)
		if !stopped {
			log.Warn("process exited unexpectedly", "name", name, "err", err, "log", logPath,
				"tail", tail(logPath, 20))
		}
	}()
	return p, nil
}

// exited reports whether the process has exited, and if so an error that
// describes the exit and ends with the tail of its log.
func (p *process) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited (%v); last lines of %s:\n%s", p.name, p.err, p.logPath, tail(p.logPath, 30))
	default:
		return nil
	}
}

// portInUse reports whether the process died because a port was taken
// between our picking it and the process binding it.
func (p *process) portInUse() bool {
	select {
	case <-p.done:
	default:
		return false
	}
	b, _ := os.ReadFile(p.logPath)
	return bytes.Contains(b, []byte("address already in use"))
}

// stop kills the process group (kwok's exec children die with it) and waits
// for the exit. None of the processes hold state worth a graceful shutdown:
// etcd's data is thrown away, and SIGTERM makes kube-apiserver drain for
// seconds.
func (p *process) stop(timeout time.Duration) error {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	select {
	case <-p.done:
		return nil // already reaped: its PID may belong to another process by now
	default:
	}
	killGroup(p.cmd.Process.Pid)
	select {
	case <-p.done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("%s (pid %d) did not exit within %v of SIGKILL", p.name, p.cmd.Process.Pid, timeout)
	}
}

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

// tail returns the last n lines of the file at path.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", path, err)
	}
	const maxBytes = 16 << 10
	if len(b) > maxBytes {
		b = b[len(b)-maxBytes:]
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// None of etcd, kube-apiserver and kwok can report a port they picked
// themselves or take over a listener, so the callers retry a start when
// the port was taken in between (see portInUse).
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func itoa(i int) string { return strconv.Itoa(i) }

// prefixWriter prefixes every line written through it.
type prefixWriter struct {
	mu      sync.Mutex
	w       io.Writer
	prefix  string
	midLine bool
}

func (pw *prefixWriter) Write(b []byte) (int, error) {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	var buf bytes.Buffer
	for _, line := range bytes.SplitAfter(b, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		if !pw.midLine {
			buf.WriteString(pw.prefix)
		}
		buf.Write(line)
		pw.midLine = line[len(line)-1] != '\n'
	}
	if _, err := pw.w.Write(buf.Bytes()); err != nil {
		return 0, err
	}
	return len(b), nil
}

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
