package testcluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The real node's network namespace: creating it and running or dialing inside it.

// netnsPath is the namespace's file ("" without a real node).
func (c *Cluster) netnsPath() string {
	if c.node == nil || c.node.netns == "" {
		return ""
	}
	return filepath.Join(netnsRunDir, c.node.netns)
}

// DialContext dials addr inside the real node's network namespace (where
// the API server, the node IP, port-forwards and the relay live), or
// normally without a real node. The socket is made on an OS thread that has
// entered the namespace; once connected it works from any thread.
func (c *Cluster) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	ns := c.netnsPath()
	if ns == "" {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	type result struct {
		conn net.Conn
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// Not unlocked when the way back fails: the thread then ends with
		// the goroutine instead of serving others in the wrong namespace.
		back, err := enterNetns(ns)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, err}
			return
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, addr)
		if back() == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{conn, err}
	}()
	r := <-ch
	return r.conn, r.err
}

// enterNetns moves the calling (locked) thread into the namespace at path
// and returns the function that moves it back.
func enterNetns(path string) (back func() error, err error) {
	orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", syscall.Gettid()))
	if err != nil {
		return nil, err
	}
	target, err := os.Open(path)
	if err != nil {
		orig.Close()
		return nil, err
	}
	defer target.Close()
	if err := setns(int(target.Fd())); err != nil {
		orig.Close()
		return nil, fmt.Errorf("entering %s: %w", path, err)
	}
	return func() error {
		defer orig.Close()
		return setns(int(orig.Fd()))
	}, nil
}

func setns(fd int) error {
	if _, _, e := syscall.RawSyscall(unix.SYS_SETNS, uintptr(fd), syscall.CLONE_NEWNET, 0); e != 0 {
		return e
	}
	return nil
}

// NetnsCommand returns a command that runs bin inside the node's network
// namespace (a plain command without a real node). Like the cluster's
// processes it dies with the parent process.
func (c *Cluster) NetnsCommand(ctx context.Context, bin string, args ...string) *exec.Cmd {
	var cmd *exec.Cmd
	if ns := c.netnsPath(); ns != "" {
		cmd = exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + ns, "--", bin}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, bin, args...)
	}
	cmd.Env = nodeEnv()
	cmd.SysProcAttr = sysProcAttr()
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// ip runs `ip args...` (on the host).
func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// createNetns makes the node's network namespace.
func (c *Cluster) createNetns(ctx context.Context) error {
	if err := c.lockNode(ctx); err != nil {
		return err
	}
	c.node.startedAt = time.Now() // the node's own times start with the lock
	c.sweepStale()
	if err := ip(ctx, "netns", "add", c.node.netns); err != nil {
		return err
	}
	c.node.netnsCreate = true
	for _, args := range [][]string{
		{"-n", c.node.netns, "link", "set", "lo", "up"},
		{"-n", c.node.netns, "addr", "add", c.NodeIP + "/32", "dev", "lo"},
		{"-n", c.node.netns, "route", "add", "blackhole", "default"},
	} {
		if err := ip(ctx, args...); err != nil {
			return err
		}
	}
	return nil
}
