package server

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// Which tunnels a terminate-mode HTTP/2 connection may be spliced onto: an
// agent that serves h2 streams, whose API server has not refused HTTP/2,
// and never for a dashboard (whose cookies the relay rewrites).
func TestH2Sessions(t *testing.T) {
	h2 := &session{agentID: "h2", h2Streams: true}
	old := &session{agentID: "old"}
	refused := &session{agentID: "refused", h2Streams: true}
	refused.noH2.Store(true)
	tests := []struct {
		name  string
		label string
		cands []*session
		want  []*session
	}{
		{"API route", "cluster-a", []*session{old, h2, refused}, []*session{h2}},
		{"no agent takes it", "cluster-a", []*session{old, refused}, nil},
		{"dashboard", "cluster-a-dashboard", []*session{h2}, nil},
		{"VM dashboard", "cluster-a-vmdashboard", []*session{h2}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, h2Sessions(tt.label, tt.cands))
		})
	}
}
