package tunnel

import (
	"net/http"
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestResponseBuffers: a body of known length from one large buffer's
// worth up is copied with large buffers; watches (unknown length) and
// small answers keep ReverseProxy's 32 KiB, and each buffer goes back to
// the pool it came from.
func TestResponseBuffers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		length int64
		want   int
	}{
		{"watch, length unknown", -1, 32 << 10},
		{"empty", 0, 32 << 10},
		{"small", 1 << 10, 32 << 10},
		{"just under a large buffer", largeCopy - 1, 32 << 10},
		{"a large buffer's worth", largeCopy, largeCopy},
		{"download", 10 << 20, largeCopy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &ResponseBuffers{}
			b.Size(&http.Response{ContentLength: tc.length})
			buf := b.Get()
			assert.Len(t, buf, tc.want)
			b.Put(buf)
		})
	}
	t.Run("Get before Size", func(t *testing.T) {
		b := &ResponseBuffers{}
		assert.Len(t, b.Get(), 32<<10, "nothing known: the small buffer")
	})
}
