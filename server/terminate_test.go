package server

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStallWriter runs stallWriter on a real HTTP/2 stream: a client that
// reads its response has it whole, one that stops reading has the stream
// reset once a write has waited the stall timeout, and the handler's
// write fails rather than blocking on.
func TestStallWriter(t *testing.T) {
	const stall = 300 * time.Millisecond
	body := bytes.Repeat([]byte("x"), 8<<20) // far beyond the stream's flow-control window
	tests := []struct {
		name     string
		read     bool
		wantFail bool
	}{
		{name: "client reads", read: true},
		{name: "client never reads", read: false, wantFail: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			done := make(chan error, 1)
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				sw := &stallWriter{ResponseWriter: w, rc: http.NewResponseController(w), d: stall}
				var err error
				for off := 0; off < len(body) && err == nil; off += 32 << 10 {
					_, err = sw.Write(body[off : off+32<<10])
				}
				sw.Flush()
				done <- err
			}))
			srv.EnableHTTP2 = true
			srv.StartTLS()
			defer srv.Close()
			hc := srv.Client()
			resp, err := hc.Get(srv.URL)
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, 2, resp.ProtoMajor)
			if tc.read {
				got, err := io.ReadAll(resp.Body)
				require.NoError(t, err)
				assert.Equal(t, len(body), len(got))
			}
			select {
			case err := <-done:
				if tc.wantFail {
					assert.Error(t, err, "the write that stalled fails")
				} else {
					assert.NoError(t, err)
				}
			case <-time.After(stall + 10*time.Second):
				t.Fatal("the handler is still writing")
			}
		})
	}
}
