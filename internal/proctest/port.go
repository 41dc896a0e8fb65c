package proctest

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// A child process is given a port to listen on, and none of ours can
// report a port it picked itself, so the port is chosen before the child
// starts and something else can take it in between. Port 0's answer
// comes from the ephemeral range, the same range every outgoing
// connection of every test on the machine draws from, which is what took
// such ports in CI. FreeAddr draws from below that range instead, where
// only explicit binds land, and never gives a port twice in one process.

var given struct {
	sync.Mutex
	ports map[int]bool
}

// FreeAddr returns "127.0.0.1:port" for a port nothing listens on now,
// outside the kernel's ephemeral port range.
func FreeAddr() (string, error) {
	p, err := FreePort()
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)), nil
}

// FreePort is FreeAddr's port.
func FreePort() (int, error) {
	b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	lo, hi := quietRange(string(b))
	given.Lock()
	defer given.Unlock()
	if given.ports == nil {
		given.ports = map[int]bool{}
	}
	var last error
	for range 200 {
		p := lo + rand.IntN(hi-lo)
		if given.ports[p] {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			last = err
			continue
		}
		ln.Close()
		given.ports[p] = true
		return p, nil
	}
	return 0, fmt.Errorf("finding a free port in %d-%d: 200 tries taken, last: %w", lo, hi-1, last)
}

// quietRange is [lo, hi): the 10,000 ports below the ephemeral range
// that ip_local_port_range (the /proc file's text) starts (Linux's
// default: 32768), or 20000-29999 where that range is unknown or starts
// too low to leave room.
func quietRange(ipLocalPortRange string) (lo, hi int) {
	lo, hi = 20000, 30000
	f := strings.Fields(ipLocalPortRange)
	if len(f) != 2 {
		return lo, hi
	}
	start, err := strconv.Atoi(f[0])
	if err != nil || start < 11024 {
		return lo, hi
	}
	return start - 10000, start
}
