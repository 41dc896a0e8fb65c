package hostname

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestScheme(t *testing.T) {
	sub := DefaultSubdomain("abc")
	assert.Equal(t, "cluster-abc", sub)
	assert.Equal(t, []string{"cluster-abc", "cluster-abc-dashboard", "cluster-abc-vmdashboard"}, Labels(sub))
	assert.Equal(t, "cluster-abc.proxy.test", Host(sub, "proxy.test"))
	for _, l := range Labels(sub)[1:] {
		assert.Error(t, CheckSubdomain(l), "a dashboard label is no subdomain: %s", l)
	}
	assert.NoError(t, CheckSubdomain(sub))
}

func TestLabelOf(t *testing.T) {
	tests := []struct {
		name, in string
		want     string
		ok       bool
	}{
		{"one level under", "cluster-a.proxy.test", "cluster-a", true},
		{"the domain itself", "proxy.test", "", false},
		{"two levels under", "a.b.proxy.test", "", false},
		{"elsewhere", "cluster-a.other.test", "", false},
		{"empty label", ".proxy.test", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := LabelOf(tc.in, "proxy.test")
			assert.Equal(t, tc.want, got)
			assert.Equal(t, tc.ok, ok)
		})
	}
	assert.Equal(t, "proxy.test", Canonical("Proxy.Test."))
	assert.True(t, InDomain("a.proxy.test", "proxy.test"))
	assert.True(t, InDomain("proxy.test", "proxy.test"))
	assert.False(t, InDomain("xproxy.test", "proxy.test"))
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name  string
		check func(string) error
		in    string
		ok    bool
	}{
		{"label", ValidateLabel, "cluster-abc", true},
		{"label upper case", ValidateLabel, "Cluster", false},
		{"label leading dash", ValidateLabel, "-a", false},
		{"label trailing dash", ValidateLabel, "a-", false},
		{"label 63", ValidateLabel, string(make63()), true},
		{"label 64", ValidateLabel, string(make63()) + "a", false},
		{"label empty", ValidateLabel, "", false},
		{"domain", ValidateDomain, "proxy.example.com", true},
		{"domain trailing dot", ValidateDomain, "proxy.example.com.", false},
		{"domain underscore", ValidateDomain, "proxy_example.com", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.check(tc.in)
			if tc.ok {
				assert.NoError(t, err)
			} else {
				assert.Error(t, err)
			}
		})
	}
}

func make63() []byte {
	b := make([]byte, MaxLabel)
	for i := range b {
		b[i] = 'a'
	}
	return b
}

func TestOfAuthority(t *testing.T) {
	for in, want := range map[string]string{
		"cluster-a.proxy.test":      "cluster-a.proxy.test",
		"Cluster-A.Proxy.Test.:443": "cluster-a.proxy.test",
		"cluster-a.proxy.test:8443": "cluster-a.proxy.test",
		"127.0.0.1:443":             "127.0.0.1",
		"[::1]:443":                 "::1",
		"":                          "",
	} {
		assert.Equal(t, want, OfAuthority(in), in)
	}
}
