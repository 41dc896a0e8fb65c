// Package kubeconfig writes the kubeconfigs users point kubectl at: a new
// one, or an existing one rewritten to reach its cluster through the relay.
package kubeconfig

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"k8s.io/client-go/tools/clientcmd"
	api "k8s.io/client-go/tools/clientcmd/api"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Options says how the kubeconfig reaches the cluster.
type Options struct {
	Mode      tunnel.Mode
	Server    string // the relay's domain
	Port      int
	Subdomain string
	// Connect, when set (host:port), is what kubectl dials; the relay host
	// name then travels as tls-server-name, so no DNS record is needed.
	Connect string
	// CAPEM is the CA kubectl trusts: the relay's in terminate mode (empty
	// when its certificate is publicly trusted), the cluster's in
	// passthrough mode (ignored by Rewrite, which keeps the cluster's CA).
	CAPEM []byte
	// BearerToken is the user's token (the chart's service account in
	// terminate mode). Ignored with From, whose user is kept.
	BearerToken string
	// Name names the cluster, user and context (the subdomain when empty).
	Name string
}

// Host returns the public host name of the cluster's API server.
func (o Options) Host() string { return hostname.Host(o.Subdomain, o.Server) }

func (o Options) validate() error {
	var errs []error
	if _, err := tunnel.ParseMode(string(o.Mode)); err != nil {
		errs = append(errs, err)
	}
	if o.Server == "" {
		errs = append(errs, errors.New("server (the relay's domain) is required"))
	} else if err := hostname.ValidateDomain(o.Server); err != nil {
		errs = append(errs, fmt.Errorf("server: %w", err))
	}
	if err := hostname.ValidateLabel(o.Subdomain); err != nil {
		errs = append(errs, fmt.Errorf("subdomain: %w", err))
	}
	if o.Port < 1 || o.Port > 65535 {
		errs = append(errs, fmt.Errorf("port %d is out of range 1-65535", o.Port))
	}
	if o.Connect != "" {
		if err := validateHostPort(o.Connect); err != nil {
			errs = append(errs, fmt.Errorf("connect %q: %w", o.Connect, err))
		}
	}
	return errors.Join(errs...)
}

// validateHostPort accepts what kubectl can dial: an IP address or a DNS
// name, and a port 1-65535.
func validateHostPort(hp string) error {
	host, port, err := net.SplitHostPort(hp)
	if err != nil {
		return fmt.Errorf("want host:port: %w", err)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("port %q must be a number 1-65535", port)
	}
	if net.ParseIP(host) != nil {
		return nil
	}
	if err := hostname.ValidateDomain(strings.ToLower(host)); err != nil {
		return fmt.Errorf("host is neither an IP address nor a DNS name: %w", err)
	}
	return nil
}

// ServerURL returns the API server URL kubectl uses through the relay,
// https://<subdomain>.<server>:<port> (ignoring Connect).
func (o Options) ServerURL() string {
	return "https://" + net.JoinHostPort(o.Host(), strconv.Itoa(o.Port))
}

func (o Options) apply(cl *api.Cluster) {
	if o.Connect != "" {
		cl.Server = "https://" + o.Connect
		cl.TLSServerName = o.Host()
	} else {
		cl.Server = o.ServerURL()
		cl.TLSServerName = ""
	}
}

// New builds a kubeconfig with one cluster, user and context.
func New(o Options) ([]byte, error) {
	if err := o.validate(); err != nil {
		return nil, fmt.Errorf("kubeconfig options: %w", err)
	}
	if len(o.CAPEM) == 0 && o.Mode == tunnel.Passthrough {
		// TLS ends at the API server, whose CA is never a public one.
		return nil, errors.New("passthrough mode needs the cluster CA")
	}
	if o.Mode == tunnel.Terminate && o.BearerToken == "" {
		return nil, errors.New("terminate mode needs a bearer token (the chart's service account token)")
	}
	return Write(build(o))
}

// Skeleton builds the kubeconfig the agent publishes for its cluster: one
// cluster (the relay host name and the CA for the mode: the cluster's in
// passthrough mode, the relay's or none in terminate mode), one context,
// and a user entry with no credentials, which each user fills in
// (`kubectl config set-credentials`, or `--token`).
func Skeleton(o Options) ([]byte, error) {
	if err := o.validate(); err != nil {
		return nil, fmt.Errorf("kubeconfig options: %w", err)
	}
	if len(o.CAPEM) == 0 && o.Mode == tunnel.Passthrough {
		return nil, errors.New("passthrough mode needs the cluster CA")
	}
	if o.BearerToken != "" {
		return nil, errors.New("a kubeconfig skeleton carries no credentials")
	}
	return Write(build(o))
}

