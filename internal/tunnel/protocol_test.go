package tunnel

import (
	"bufio"
	"io"
	"net/http"
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

func TestStripInternal(t *testing.T) {
	h := http.Header{"Spectro-Proxy-Stream": {"tcp"}, "spectro-proxy-route": {"x"}, "Spectro-Proxy-Future": {"y"}, "X-Forwarded-For": {"1.2.3.4"}, "Spectro-Proxy": {"kept"}}
	StripInternal(h)
	assert.Equal(t, http.Header{"X-Forwarded-For": {"1.2.3.4"}, "Spectro-Proxy": {"kept"}}, h)
}

func TestHeaderLimitReader(t *testing.T) {
	l := &HeaderLimitReader{R: strings.NewReader("HTTP/1.1 101 Switching Protocols\r\nX: " + strings.Repeat("a", 10000)), N: 4096}
	_, err := http.ReadResponse(bufio.NewReader(l), nil)
	assert.True(t, IsHeaderTooLarge(err), "got %v", err)

	l = &HeaderLimitReader{R: strings.NewReader("HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + strings.Repeat("a", 10000)), N: 4096}
	br := bufio.NewReader(l)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	l.Lift()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Len(t, b, 10000)
}
