package registry

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestViewMemory bounds what the view costs per tunnel of the fleet: every
// replica holds every tunnel's entry (the budget is 32 KiB of RSS
// per idle tunnel, registry included).
func TestViewMemory(t *testing.T) {
	const n = 10000
	e := &Etcd{cfg: EtcdConfig{Prefix: DefaultPrefix, Self: Replica{ID: "relay-0"}}, log: slog.New(slog.DiscardHandler)}
	type kv struct {
		key []byte // as etcd's answer has it: the view copies what it keeps
		val []byte
	}
	kvs := make([]kv, n)
	for i := range kvs {
		tu := Tunnel{ClusterUID: fmt.Sprintf("6f1c2a4e-8d3b-4c5f-9e7a-%012d", i), AgentID: fmt.Sprintf("spectro-proxy-client-7d9f8b6c5-%05d", i), Mode: "passthrough"}
		val, err := json.Marshal(tu)
		require.NoError(t, err)
		kvs[i] = kv{fmt.Appendf(nil, "%stunnels/cluster-%d-api/relay-%d/%s/%s", DefaultPrefix, i, i%3, tu.ClusterUID, tu.AgentID), val}
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	v := newView()
	for _, kv := range kvs {
		e.applyOne(&v, true, string(kv.key), kv.val)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	require.Len(t, v.tunnels, n)
	per := (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / n
	t.Logf("view: %.0f bytes of heap per tunnel (%d tunnels: %.1f MiB)", per, n, per*n/(1<<20))
	require.Less(t, per, 512.0)
	runtime.KeepAlive(v)
	runtime.KeepAlive(kvs)
}
