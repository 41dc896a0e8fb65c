package server

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no domain", Config{StateDir: "x"}, "domain is required"},
		{"bad domain", Config{Domain: "Proxy_Example.com", StateDir: "x"}, "lower-case"},
		{"cert without key", Config{Domain: "proxy.example.com", TLSCertFile: "c", SigningKeyFile: "k"}, "go together"},
		{"no certificate", Config{Domain: "proxy.example.com", SigningKeyFile: "k"}, "state-dir is required"},
		{"no signing key", Config{Domain: "proxy.example.com", TLSCertFile: "c", TLSKeyFile: "k"}, "signing-key-file is required"},
		{"etcd without a peer listener", Config{Domain: "proxy.example.com", StateDir: "x", EtcdEndpoints: []string{"http://etcd:2379"}}, "peer-listen is required with etcd-endpoints"},
		{"peer listener nobody can dial", Config{Domain: "proxy.example.com", StateDir: "x", PeerListen: ":8444"}, "peer-advertise is required"},
		{"peer listener without a CA", Config{Domain: "proxy.example.com", TLSCertFile: "c", TLSKeyFile: "k", SigningKeyFile: "s", PeerListen: "10.0.0.1:8444"}, "peer-ca-file and peer-ca-key-file are required"},
		{"peer CA without its key", Config{Domain: "proxy.example.com", StateDir: "x", PeerListen: "10.0.0.1:8444", PeerCAFile: "ca"}, "peer-ca-file and peer-ca-key-file go together"},
		{"advertise without a listener", Config{Domain: "proxy.example.com", StateDir: "x", PeerAdvertise: "10.0.0.1:8444"}, "peer-advertise needs peer-listen"},
		{"etcd TLS without etcd", Config{Domain: "proxy.example.com", StateDir: "x", EtcdCAFile: "ca"}, "need etcd-endpoints"},
		{"etcd cert without its key", Config{Domain: "proxy.example.com", StateDir: "x", EtcdEndpoints: []string{"https://etcd:2379"}, PeerListen: "10.0.0.1:8444", EtcdCertFile: "c"}, "etcd-cert-file and etcd-key-file go together"},
		{"lease too short", Config{Domain: "proxy.example.com", StateDir: "x", LeaseTTL: time.Second}, "lease-ttl must be at least 2s"},
	}
	t.Setenv("POD_IP", "") // the peer-advertise default reads it
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorContains(t, tc.cfg.Validate(), tc.want)
		})
	}
}

func TestStateDirIsCreatedOnceAndKept(t *testing.T) {
	dir := t.TempDir()
	s, err := New(Config{Domain: "proxy.test", StateDir: dir})
	require.NoError(t, err)
	_ = s
	first := map[string][]byte{}
	for _, f := range []string{"ca.crt", "ca.key", "tls.crt", "tls.key", "signing.key"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		require.NoError(t, err, f)
		first[f] = b
	}
	_, err = New(Config{Domain: "proxy.test", StateDir: dir})
	require.NoError(t, err)
	for f, b := range first {
		again, err := os.ReadFile(filepath.Join(dir, f))
		require.NoError(t, err)
		assert.Equal(t, b, again, "%s must survive a restart: agents and kubeconfigs trust it", f)
	}
}

// The fleet's defaults come from the pod (downward API) when there is one.
func TestFleetDefaults(t *testing.T) {
	tests := []struct {
		name                  string
		podName, podIP        string
		cfg                   Config
		wantID, wantAdvertise string
	}{
		{name: "pod", podName: "relay-0", podIP: "10.1.2.3", cfg: Config{PeerListen: ":8444"}, wantID: "relay-0", wantAdvertise: "10.1.2.3:8444"},
		{name: "pod IPv6", podName: "relay-0", podIP: "fd00::7", cfg: Config{PeerListen: ":8444"}, wantID: "relay-0", wantAdvertise: "[fd00::7]:8444"},
		{name: "listener with a host", cfg: Config{PeerListen: "10.0.0.5:8444"}, wantAdvertise: "10.0.0.5:8444"},
		{name: "listener on every address", cfg: Config{PeerListen: "0.0.0.0:8444"}, wantAdvertise: ""},
		{name: "given", podIP: "10.1.2.3", cfg: Config{ReplicaID: "mine", PeerListen: ":8444", PeerAdvertise: "relay.internal:9000"},
			wantID: "mine", wantAdvertise: "relay.internal:9000"},
		{name: "no peer listener", podIP: "10.1.2.3", wantAdvertise: ""},
	}
	host, _ := os.Hostname()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("POD_NAME", tc.podName)
			t.Setenv("POD_IP", tc.podIP)
			tc.cfg.StateDir = "/state"
			c := tc.cfg.withDefaults()
			want := tc.wantID
			if want == "" {
				want = host
			}
			assert.Equal(t, want, c.ReplicaID)
			assert.Equal(t, tc.wantAdvertise, c.PeerAdvertise)
			assert.Equal(t, "/state/ca.crt", c.PeerCAFile, "the relay's CA by default")
			assert.Equal(t, DefaultEtcdPrefix, c.EtcdPrefix)
			assert.Equal(t, DefaultLeaseTTL, c.LeaseTTL)
		})
	}
}
