// Package proctest runs the child processes of tests and benchmarks: the
// relay and agent binaries, etcd, kube-apiserver, kwok and kubectl. A
// Process keeps its output (in a log file, or in memory), can be watched
// line by line as it runs, dies with the test binary on Linux, and ends
// with SIGTERM and a grace or at once with SIGKILL.
package proctest

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Options say what to run and where its output goes.
type Options struct {
	// Name names the process in errors, warnings and Output's prefix.
	// Default: Bin's base name.
	Name string
	Bin  string
	Args []string
	Dir  string
	// Env is the child's whole environment. Default (nil): the parent's.
	Env []string
	// LogFile, when set, receives stdout and stderr, appended after a
	// header line with the command. Without it the output is kept in
	// memory (its last MiB).
	LogFile string
	// Output, when set, receives every output line too, prefixed with
	// "[Name] ".
	Output io.Writer
	// Watch, when set, is called with each output line (without its
	// newline) until it returns true.
	Watch func(line string) bool
	// Log, when set, is warned when the process exits before Stop.
	Log *slog.Logger
	// Group starts the process in a process group of its own, and Stop
	// signals the whole group (so that kwok's exec children die with it).
	Group bool
}

// killWait is how long Stop waits for an exit after SIGKILL.
const killWait = 10 * time.Second

// memMax bounds the output a Process without LogFile keeps.
const memMax = 1 << 20

// Process is a started child process.
type Process struct {
	name    string
	logFile string
	group   bool
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited

	mu      sync.Mutex
	mem     []byte // output, without LogFile
	err     error  // Wait's result, valid after done
	stopped bool   // set by Stop, so that an exit is not reported as a crash
}

// Start starts o.Bin with o.Args.
func Start(o Options) (*Process, error) {
	if o.Name == "" {
		o.Name = filepath.Base(o.Bin)
	}
	p := &Process{name: o.Name, logFile: o.LogFile, group: o.Group, done: make(chan struct{})}
	var ws []io.Writer
	var f *os.File
	if o.LogFile != "" {
		var err error
		if f, err = os.OpenFile(o.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
			return nil, err
		}
		fmt.Fprintf(f, "\n=== %s %s %s\n", time.Now().Format(time.RFC3339Nano), o.Bin, strings.Join(o.Args, " "))
		ws = append(ws, f)
	} else {
		ws = append(ws, memWriter{p})
	}
	if o.Output != nil {
		ws = append(ws, &prefixWriter{w: o.Output, prefix: "[" + o.Name + "] "})
	}
	var lw *lineWriter
	if o.Watch != nil {
		lw = &lineWriter{watch: o.Watch}
		ws = append(ws, lw)
	}
	cmd := exec.Command(o.Bin, o.Args...)
	cmd.Dir = o.Dir
	cmd.Env = o.Env
	// One writer for both: then exec copies both through one pipe (or
	// none, for the log file alone), from one goroutine.
	w := io.MultiWriter(ws...)
	if len(ws) == 1 {
		w = ws[0]
	}
	cmd.Stdout, cmd.Stderr = w, w
	// Children that inherit the output must not keep Wait waiting.
	cmd.WaitDelay = 5 * time.Second
	cmd.SysProcAttr = sysProcAttr(o.Group)
	if err := cmd.Start(); err != nil {
		if f != nil {
			f.Close()
		}
		return nil, fmt.Errorf("starting %s: %w", o.Name, err)
	}
	p.cmd = cmd
	if o.Log != nil {
		o.Log.Debug("started process", "name", o.Name, "pid", cmd.Process.Pid, "log", o.LogFile)
	}
	go func() {
		err := cmd.Wait()
		if f != nil {
			f.Close()
		}
		if lw != nil {
			lw.flush()
		}
		p.mu.Lock()
		p.err = err
		stopped := p.stopped
		p.mu.Unlock()
		close(p.done)
		if !stopped && o.Log != nil {
			o.Log.Warn("process exited unexpectedly", "name", o.Name, "err", err, "log", o.LogFile,
				"tail", p.Tail(20))
		}
	}()
	return p, nil
}

