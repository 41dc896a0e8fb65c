package server

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Stream slots: each session carries at most MaxStreamsPerTunnel streams.
// A slot is taken before a stream is opened and given back on every path
// (open failed, stream closed, response body closed).

// acquire takes one of the session's stream slots.
func (s *session) acquire() bool {
	if s.streams.Add(1) > s.maxStreams {
		s.streams.Add(-1)
		return false
	}
	return true
}

func (s *session) release() { s.streams.Add(-1) }

// errTooManyStreams says every replica's tunnel carries MaxStreamsPerTunnel.
var errTooManyStreams = errors.New("too many concurrent streams on the tunnel")

// slot is one of a session's stream slots, given back once.
type slot struct {
	once sync.Once
	sess *session
}

func (s *slot) free() { s.once.Do(s.sess.release) }

// countedStream is a stream holding a slot until Close.
type countedStream struct {
	*tunnel.Stream
	slot *slot
}

func (c *countedStream) Close() error { defer c.slot.free(); return c.Stream.Close() }

// openStream opens a stream of kind on the first candidate session that
// takes it, failing over to the next replica.
func (s *Server) openStream(ctx context.Context, label, kind string, cands []*session) (*countedStream, error) {
	if len(cands) == 0 {
		return nil, fmt.Errorf("no agent connected for %s", label)
	}
	var errs []error
	for _, sess := range cands {
		if !sess.acquire() {
			errs = append(errs, fmt.Errorf("agent %s: %w (%d)", sess.agentID, errTooManyStreams, sess.maxStreams))
			continue
		}
		st, err := tunnel.OpenStream(ctx, sess.cc, label, kind, s.cfg.StreamTimeout)
		if err == nil {
			return &countedStream{Stream: st, slot: &slot{sess: sess}}, nil
		}
		sess.release()
		errs = append(errs, fmt.Errorf("agent %s: %w", sess.agentID, err))
		if errors.Is(err, tunnel.ErrRefused) {
			// The agent is alive but could not reach its target; another
			// replica of the same cluster would not do better.
			break
		}
	}
	return nil, errors.Join(errs...)
}
