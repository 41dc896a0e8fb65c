// Package kubereq tells what a Kubernetes API request is from its URL.
package kubereq

import (
	"net/http"
	"net/url"
	"strings"
)

// Short reports whether r carries no body and its response ends by
// itself (not a watch or a followed log): the requests that are cheaper
// on a kept-alive HTTP/1.1 connection than as an HTTP/2 stream.
func Short(r *http.Request) bool { return !HasBody(r) && !StaysOpen(r.URL) }

// Replayable reports whether r may be sent a second time when its
// connection turns out to have been closed by the server before any
// answer: a method that changes nothing (GET, HEAD, OPTIONS) and no body,
// the requests net/http's client replays too. A DELETE is not: the first
// one may have been carried out, and the second would answer NotFound.
func Replayable(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, "":
		return !HasBody(r)
	}
	return false
}

// HasBody reports whether r carries a request body.
func HasBody(r *http.Request) bool { return r.Body != nil && r.Body != http.NoBody }

// StaysOpen reports whether a Kubernetes API request is a watch
// (watch=true, or a legacy /watch/ path) or follows a log (follow=true):
// its response goes on until the client or the server ends it. The API
// server reads these flags as true unless they are "0", "f" or "false".
func StaysOpen(u *url.URL) bool {
	if strings.Contains(u.Path, "/watch/") {
		return true
	}
	q := u.RawQuery
	if !strings.Contains(q, "watch") && !strings.Contains(q, "follow") {
		return false // most requests: no query parse
	}
	v, _ := url.ParseQuery(q) // a malformed pair is skipped, the rest parsed
	for _, name := range []string{"watch", "follow"} {
		if vals := v[name]; len(vals) > 0 && !isFalse(vals[0]) {
			return true
		}
	}
	return false
}

func isFalse(s string) bool {
	return s == "0" || strings.EqualFold(s, "f") || strings.EqualFold(s, "false")
}
