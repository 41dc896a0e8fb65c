package server

import (
	"encoding/binary"
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A streamed body ended mid-event gives the rest of that event and then
// EOF; ended between events, EOF at once, even under a read that waits
// for the next event.
func TestStreamBodyEndsAtBoundary(t *testing.T) {
	frame := func(s string) string {
		b := binary.BigEndian.AppendUint32(nil, uint32(len(s)))
		return string(append(b, s...))
	}
	tests := []struct {
		name       string
		bnd        func() boundaries
		before     string // read in full before end
		chunks     []string
		wantAfter  string
		blockAfter bool // the source then waits for more: end must wake the read
	}{
		{"lines, mid-event", func() boundaries { return &lines{at: true} }, `{"a":1}` + "\n" + `{"b"`, []string{`:2}` + "\n" + `{"c":3}` + "\n"}, `:2}` + "\n", false},
		{"lines, between events", func() boundaries { return &lines{at: true} }, `{"a":1}` + "\n", nil, "", true},
		{"frames, mid-frame", func() boundaries { return &frames{} }, frame("one") + frame("two")[:3], []string{frame("two")[3:] + frame("three")}, frame("two")[3:], false},
		{"frames, between frames", func() boundaries { return &frames{} }, frame("one"), nil, "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pr, pw := io.Pipe()
			d := &drainer{streamed: map[*streamBody]struct{}{}}
			b := &streamBody{ReadCloser: pr, d: d, bnd: tc.bnd()}
			d.streamed[b] = struct{}{}
			go func() { _, _ = io.WriteString(pw, tc.before) }()
			buf := make([]byte, len(tc.before))
			_, err := io.ReadFull(b, buf)
			require.NoError(t, err)
			got := make(chan string, 1)
			go func() {
				rest, _ := io.ReadAll(b)
				got <- string(rest)
			}()
			if tc.blockAfter {
				// Let the reader block waiting for the next event.
				require.Eventually(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return b.reading }, 5*time.Second, time.Millisecond)
				b.end()
			} else {
				b.end()
				for _, c := range tc.chunks {
					go func() { _, _ = io.WriteString(pw, c) }()
				}
			}
			select {
			case s := <-got:
				assert.Equal(t, tc.wantAfter, s)
			case <-time.After(5 * time.Second):
				t.Fatal("the body did not end")
			}
			require.NoError(t, b.Close())
			assert.Empty(t, d.streamed)
		})
	}
}

func TestIsStreamed(t *testing.T) {
	tests := []struct {
		url, ct string
		want    bool
	}{
		{"/api/v1/pods?watch=true&resourceVersion=1", "application/json", true},
		{"/api/v1/pods?watch=1", "application/json", true},
		{"/api/v1/watch/pods", "application/json", true},
		{"/api/v1/namespaces/x/pods/p/log?follow=true", "text/plain", true},
		{"/events", "text/event-stream", true},
		{"/api/v1/pods", "application/json", false},
		{"/api/v1/pods?watch=false", "application/json", false},
	}
	for _, tc := range tests {
		u, err := url.Parse(tc.url)
		require.NoError(t, err)
		resp := &http.Response{Header: http.Header{"Content-Type": {tc.ct}}}
		assert.Equal(t, tc.want, isStreamed(&http.Request{URL: u}, resp), tc.url)
	}
}