func build(o Options) *api.Config {
	name := o.Name
	if name == "" {
		name = o.Subdomain
	}
	cl := api.NewCluster()
	cl.CertificateAuthorityData = o.CAPEM
	o.apply(cl)
	user := api.NewAuthInfo()
	user.Token = o.BearerToken
	cfg := api.NewConfig()
	cfg.Clusters[name] = cl
	cfg.AuthInfos[name] = user
	cfg.Contexts[name] = &api.Context{Cluster: name, AuthInfo: name}
	cfg.CurrentContext = name
	return cfg
}

// Rewrite points the current context of an existing kubeconfig at the
// relay, keeping its users (client certificates work in passthrough mode).
// In terminate mode the cluster CA becomes the relay's CA.
func Rewrite(from []byte, o Options) ([]byte, error) {
	if err := o.validate(); err != nil {
		return nil, fmt.Errorf("kubeconfig options: %w", err)
	}
	cfg, err := clientcmd.Load(from)
	if err != nil {
		return nil, fmt.Errorf("parsing kubeconfig: %w", err)
	}
	ctx, ok := cfg.Contexts[cfg.CurrentContext]
	if !ok || ctx == nil {
		return nil, fmt.Errorf("kubeconfig has no current context %q", cfg.CurrentContext)
	}
	src, ok := cfg.Clusters[ctx.Cluster]
	if !ok || src == nil {
		return nil, fmt.Errorf("context %q names cluster %q, which the kubeconfig lacks", cfg.CurrentContext, ctx.Cluster)
	}
	cl := src.DeepCopy()
	if cl.CertificateAuthority != "" {
		// Inline the file so the new kubeconfig works anywhere.
		if err := api.FlattenContent(&cl.CertificateAuthority, &cl.CertificateAuthorityData, ""); err != nil {
			return nil, fmt.Errorf("reading cluster CA: %w", err)
		}
	}
	if o.Mode == tunnel.Terminate {
		// The relay's CA replaces the cluster's; none means the relay has a
		// publicly trusted certificate and system roots verify it.
		cl.CertificateAuthorityData = o.CAPEM
		cl.CertificateAuthority = ""
	}
	cl.InsecureSkipTLSVerify = false
	cl.ProxyURL = ""
	o.apply(cl)
	name := o.Name
	if name == "" {
		name = o.Subdomain
	}
	newCtx := ctx.DeepCopy()
	newCtx.Cluster = name
	if o.Mode == tunnel.Terminate && o.BearerToken != "" {
		user := api.NewAuthInfo()
		user.Token = o.BearerToken
		cfg.AuthInfos[name] = user
		newCtx.AuthInfo = name
	} else if o.Mode == tunnel.Terminate {
		if err := checkTerminateUser(cfg.AuthInfos[ctx.AuthInfo], ctx.AuthInfo); err != nil {
			return nil, err
		}
	}
	cfg.Clusters[name] = cl
	cfg.Contexts[name] = newCtx
	cfg.CurrentContext = name
	return Write(cfg)
}

// checkTerminateUser accepts a user whose credentials survive a relay that
// ends TLS: anything that becomes an Authorization header (a token or
// token file, an exec plugin such as `aws eks get-token`, an auth provider
// such as OIDC), which the agent passes on to the API server. A client
// certificate is refused: it authenticates the TLS connection, and that
// connection ends at the relay.
func checkTerminateUser(u *api.AuthInfo, name string) error {
	if u == nil {
		return fmt.Errorf("terminate mode: the current context's user %q is not in the kubeconfig; give a bearer token (--user-token-file)", name)
	}
	if u.Token != "" || u.TokenFile != "" || u.Exec != nil || u.AuthProvider != nil {
		return nil
	}
	if u.ClientCertificate != "" || len(u.ClientCertificateData) > 0 {
		return fmt.Errorf("terminate mode: user %q authenticates with a client certificate, which cannot pass a relay that terminates TLS "+
			"(the relay, not the API server, ends the TLS connection the certificate belongs to); use passthrough mode "+
			"(--mode passthrough, with the proxy host name in the API server certificate) or a token-based user (--user-token-file, "+
			"an exec plugin, OIDC)", name)
	}
	return fmt.Errorf("terminate mode: user %q has no token-based credentials to send through the relay; give a bearer token (--user-token-file)", name)
}

// Write encodes cfg after checking it as kubectl would (clientcmd.Validate:
// files named in it must exist).
func Write(cfg *api.Config) ([]byte, error) {
	if err := clientcmd.Validate(*cfg); err != nil {
		return nil, fmt.Errorf("kubeconfig would be invalid: %w", err)
	}
	b, err := clientcmd.Write(*cfg)
	if err != nil {
		return nil, fmt.Errorf("encoding kubeconfig: %w", err)
	}
	return b, nil
}
