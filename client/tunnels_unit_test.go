package client

import (
	"net"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// The tunnel count drives readiness and spectro_proxy_agent_tunnels; a
// first tunnel landing on the second's replica asks the second to yield.
func TestTunnelCount(t *testing.T) {
	c := newStreamClient(t, tunnel.Passthrough)
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	second := &liveTunnel{conn: c2, replica: "r1"}
	first := &liveTunnel{conn: c1, replica: "r1"}
	assert.False(t, c.Ready())
	c.tunnelUp(1, second)
	c.tunnelUp(0, first)
	assert.Equal(t, 2, c.Tunnels())
	assert.Equal(t, float64(2), testutilGauge(c.metrics.tunnels))
	assert.True(t, c.Ready())
	select {
	case <-c.tunnels.yield:
	default:
		t.Fatal("the second tunnel was not asked to yield its replica")
	}
	c.tunnelDown(1, second)
	c.tunnelDown(0, first)
	assert.Equal(t, 0, c.Tunnels())
	assert.Equal(t, float64(0), testutilGauge(c.metrics.tunnels))
	assert.Equal(t, float64(0), testutilGauge(c.metrics.tunnelUp))
	assert.False(t, c.Ready())
	assert.Equal(t, "", c.replicaOf(0))
}
