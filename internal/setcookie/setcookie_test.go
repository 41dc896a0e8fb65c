package setcookie

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestDomain(t *testing.T) {
	tests := []struct {
		in, stripped, hidden string
	}{
		{"a=1; Domain=example; Path=/", "a=1; Path=/", "a=1; Xomain=example; Path=/"},
		{"b=2; path=/; domain=.a.example; Secure", "b=2; path=/; Secure", "b=2; path=/; Xomain=.a.example; Secure"},
		{"c=3;Domain=x;DOMAIN=y", "c=3", "c=3;Xomain=x;XOMAIN=y"},
		{"d=4; Domain", "d=4", "d=4; Xomain"},
		{"e=5; Path=/domains; Domainx=1", "e=5; Path=/domains; Domainx=1", "e=5; Path=/domains; Domainx=1"},
		{"domain=6; Path=/", "domain=6; Path=/", "domain=6; Path=/"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			assert.Equal(t, tt.stripped != tt.in, HasDomain([]byte(tt.in)))
			in := []byte(tt.in)
			assert.Equal(t, tt.stripped, string(StripDomain(in)))
			assert.Equal(t, tt.in, string(in), "StripDomain leaves its argument alone")
			HideDomain(in)
			assert.Equal(t, tt.hidden, string(in))
			assert.False(t, HasDomain(in))
		})
	}
}