// Name is Options.Name.
func (p *Process) Name() string { return p.name }

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the exit's error (nil for status 0), once Done is closed.
func (p *Process) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Exited reports whether the process has exited, and if so returns an
// error that describes the exit and ends with the last lines of output.
func (p *Process) Exited() error {
	select {
	case <-p.done:
	default:
		return nil
	}
	where := "output"
	if p.logFile != "" {
		where = p.logFile
	}
	return fmt.Errorf("%s exited (%v); last lines of %s:\n%s", p.name, p.Err(), where, p.Tail(30))
}

// Output is everything the process wrote to stdout and stderr so far (the
// last MiB without LogFile).
func (p *Process) Output() string {
	if p.logFile != "" {
		b, err := os.ReadFile(p.logFile)
		if err != nil {
			return fmt.Sprintf("(reading %s: %v)", p.logFile, err)
		}
		return string(b)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return string(p.mem)
}

// Tail returns the last n lines of output.
func (p *Process) Tail(n int) string {
	if p.logFile != "" {
		return tail(p.logFile, n)
	}
	return lastLines(p.Output(), n)
}

// Signal sends sig to the process (not its group).
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Stop ends the process: SIGTERM and up to grace for it to exit, then
// Kill (at once when grace is 0). With Options.Group both signals go to the
// whole process group. Stop returns an error when a grace passed without
// an exit, or the process outlived SIGKILL by 10s. Stopping a process
// that has exited does nothing: its PID may belong to another by now.
func (p *Process) Stop(grace time.Duration) error {
	p.setStopped()
	select {
	case <-p.done:
		return nil
	default:
	}
	if grace > 0 {
		p.signal(syscall.SIGTERM)
		select {
		case <-p.done:
			return nil
		case <-time.After(grace):
		}
	}
	if err := p.Kill(killWait); err != nil || grace == 0 {
		return err
	}
	return fmt.Errorf("%s (pid %d) did not exit within %v of SIGTERM", p.name, p.Pid(), grace)
}

// Kill sends SIGKILL (to the process group with Options.Group) and waits
// up to wait for the exit. Like Stop it does nothing once the process has
// exited.
func (p *Process) Kill(wait time.Duration) error {
	p.setStopped()
	select {
	case <-p.done:
		return nil
	default:
	}
	p.signal(syscall.SIGKILL)
	select {
	case <-p.done:
		return nil
	case <-time.After(wait):
		return fmt.Errorf("%s (pid %d) did not exit within %v of SIGKILL", p.name, p.Pid(), wait)
	}
}

func (p *Process) setStopped() {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
}

func (p *Process) signal(sig syscall.Signal) {
	if p.group {
		signalGroup(p.Pid(), sig)
	}
	_ = p.cmd.Process.Signal(sig)
}

// Run runs cmd and returns its stdout. On failure the error names the
// command, wraps Run's error (an *exec.ExitError for a non-zero exit) and
// ends with stderr.
func Run(cmd *exec.Cmd) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err,
			strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// memWriter keeps a Process's output in memory.
type memWriter struct{ p *Process }

func (m memWriter) Write(b []byte) (int, error) {
	m.p.mu.Lock()
	defer m.p.mu.Unlock()
	m.p.mem = append(m.p.mem, b...)
	if len(m.p.mem) > memMax {
		m.p.mem = append([]byte(nil), m.p.mem[len(m.p.mem)-memMax/2:]...)
	}
	return len(b), nil
}

// lineWriter calls watch with each complete line until it returns true.
type lineWriter struct {
	watch   func(string) bool
	partial []byte
}

func (lw *lineWriter) Write(b []byte) (int, error) {
	if lw.watch == nil {
		return len(b), nil
	}
	lw.partial = append(lw.partial, b...)
	for lw.watch != nil {
		i := bytes.IndexByte(lw.partial, '\n')
		if i < 0 {
			break
		}
		line := string(lw.partial[:i])
		lw.partial = lw.partial[i+1:]
		if lw.watch(line) {
			lw.watch = nil
		}
	}
	if lw.watch == nil {
		lw.partial = nil
	}
	return len(b), nil
}

// flush passes on a last line without a newline.
func (lw *lineWriter) flush() {
	if lw.watch != nil && len(lw.partial) > 0 {
		lw.watch(string(lw.partial))
	}
	lw.watch, lw.partial = nil, nil
}

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
	return lastLines(string(b), n)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Buffer collects output that goroutines or a running command write while
// the test reads it: a bytes.Buffer behind a mutex.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
