package client_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/relaytest"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

func twoReplicas(c *server.Config) {
	c.Replicas = func() int { return 2 }
	c.DrainTimeout = 4 * time.Second
}

func agentConfig(t *testing.T, r *relaytest.Relay, lb *relaytest.LB, tunnels string) client.Config {
	return client.Config{
		RelayAddress: lb.Addr, RelayCAFile: r.CAFile(), ClusterUID: "two", TokenFile: r.IssueToken(t, "two"),
		AgentID: "agent-0", Mode: tunnel.Passthrough, APIServer: "https://127.0.0.1:1", Tunnels: tunnels,
		HealthAddr: "", DrainTimeout: 2 * time.Second, BackoffMax: 500 * time.Millisecond,
	}
}

// In auto, against a fleet of two, the agent holds one tunnel on each
// replica (a second tunnel that lands on the first's replica is closed).
// When the first tunnel's replica drains, its replacement lands on the
// second's replica before the old one closes; the second then gives way
// and comes back once a new replica is up. The agent never has zero
// tunnels on the way.
func TestTwoTunnelsOnDistinctReplicas(t *testing.T) {
	dir := t.TempDir()
	a := relaytest.StartRelay(t, dir, "relay-a", twoReplicas)
	b := relaytest.StartRelay(t, dir, "relay-b", twoReplicas)
	lb := relaytest.StartLB(t, a.Addr)
	agent := relaytest.StartAgent(t, agentConfig(t, a, lb, client.TunnelsAuto))
	require.Eventually(t, func() bool { return a.Srv.Tunnels() == 1 && agent.C.Tunnels() == 1 },
		10*time.Second, 5*time.Millisecond, "the first tunnel on a")
	// The second tunnel is not kept on the first's replica.
	assert.Never(t, func() bool { return agent.C.Tunnels() > 1 }, 300*time.Millisecond, 2*time.Millisecond)
	lb.SetBackends(b.Addr)
	require.Eventually(t, func() bool { return b.Srv.Tunnels() == 1 && agent.C.Tunnels() == 2 },
		10*time.Second, 5*time.Millisecond, "the second tunnel on b")

	least := relaytest.SampleMin(agent.C.Tunnels)
	require.NoError(t, a.Stop())
	require.Eventually(t, func() bool { return b.Srv.Tunnels() == 1 && agent.C.Tunnels() == 1 },
		10*time.Second, 5*time.Millisecond, "b holds the first tunnel, the second gave way")

	c := relaytest.StartRelay(t, dir, "relay-c", twoReplicas)
	lb.SetBackends(b.Addr, c.Addr)
	require.Eventually(t, func() bool { return b.Srv.Tunnels() == 1 && c.Srv.Tunnels() == 1 && agent.C.Tunnels() == 2 },
		15*time.Second, 5*time.Millisecond, "one tunnel on each replica again")
	assert.GreaterOrEqual(t, least(), 1, "a tunnel at every moment")
	agent.Stop() // before the relays: their drains need not wait for it
}

// In auto, a relay alone (it reports one replica) gets one tunnel; with
// --tunnels 2 it is asked for a second, which the agent closes since it
// lands on the same replica, and keeps trying.
func TestTunnelsAgainstOneRelay(t *testing.T) {
	tests := []struct {
		tunnels string
		want    int
	}{
		{client.TunnelsAuto, 1},
		{"1", 1},
		{"2", 1},
	}
	for _, tc := range tests {
		t.Run(tc.tunnels, func(t *testing.T) {
			r := relaytest.StartRelay(t, t.TempDir(), "only", nil)
			lb := relaytest.StartLB(t, r.Addr)
			agent := relaytest.StartAgent(t, agentConfig(t, r, lb, tc.tunnels))
			require.Eventually(t, func() bool { return agent.C.Tunnels() == 1 }, 10*time.Second, 5*time.Millisecond)
			// (The relay may hold a second tunnel for the moment it takes
			// the agent to close it.)
			assert.Never(t, func() bool { return agent.C.Tunnels() > tc.want },
				300*time.Millisecond, 5*time.Millisecond, "never more than %d tunnel(s) held", tc.want)
		})
	}
}

// A relay restarted in place keeps its name (a StatefulSet pod, a VM's
// hostname). While the old process drains, the agent's replacement lands
// on the new one under that name; it is another process (a draining relay
// refuses tunnels), so the agent keeps it: the old relay's drain ends as
// soon as the agent has moved, and the cluster has a tunnel throughout.
func TestMoveToAReplicaRestartedUnderItsName(t *testing.T) {
	const drain = 10 * time.Second
	dir := t.TempDir()
	old := relaytest.StartRelay(t, dir, "relay-0", func(c *server.Config) { c.DrainTimeout = drain })
	lb := relaytest.StartLB(t, old.Addr)
	agent := relaytest.StartAgent(t, agentConfig(t, old, lb, "1"))
	require.Eventually(t, func() bool { return old.Srv.Tunnels() == 1 && agent.C.Tunnels() == 1 },
		10*time.Second, 5*time.Millisecond, "the tunnel on the first process")

	least := relaytest.SampleMin(agent.C.Tunnels)
	successor := relaytest.StartRelay(t, dir, "relay-0", nil)
	lb.SetBackends(successor.Addr)
	began := time.Now()
	old.Terminate()
	require.NoError(t, old.Wait())
	assert.Less(t, time.Since(began), drain, "the old process's drain ended when the agent moved, not at its timeout")
	assert.Equal(t, 1, successor.Srv.Tunnels(), "the replacement is held by the process under the same name")
	assert.GreaterOrEqual(t, least(), 1, "a tunnel at every moment")
	assert.EqualValues(t, 2, agent.C.Connects(), "one registration on each process")
	agent.Stop()
}
