package proctest

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func sh(t *testing.T, o Options, script string) *Process {
	t.Helper()
	o.Bin, o.Args = "/bin/sh", []string{"-c", script}
	p, err := Start(o)
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Stop(0) })
	return p
}

func TestOutputInMemoryAndWatch(t *testing.T) {
	var seen []string
	found := make(chan string, 1)
	p := sh(t, Options{Name: "talker", Watch: func(line string) bool {
		seen = append(seen, line)
		if strings.HasPrefix(line, "addr ") {
			found <- strings.TrimPrefix(line, "addr ")
			return true
		}
		return false
	}}, `echo one; echo two >&2; echo addr 127.0.0.1:9; echo after; exit 3`)
	select {
	case addr := <-found:
		assert.Equal(t, "127.0.0.1:9", addr)
	case <-time.After(10 * time.Second):
		t.Fatal("no addr line")
	}
	<-p.Done()
	assert.Equal(t, []string{"one", "two", "addr 127.0.0.1:9"}, seen, "watch stops once it returns true")
	assert.Equal(t, "one\ntwo\naddr 127.0.0.1:9\nafter\n", p.Output())
	assert.Equal(t, "addr 127.0.0.1:9\nafter", p.Tail(2))
	var ee *exec.ExitError
	require.ErrorAs(t, p.Err(), &ee)
	assert.Equal(t, 3, ee.ExitCode())
	err := p.Exited()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "talker exited (exit status 3); last lines of output:\n")
	assert.NoError(t, p.Stop(time.Second), "stopping an exited process does nothing")
}

func TestLogFileAndPrefixedOutput(t *testing.T) {
	log := filepath.Join(t.TempDir(), "p.log")
	// Read after Done: exec's copying has ended by then.
	var out bytes.Buffer
	p := sh(t, Options{Name: "p", LogFile: log, Output: &out}, `printf 'a\nb'; sleep 0.1; echo c`)
	<-p.Done()
	assert.NoError(t, p.Err())
	assert.Equal(t, "[p] a\n[p] bc\n", out.String())
	assert.Contains(t, p.Output(), "=== ")
	assert.True(t, strings.HasSuffix(p.Output(), "\na\nbc\n"), "%q", p.Output())
	assert.Equal(t, "a\nbc", p.Tail(2))
}

func TestStop(t *testing.T) {
	t.Run("SIGTERM within the grace", func(t *testing.T) {
		p := sh(t, Options{}, `trap 'exit 0' TERM; while :; do sleep 0.05; done`)
		require.Nil(t, p.Exited())
		time.Sleep(100 * time.Millisecond) // the trap is set
		assert.NoError(t, p.Stop(10*time.Second))
		assert.Error(t, p.Exited())
	})
	t.Run("SIGKILL after the grace", func(t *testing.T) {
		p := sh(t, Options{}, `trap '' TERM; while :; do sleep 0.05; done`)
		time.Sleep(100 * time.Millisecond)
		err := p.Stop(200 * time.Millisecond)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "did not exit within 200ms of SIGTERM")
		<-p.Done()
	})
	t.Run("group", func(t *testing.T) {
		// The child sleeps on in the group after sh is gone, holding the
		// output pipe: Stop(0) kills both.
		p := sh(t, Options{Group: true}, `sleep 60 & echo started; wait`)
		require.Eventually(t, func() bool { return strings.Contains(p.Output(), "started") }, 10*time.Second, 10*time.Millisecond)
		start := time.Now()
		assert.NoError(t, p.Stop(0))
		assert.Less(t, time.Since(start), 4*time.Second, "the sleeping child died too, so the pipe closed")
		assert.ErrorContains(t, p.Err(), "signal: killed")
	})
	t.Run("signal", func(t *testing.T) {
		p := sh(t, Options{}, `trap 'exit 7' TERM; while :; do sleep 0.05; done`)
		time.Sleep(100 * time.Millisecond)
		require.NoError(t, p.Signal(syscall.SIGTERM))
		<-p.Done()
		assert.ErrorContains(t, p.Err(), "exit status 7")
	})
}

func TestRun(t *testing.T) {
	out, err := Run(exec.Command("/bin/sh", "-c", "echo out; echo err >&2"))
	assert.NoError(t, err)
	assert.Equal(t, "out\n", out)
	out, err = Run(exec.Command("/bin/sh", "-c", "echo partial; echo oops >&2; exit 2"))
	assert.Equal(t, "partial\n", out)
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, "/bin/sh -c echo partial; echo oops >&2; exit 2: exit status 2: oops", err.Error())
}

// FreeAddr's ports are listenable, outside the ephemeral range that
// outgoing connections draw from, and never repeat in one process.
func TestFreeAddr(t *testing.T) {
	b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	lo, hi := quietRange(string(b))
	seen := map[string]bool{}
	for range 50 {
		a, err := FreeAddr()
		require.NoError(t, err)
		require.False(t, seen[a], "%s given twice", a)
		seen[a] = true
		_, port, err := net.SplitHostPort(a)
		require.NoError(t, err)
		p, err := strconv.Atoi(port)
		require.NoError(t, err)
		assert.True(t, p >= lo && p < hi, "%d outside [%d, %d)", p, lo, hi)
		ln, err := net.Listen("tcp", a)
		require.NoError(t, err, "listening on the port given")
		ln.Close()
	}
}

func TestQuietRange(t *testing.T) {
	for _, tc := range []struct {
		file   string
		lo, hi int
	}{
		{"32768\t60999\n", 22768, 32768},
		{"40000 65000", 30000, 40000},
		{"", 20000, 30000},
		{"1024 65535", 20000, 30000},
		{"junk", 20000, 30000},
	} {
		lo, hi := quietRange(tc.file)
		assert.Equal(t, [2]int{tc.lo, tc.hi}, [2]int{lo, hi}, "%q", tc.file)
	}
}
