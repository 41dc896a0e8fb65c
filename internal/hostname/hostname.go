// Package hostname is the relay's host-name scheme, written once: a cluster's
// API server is served at <subdomain>.<domain> (subdomain "cluster-<uid>" by
// default), its dashboards at <subdomain>-dashboard.<domain> and
// <subdomain>-vmdashboard.<domain>, and every one of those is a single DNS
// label so that one wildcard certificate *.<domain> covers them all.
//
// It imports nothing internal: relay, agent, token and kubeconfig all use it.
package hostname

import (
	"fmt"
	"net"
	"strings"
)

const (
	// SubdomainPrefix starts a cluster's default subdomain, "cluster-<uid>".
	SubdomainPrefix = "cluster-"
	// DashboardSuffix ends the Kubernetes dashboard's label.
	DashboardSuffix = "-dashboard"
	// VMDashboardSuffix ends the VM dashboard's label.
	VMDashboardSuffix = "-vmdashboard"
	// MaxLabel and MaxName are DNS's limits (RFC 1123).
	MaxLabel = 63
	MaxName  = 253
)

// DefaultSubdomain is the subdomain of a cluster that names none.
func DefaultSubdomain(clusterUID string) string { return SubdomainPrefix + clusterUID }

// Dashboard is the Kubernetes dashboard's label for subdomain.
func Dashboard(subdomain string) string { return subdomain + DashboardSuffix }

// VMDashboard is the VM dashboard's label for subdomain.
func VMDashboard(subdomain string) string { return subdomain + VMDashboardSuffix }

// IsDashboard says whether label is a dashboard's (CheckSubdomain keeps
// the suffixes off clusters' subdomains).
func IsDashboard(label string) bool {
	return strings.HasSuffix(label, DashboardSuffix) || strings.HasSuffix(label, VMDashboardSuffix)
}

// Labels are the labels one cluster's subdomain owns: its API server and
// its two dashboards.
func Labels(subdomain string) []string {
	return []string{subdomain, Dashboard(subdomain), VMDashboard(subdomain)}
}

// CheckSubdomain reports why sub cannot be a cluster's subdomain: one
// ending in a dashboard suffix would own another cluster's dashboard label
// ("foo-dashboard" is cluster "foo"'s dashboard), and the relay would then
// spread that host's traffic over both clusters.
func CheckSubdomain(sub string) error {
	for _, suf := range []string{DashboardSuffix, VMDashboardSuffix} {
		if strings.HasSuffix(sub, suf) {
			return fmt.Errorf("subdomain %q ends in %q, which is reserved for dashboards", sub, suf)
		}
	}
	return nil
}

// Host is the public name of label under domain.
func Host(label, domain string) string { return label + "." + domain }

// Canonical is the form names are compared in: lower case, no trailing dot.
func Canonical(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) }

// OfAuthority is the host an HTTP request names (its Host field or
// :authority), without the port, in canonical form.
func OfAuthority(authority string) string {
	if host, _, err := net.SplitHostPort(authority); err == nil {
		authority = host
	}
	return Canonical(authority)
}

// LabelOf returns the label of a name one level under domain (both in
// canonical form).
func LabelOf(name, domain string) (string, bool) {
	label, ok := strings.CutSuffix(name, "."+domain)
	if !ok || label == "" || strings.Contains(label, ".") {
		return "", false
	}
	return label, true
}

// InDomain reports whether name is domain or a name under it.
func InDomain(name, domain string) bool {
	return name == domain || strings.HasSuffix(name, "."+domain)
}

// ValidateLabel checks that s is one lower-case DNS label (RFC 1123).
func ValidateLabel(s string) error {
	if s == "" || len(s) > MaxLabel {
		return fmt.Errorf("label %q: must be 1 to %d characters", s, MaxLabel)
	}
	for i, c := range s {
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if alnum || (c == '-' && i > 0 && i < len(s)-1) {
			continue
		}
		return fmt.Errorf("label %q: must be lower-case letters, digits and inner '-' only", s)
	}
	return nil
}

// ValidateDomain checks that s is a lower-case DNS name: dot-separated
// labels, no trailing dot, at most 253 characters.
func ValidateDomain(s string) error {
	if s == "" || len(s) > MaxName {
		return fmt.Errorf("domain %q: must be 1 to %d characters", s, MaxName)
	}
	for _, l := range strings.Split(s, ".") {
		if err := ValidateLabel(l); err != nil {
			return fmt.Errorf("domain %q: %w", s, err)
		}
	}
	return nil
}
