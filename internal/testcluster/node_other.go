//go:build !linux

package testcluster

import (
	"context"
	"errors"
	"net"
	"os/exec"
	"time"
)

// ErrRealNodeUnsupported is wrapped by the error CheckRealNode (and Start
// with Options.RealNode) returns when this machine cannot run a real node.
var ErrRealNodeUnsupported = errors.New("real node not possible here")

const (
	DefaultNodeIP       = "10.200.0.2"
	DefaultRealNodeName = "spx-node-0"
	nodeEtcdPort        = 2379
	nodeEtcdPeerPort    = 2380
	nodeAPIServerPort   = 6443
)

type nodeState struct {
	readyAt   time.Duration
	startedAt time.Time
}

// NodeFigures are a real node's start and stop times.
type NodeFigures struct{ Start, NodeReady, Stop time.Duration }

// CheckRealNode reports that a real node needs Linux.
func CheckRealNode(string) error {
	return errors.Join(ErrRealNodeUnsupported, errors.New("a real node needs Linux"))
}

func (c *Cluster) initNode()                                 {}
func (c *Cluster) createNetns(context.Context) error         { return CheckRealNode("") }
func (c *Cluster) startNode(context.Context) error           { return CheckRealNode("") }
func (c *Cluster) stopNode() error                           { return nil }
func (c *Cluster) netnsPath() string                         { return "" }
func nodeEnv() []string                                      { return childEnv() }
func (c *Cluster) ProcessRSS() map[string]int64              { return nil }
func (c *Cluster) ImportImage(context.Context, string) error { return CheckRealNode("") }

// DialContext dials addr.
func (c *Cluster) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// NetnsCommand returns a plain command.
func (c *Cluster) NetnsCommand(ctx context.Context, bin string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, bin, args...)
}

// WaitServiceAccount is for a real node only.
func (c *Cluster) WaitServiceAccount(context.Context, string) error { return CheckRealNode("") }

// PodsRSS is for a real node only.
func (c *Cluster) PodsRSS([]string) int64 { return 0 }
