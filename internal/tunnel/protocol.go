package tunnel

import (
	"fmt"
	"sort"
	"strings"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
)

// Wire constants shared by the relay and the agent. Changing any of them
// breaks mixed-version deployments, so version the path instead.
const (
	// Path is the relay's WebSocket endpoint that agents dial.
	Path = "/v1/tunnel"

	// HeaderAgent carries the agent replica's id. A reconnect with the same
	// id replaces that replica's stale session.
	HeaderAgent = "Spectro-Proxy-Agent"
	// HeaderRoutes lists the labels an agent serves, "label=mode,...".
	HeaderRoutes = "Spectro-Proxy-Routes"
	// HeaderRoute names the label a request on the tunnel is for.
	HeaderRoute = "Spectro-Proxy-Route"
	// HeaderStream says what a CONNECT stream carries.
	HeaderStream = "Spectro-Proxy-Stream"
	// HeaderError carries the agent's reason when it refuses a stream.
	HeaderError = "Spectro-Proxy-Error"
	// HeaderReplica names the relay replica that accepted a tunnel, and
	// HeaderReplicas says how many replicas are live; both are on the
	// relay's 101 answer. The agent keeps its two tunnels on distinct
	// replicas, and holds two only when there is more than one.
	HeaderReplica  = "Spectro-Proxy-Replica"
	HeaderReplicas = "Spectro-Proxy-Replicas"

	// StreamTCP is a raw byte stream to the route's target (TLS passthrough).
	StreamTCP = "tcp"
	// StreamUpgrade is an HTTP/1.1 request with Upgrade, written first on the
	// stream, then raw bytes both ways once the target answers 101.
	StreamUpgrade = "http-upgrade"
	// StreamHTTP is an HTTP/1.1 keep-alive connection to a terminate
	// route's target: the agent joins the stream to a connection of its
	// own (TLS for an https target) and copies bytes; the relay writes
	// the requests and reads the responses. The relay sends it only to an
	// agent that lists it in HeaderStreams.
	StreamHTTP = "http"
	// StreamH2 is an HTTP/2 connection to the API server route's target:
	// the agent dials it with TLS that must negotiate h2, answers 200,
	// and copies bytes; the relay splices a client's HTTP/2 connection,
	// whose TLS it ended, onto it (internal/h2splice). A target that does
	// not speak HTTP/2 is refused with 502, and the relay then serves that
	// connection request by request. Sent only to an agent that lists it
	// in HeaderStreams, and never for a dashboard's route.
	StreamH2 = "h2"
	// HeaderStreams lists, on the agent's tunnel request, the stream kinds
	// it serves beyond tcp, http-upgrade and move (an agent that predates
	// the header serves only those).
	HeaderStreams = "Spectro-Proxy-Streams"
	// StreamMove is the relay asking the agent to move the tunnel it comes
	// on: the relay is draining. The agent answers 200, dials a
	// replacement (a draining relay refuses it, so it lands on another
	// replica) and once that is registered shuts the old tunnel down
	// gracefully. Its :authority is one of the tunnel's labels, so an
	// agent that predates it answers 400 (unknown stream kind).
	StreamMove = "move"
)

// Mode is how the relay treats a route's public connections.
type Mode string

const (
	// Passthrough hands the raw TLS connection to the agent; TLS ends at the
	// API server and kubectl keeps its own credentials end to end.
	Passthrough Mode = "passthrough"
	// Terminate ends TLS at the relay with its wildcard certificate and
	// forwards HTTP requests, one HTTP/2 stream each.
	Terminate Mode = "terminate"
)

// ParseMode returns the Mode named s.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case Passthrough, Terminate:
		return Mode(s), nil
	}
	return "", fmt.Errorf("unknown mode %q (want %q or %q)", s, Passthrough, Terminate)
}

// FormatRoutes renders routes for HeaderRoutes, sorted so it is stable.
func FormatRoutes(routes map[string]Mode) string {
	parts := make([]string, 0, len(routes))
	for label, m := range routes {
		parts = append(parts, label+"="+string(m))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

// ParseRoutes parses HeaderRoutes. Labels must be single DNS labels.
func ParseRoutes(s string) (map[string]Mode, error) {
	routes := map[string]Mode{}
	if strings.TrimSpace(s) == "" {
		return nil, fmt.Errorf("no routes given")
	}
	for _, part := range strings.Split(s, ",") {
		label, mode, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, fmt.Errorf("route %q: want label=mode", part)
		}
		if err := hostname.ValidateLabel(label); err != nil {
			return nil, err
		}
		m, err := ParseMode(mode)
		if err != nil {
			return nil, fmt.Errorf("route %q: %w", label, err)
		}
		if _, dup := routes[label]; dup {
			return nil, fmt.Errorf("route %q given twice", label)
		}
		routes[label] = m
	}
	return routes, nil
}
