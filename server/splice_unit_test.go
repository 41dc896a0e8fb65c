package server

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// Which tunnels a terminate-mode connection may be spliced onto: for an
// HTTP/2 client, an agent that serves h2 streams whose API server has not
// refused HTTP/2; for an HTTP/1.1 one, an agent that serves http streams;
// never for a dashboard (whose cookies the relay rewrites).
func TestSpliceSessions(t *testing.T) {
	both := &session{agentID: "both", h2Streams: true, httpStreams: true}
	old := &session{agentID: "old"}
	h1only := &session{agentID: "h1only", httpStreams: true}
	refused := &session{agentID: "refused", h2Streams: true, httpStreams: true}
	refused.noH2.Store(true)
	tests := []struct {
		name   string
		label  string
		cands  []*session
		h2, h1 []*session
	}{
		{"API route", "cluster-a", []*session{old, both, refused, h1only}, []*session{both}, []*session{both, refused, h1only}},
		{"no agent takes it", "cluster-a", []*session{old}, nil, nil},
		{"dashboard", "cluster-a-dashboard", []*session{both}, nil, nil},
		{"VM dashboard", "cluster-a-vmdashboard", []*session{both}, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h2, h1 := spliceSessions(tt.label, tt.cands)
			assert.Equal(t, tt.h2, h2, "HTTP/2")
			assert.Equal(t, tt.h1, h1, "HTTP/1.1")
		})
	}
}
