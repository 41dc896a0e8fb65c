package tunnel

import (
	"strings"
	"testing"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseRoutes(t *testing.T) {
	tests := []struct {
		in      string
		want    map[string]Mode
		wantErr string
	}{
		{"cluster-a=passthrough", map[string]Mode{"cluster-a": Passthrough}, ""},
		{"cluster-a=terminate, cluster-a-dashboard=terminate", map[string]Mode{"cluster-a": Terminate, "cluster-a-dashboard": Terminate}, ""},
		{"", nil, "no routes"},
		{"cluster-a", nil, "want label=mode"},
		{"cluster-a=tcp", nil, "unknown mode"},
		{"a.b=passthrough", nil, "must be lower-case"},
		{"-a=passthrough", nil, "must be lower-case"},
		{strings.Repeat("a", 64) + "=passthrough", nil, "1 to 63"},
		{"a=passthrough,a=terminate", nil, "given twice"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseRoutes(tc.in)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			again, err := ParseRoutes(FormatRoutes(got))
			require.NoError(t, err)
			assert.Equal(t, got, again, "format/parse round trip")
		})
	}
}

func FuzzParseRoutes(f *testing.F) {
	f.Add("cluster-a=passthrough,cluster-a-dashboard=terminate")
	f.Add("a=b=c")
	f.Add(",,,")
	f.Fuzz(func(t *testing.T, s string) {
		routes, err := ParseRoutes(s)
		if err != nil {
			return
		}
		for label, m := range routes {
			if hostname.ValidateLabel(label) != nil {
				t.Fatalf("accepted bad label %q", label)
			}
			if _, err := ParseMode(string(m)); err != nil {
				t.Fatalf("accepted bad mode %q", m)
			}
		}
	})
}
