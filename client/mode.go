package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// ModeAuto lets the agent pick the API server route's mode at start: the
// relay is told passthrough when the API server's certificate is valid for
// <subdomain>.<server> (so kubectl can verify it end to end), terminate when
// it is not (managed control planes such as EKS and AKS, where nobody can
// add that name). The relay only ever sees passthrough or terminate.
const ModeAuto tunnel.Mode = "auto"

// ParseMode accepts the agent's modes: auto, passthrough or terminate.
func ParseMode(s string) (tunnel.Mode, error) {
	if tunnel.Mode(s) == ModeAuto {
		return ModeAuto, nil
	}
	if m, err := tunnel.ParseMode(s); err == nil {
		return m, nil
	}
	return "", fmt.Errorf("unknown mode %q (want %q, %q or %q)", s, ModeAuto, tunnel.Passthrough, tunnel.Terminate)
}

// apiCert reads the API server's serving certificate. The chain is not
// verified: only the names are read, and a wrong answer costs no security
// (in passthrough mode kubectl verifies the certificate itself, in
// terminate mode the agent's proxy verifies it with the cluster CA).
func (c *Client) apiCert(ctx context.Context) (*x509.Certificate, error) {
	rt := c.routes[c.cfg.Subdomain]
	ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	d := tls.Dialer{NetDialer: rt.dialer, Config: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // only reading the certificate's names
	conn, err := d.DialContext(ctx, "tcp", rt.target.Host)
	if err != nil {
		return nil, fmt.Errorf("reading the API server certificate at %s: %w", rt.target.Host, err)
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil, fmt.Errorf("API server at %s sent no certificate", rt.target.Host)
	}
	return certs[0], nil
}

// decideMode returns the mode the API server route registers with. A
// forced mode is returned as is (passthrough still warns about a missing
// SAN). In auto mode the agent must know the answer before it registers:
// registering the wrong mode would break every kubectl until a restart. So
// while the API server cannot be reached (it may be starting, or a network
// policy may not be in place yet) decideMode retries with backoff, and the
// agent stays unready; it returns only with a decision or when ctx ends.
// The decision holds for this process: a restart checks again (after a
// repave has added the SAN, the agent moves to passthrough).
func (c *Client) decideMode(ctx context.Context) (tunnel.Mode, error) {
	want := c.cfg.Subdomain + "." + c.cfg.Server
	switch c.cfg.Mode {
	case tunnel.Terminate:
		return tunnel.Terminate, nil
	case tunnel.Passthrough:
		cert, err := c.apiCert(ctx)
		switch {
		case err != nil:
			c.log.Warn("could not check the API server certificate", "error", err)
		case cert.VerifyHostname(want) != nil:
			c.warnMissingSAN(cert, want)
		default:
			c.log.Info("API server certificate carries the proxy host name", "hostname", want)
		}
		return tunnel.Passthrough, nil
	}
	delay := c.cfg.BackoffMin
	for {
		cert, err := c.apiCert(ctx)
		if err == nil {
			if cert.VerifyHostname(want) == nil {
				c.log.Info("mode auto: the API server certificate carries the proxy host name; registering passthrough",
					"mode", tunnel.Passthrough, "hostname", want)
				return tunnel.Passthrough, nil
			}
			c.log.Info("mode auto: the API server certificate lacks the proxy host name; registering terminate",
				"mode", tunnel.Terminate, "hostname", want, "certificate_names", certNames(cert))
			return tunnel.Terminate, nil
		}
		c.setModeErr(err)
		wait := jitter(delay)
		c.log.Warn("mode auto: cannot reach the API server to choose a mode; not ready until it answers",
			"error", err, "retry_in", wait.Round(time.Millisecond).String())
		select {
		case <-ctx.Done():
			return "", errors.Join(ctx.Err(), err)
		case <-time.After(wait):
		}
		delay = min(delay*2, c.cfg.BackoffMax)
	}
}

// warnMissingSAN explains the "x509: certificate is valid for ..., not
// cluster-<uid>.<server>" trap of a forced passthrough mode, which is fixed
// in the cluster's configuration, not here.
func (c *Client) warnMissingSAN(cert *x509.Certificate, want string) {
	c.log.Warn("API server certificate lacks the proxy host name: kubectl through the proxy will fail with an x509 error until it is added (or use --mode=auto or terminate)",
		"hostname", want,
		"certificate_names", certNames(cert),
		"kubeadm", "kubeadmconfig:\n  apiServer:\n    certSANs:\n      - "+want,
		"rke2_k3s", "cluster:\n  config: |\n    tls-san:\n      - "+want)
}

func certNames(cert *x509.Certificate) string {
	ips := make([]string, len(cert.IPAddresses))
	for i, ip := range cert.IPAddresses {
		ips[i] = ip.String()
	}
	return strings.Join(slices.Concat(cert.DNSNames, ips), ",")
}
