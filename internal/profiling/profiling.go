// Package profiling mounts Go's runtime profiles (net/http/pprof) on a
// process's plain-HTTP health port, behind the --pprof flag of relay and
// agent (off by default): the health port is cluster-internal, and a CPU
// profile costs the process while it runs, so nobody gets it unasked.
// `make bench` uses it to record where relay and agent spend their time.
package profiling

import (
	"net/http"
	"net/http/pprof"
)

// Prefix is where the profiles are served.
const Prefix = "/debug/pprof/"

// Wrap serves the pprof handlers under Prefix and everything else from h.
// It registers on a mux of its own, never http.DefaultServeMux.
func Wrap(h http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(Prefix, pprof.Index) // heap, allocs, goroutine, block, mutex... by name
	mux.HandleFunc(Prefix+"cmdline", pprof.Cmdline)
	mux.HandleFunc(Prefix+"profile", pprof.Profile)
	mux.HandleFunc(Prefix+"symbol", pprof.Symbol)
	mux.HandleFunc(Prefix+"trace", pprof.Trace)
	mux.Handle("/", h)
	return mux
}
