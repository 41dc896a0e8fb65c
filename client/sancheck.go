package client

import (
	"context"
	"crypto/tls"
	"net"
	"slices"
	"strings"
)

// checkSAN warns when the API server's certificate lacks the host name
// kubectl will verify in passthrough mode: the "x509: certificate is valid
// for ..., not cluster-<uid>.<server>" trap, which is fixed in the cluster's
// configuration, not here.
func (c *Client) checkSAN(ctx context.Context) {
	rt := c.routes[c.cfg.Subdomain]
	want := c.cfg.Subdomain + "." + c.cfg.Server
	ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	d := tls.Dialer{NetDialer: rt.dialer, Config: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // only reading the certificate's names
	conn, err := d.DialContext(ctx, "tcp", rt.target.Host)
	if err != nil {
		c.log.Warn("could not check the API server certificate", "target", rt.target.Host, "error", err)
		return
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return
	}
	if certs[0].VerifyHostname(want) == nil {
		c.log.Info("API server certificate carries the proxy host name", "hostname", want)
		return
	}
	c.log.Warn("API server certificate lacks the proxy host name: kubectl through the proxy will fail with an x509 error until it is added",
		"hostname", want,
		"certificate_names", strings.Join(slices.Concat(certs[0].DNSNames, ipStrings(certs[0].IPAddresses)), ","),
		"kubeadm", "kubeadmconfig:\n  apiServer:\n    certSANs:\n      - "+want,
		"rke2_k3s", "cluster:\n  config: |\n    tls-san:\n      - "+want)
}

func ipStrings(ips []net.IP) []string {
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = ip.String()
	}
	return out
}
