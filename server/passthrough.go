package server

import (
	"context"
	"errors"
	"os"

	"github.com/spectroproxy/spectro-proxy/internal/sni"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// passthrough carries a raw TLS connection to the agent serving label.
func (s *Server) passthrough(ctx context.Context, c *sni.Conn, label string, cands []*session) {
	remote := c.RemoteAddr().String()
	release, ok := s.enterRawStream(c, label)
	if !ok {
		return
	}
	defer release()
	st, err := s.openStream(ctx, label, tunnel.StreamTCP, cands)
	if err != nil {
		reason := reasonStreamFailed
		if len(cands) == 0 {
			reason = reasonAgentUnavailable
		} else if errors.Is(err, errTooManyStreams) {
			reason = reasonTooManyStreams
		}
		s.refuse(reason, "host", label, "remote", remote, "error", err.Error())
		// There is no HTTP here to explain in; an alert at least ends the
		// client's handshake at once instead of letting it hang.
		_ = sni.WriteAlert(c, sni.AlertInternalError)
		c.Close()
		return
	}
	s.m.streams.WithLabelValues("passthrough").Inc()
	defer s.m.streams.WithLabelValues("passthrough").Dec()
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	up, down, err := tunnel.Join(c, st)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// The client took nothing for WriteStallTimeout (see stallConn).
		s.refuse(reasonWriteStall, "host", label, "remote", remote, "timeout", s.cfg.WriteStallTimeout.String())
	}
	s.m.bytes.WithLabelValues("to_agent").Add(float64(up))
	s.m.bytes.WithLabelValues("from_agent").Add(float64(down))
	s.log.Debug("passthrough closed", "host", label, "remote", remote, "up", up, "down", down, "error", err)
}

// enterRawStream takes one of the source's streams to label for a raw
// (passthrough) connection; past the source's limit it refuses c with a
// TLS alert (there is no HTTP to explain in) and closes it.
func (s *Server) enterRawStream(c *sni.Conn, label string) (release func(), ok bool) {
	remote := c.RemoteAddr().String()
	release, ok = s.srcStreams.enter(sourceOf(remote), label)
	if !ok {
		s.refuse(reasonTooManyStreamsFromSource, "host", label, "remote", remote, "max", s.cfg.MaxStreamsPerSource)
		_ = sni.WriteAlert(c, sni.AlertInternalError)
		c.Close()
	}
	return release, ok
}
