package kubereq

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestStaysOpen(t *testing.T) {
	tests := []struct {
		uri  string
		want bool
	}{
		{"/api/v1/namespaces/default/pods", false},
		{"/api/v1/namespaces/default/pods?watch=true&resourceVersion=10", true},
		{"/api/v1/pods?labelSelector=a%3Db&watch=1", true},
		{"/api/v1/pods?watch=false", false},
		{"/api/v1/pods?watch=0", false},
		{"/api/v1/pods?watch=F", false},
		{"/api/v1/pods?watch", true}, // as the API server reads it
		{"/api/v1/watch/namespaces/default/pods", true},
		{"/api/v1/namespaces/default/pods/web/log?follow=true&container=c", true},
		{"/api/v1/namespaces/default/pods/web/log?follow=false", false},
		{"/api/v1/namespaces/default/pods/web/log?tailLines=10", false},
		{"/api/v1/namespaces/watchers/configmaps?fieldSelector=metadata.name%3Dfollowers", false},
		{"/api/v1/pods?%zz&watch=true", true}, // a malformed pair does not hide the flag
	}
	for _, tc := range tests {
		t.Run(tc.uri, func(t *testing.T) {
			u, err := url.ParseRequestURI(tc.uri)
			require.NoError(t, err)
			assert.Equal(t, tc.want, StaysOpen(u))
		})
	}
}

// Short: no body, and a response that ends by itself.
func TestShort(t *testing.T) {
	tests := []struct {
		name, method, uri string
		body              io.Reader
		want, replayable  bool
	}{
		{"list", http.MethodGet, "/api/v1/pods", nil, true, true},
		{"head", http.MethodHead, "/healthz", nil, true, true},
		{"options", http.MethodOptions, "/api/v1/pods", nil, true, true},
		{"delete", http.MethodDelete, "/api/v1/namespaces/default/pods/web", nil, true, false},
		{"post without a body", http.MethodPost, "/api/v1/namespaces/default/pods/web/eviction", nil, true, false},
		{"watch", http.MethodGet, "/api/v1/pods?watch=true", nil, false, true},
		{"followed log", http.MethodGet, "/api/v1/namespaces/default/pods/web/log?follow=1", nil, false, true},
		{"create", http.MethodPost, "/api/v1/namespaces/default/pods", strings.NewReader("{}"), false, false},
		{"get with a body", http.MethodGet, "/api/v1/pods", strings.NewReader("{}"), false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, tc.uri, tc.body)
			assert.Equal(t, tc.want, Short(r))
			assert.Equal(t, tc.replayable, Replayable(r))
			assert.Equal(t, tc.body != nil, HasBody(r))
		})
	}
}
