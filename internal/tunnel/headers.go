package tunnel

import (
	"errors"
	"io"
	"math"
	"net/http"
	"strings"
)

// Header sections read from a peer that is not our own code (a user's
// request, a target's upgrade response) are bounded: net/http's
// ReadRequest and ReadResponse accumulate a line of any length, so one
// 400 MiB header line took a process from 13 MiB to over 1 GiB.
const (
	// MaxUpgradeRequestHeaderBytes bounds the agent's read of an upgrade
	// request. The relay writes it from a request it already limited to
	// its MaxHeaderBytes (64 KiB by default) plus a few X-Forwarded
	// headers.
	MaxUpgradeRequestHeaderBytes = 1 << 20
	// MaxUpgradeResponseHeaderBytes bounds the relay's read of a target's
	// answer to an upgrade: a status line and a few headers.
	MaxUpgradeResponseHeaderBytes = 64 << 10
	// MaxResponseHeaderBytes bounds the header section of the ordinary
	// responses the agent reads from targets and the relay from tunnels.
	MaxResponseHeaderBytes = 1 << 20
)

// ErrHeaderTooLarge is returned when a peer's header section is over its
// bound.
var ErrHeaderTooLarge = errors.New("header section too large")

// HeaderLimitReader reads from R, failing with ErrHeaderTooLarge once N
// bytes were read, until Lift is called (when the header section has
// been parsed and the body, which has no such bound, follows).
type HeaderLimitReader struct {
	R io.Reader
	N int64
}

func (l *HeaderLimitReader) Read(p []byte) (int, error) {
	if l.N <= 0 {
		return 0, ErrHeaderTooLarge
	}
	if int64(len(p)) > l.N {
		p = p[:l.N]
	}
	n, err := l.R.Read(p)
	l.N -= int64(n)
	return n, err
}

// Lift removes the bound.
func (l *HeaderLimitReader) Lift() { l.N = math.MaxInt64 }

// IsHeaderTooLarge reports whether err came from a HeaderLimitReader's
// bound (net/http does not always wrap its reader's errors).
func IsHeaderTooLarge(err error) bool {
	return err != nil && (errors.Is(err, ErrHeaderTooLarge) || strings.Contains(err.Error(), ErrHeaderTooLarge.Error()))
}

// StripInternal removes every Spectro-Proxy-* field from h: the tunnel's
// own protocol headers are set by the relay alone, never by a user, and
// never reach a target.
func StripInternal(h http.Header) {
	for k := range h {
		if IsInternal(k) {
			delete(h, k)
		}
	}
}

// IsInternal reports whether a header field's name is one of the tunnel's
// own (Spectro-Proxy-*, in any case).
func IsInternal(name string) bool {
	return len(name) >= len(internalPrefix) && strings.EqualFold(name[:len(internalPrefix)], internalPrefix)
}

const internalPrefix = "Spectro-Proxy-"
