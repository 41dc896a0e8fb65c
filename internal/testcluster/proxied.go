package testcluster

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/kubeconfig"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Names of the service account a terminate-mode kubeconfig authenticates as.
const (
	ProxyUserNamespace = "spectro-proxy"
	ProxyUser          = "kubeconfig-user"
)

// ProxiedKubeconfig returns a kubeconfig that reaches this cluster through a
// relay, as users get one: in passthrough mode the admin kubeconfig
// rewritten (cluster CA and client certificate kept end to end); in
// terminate mode relayCA and the bearer token of a cluster-admin service
// account (ttl long), as the chart sets up for imported clusters.
func (c *Cluster) ProxiedKubeconfig(ctx context.Context, opts kubeconfig.Options, relayCA []byte, ttl time.Duration) ([]byte, error) {
	if opts.Mode == tunnel.Passthrough {
		src, err := os.ReadFile(c.AdminKubeconfig)
		if err != nil {
			return nil, fmt.Errorf("reading admin kubeconfig: %w", err)
		}
		return kubeconfig.Rewrite(src, opts)
	}
	if err := c.BindClusterRole(ctx, ProxyUserNamespace, ProxyUser, "cluster-admin"); err != nil {
		return nil, err
	}
	tok, err := c.ServiceAccountToken(ctx, ProxyUserNamespace, ProxyUser, ttl)
	if err != nil {
		return nil, err
	}
	opts.CAPEM, opts.BearerToken = relayCA, tok
	return kubeconfig.New(opts)
}
