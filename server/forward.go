package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"os"
	"sync"
	"sync/atomic"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubereq"
	"github.com/spectroproxy/spectro-proxy/internal/kubestatus"
	"github.com/spectroproxy/spectro-proxy/internal/peer"
	fleet "github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/sni"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

// Forwarding to the replica that holds a name's tunnel, when this one has
// none (see fleet.go): a whole passthrough connection (forwardConn, from
// the SNI router) or a terminate-mode request (forwardTerminated, from
// serveTerminated). Holders are tried in the registry's order until one
// takes it; one that is down or answers "no local tunnel" (its view was
// stale) costs a try, not the user's request.

// forwardConn carries a passthrough connection, ClientHello included
// (c replays what the router peeked), to the first holder that answers 101.
func (s *Server) forwardConn(ctx context.Context, c *sni.Conn, name, label string, holders []fleet.Holder) {
	remote := c.RemoteAddr().String()
	release, ok := s.enterRawStream(c, label)
	if !ok {
		return
	}
	defer release()
	var pc *peer.Conn
	var errs []error
	for _, h := range holders {
		var err error
		pc, err = s.fl.id.OpenConn(ctx, h.Replica.PeerAddr, name, remote, s.cfg.StreamTimeout+peer.HandshakeTimeout)
		if err == nil {
			break
		}
		errs = append(errs, fmt.Errorf("replica %s: %w", h.Replica.ID, err))
		if ctx.Err() != nil {
			break
		}
	}
	if pc == nil {
		s.fl.forwarded.WithLabelValues(kindConn, "failed").Inc()
		s.refuse(reasonForwardFailed, "host", label, "remote", remote, "error", errors.Join(errs...).Error())
		_ = sni.WriteAlert(c, sni.AlertInternalError)
		c.Close()
		return
	}
	s.fl.forwarded.WithLabelValues(kindConn, "ok").Inc()
	s.fl.fwdStreams.WithLabelValues(kindConn).Inc()
	defer s.fl.fwdStreams.WithLabelValues(kindConn).Dec()
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	up, down, err := tunnel.Join(c, pc)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		s.refuse(reasonWriteStall, "host", label, "remote", remote, "timeout", s.cfg.WriteStallTimeout.String())
	}
	s.log.Debug("forwarded connection closed", "host", label, "remote", remote, "peer", pc.RemoteAddr().String(), "up", up, "down", down, "error", err)
}

// forwardTerminated forwards r to a replica holding label's tunnel when
// this one has no usable session for it and r did not itself come from a
// peer; it reports whether it did (and answered w). streamed sees the
// response first (the drain ends a forwarded watch cleanly too).
func (s *Server) forwardTerminated(w http.ResponseWriter, r *http.Request, label string, streamed func(*http.Response)) bool {
	if peerReceived(r.Context()) || s.reg.usable(label) {
		return false
	}
	holders := s.holders(label)
	if len(holders) == 0 {
		return false
	}
	name := hostname.Host(label, s.cfg.Domain)
	bufs := &tunnel.ResponseBuffers{}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "https"
			pr.Out.URL.Host = holders[0].Replica.PeerAddr // each try sets its own
			pr.Out.Host = r.Host
			tunnel.StripInternal(pr.Out.Header)
			tunnel.StripInternal(pr.Out.Trailer)
			// The receiver adds the user's address to X-Forwarded-For
			// as if it had terminated the request; what the user sent
			// passes as it is (ReverseProxy dropped it from Out).
			if xff := pr.In.Header.Values("X-Forwarded-For"); len(xff) > 0 {
				pr.Out.Header["X-Forwarded-For"] = append([]string(nil), xff...)
			}
			pr.Out.Header.Set(peer.HeaderHost, name)
			pr.Out.Header.Set(peer.HeaderSource, r.RemoteAddr)
		},
		Transport:  &peerTransport{s: s, label: label, holders: holders},
		BufferPool: bufs,
		// As for local tunnels: streamed responses (watches, logs -f)
		// are flushed at every write by ReverseProxy itself.
		FlushInterval: 0,
		ModifyResponse: func(resp *http.Response) error {
			streamed(resp)
			bufs.Size(resp)
			return nil
		},
		ErrorHandler: s.forwardError,
	}
	rp.ServeHTTP(w, r)
	return true
}

// peerTransport sends a request to the first holder that takes it.
type peerTransport struct {
	s       *Server
	label   string
	holders []fleet.Holder
}

func (t *peerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	// A body can go to the next holder only while nothing of it was read.
	var body *onceBody
	if kubereq.HasBody(req) {
		body = &onceBody{rc: req.Body}
	}
	var errs []error
	for _, h := range t.holders {
		out := req.Clone(req.Context())
		out.URL.Host = h.Replica.PeerAddr
		if body != nil {
			out.Body = body.try()
		}
		resp, err := t.s.fl.tr.RoundTrip(out)
		if err == nil && resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get(tunnel.HeaderError) == peer.ErrNoTunnel {
			resp.Body.Close()
			err = errors.New("no tunnel there (a stale view)")
		}
		if err == nil {
			t.s.fl.forwarded.WithLabelValues(kindHTTP, "ok").Inc()
			g := t.s.fl.fwdStreams.WithLabelValues(kindHTTP)
			g.Inc()
			resp.Body = &gaugeBody{ReadCloser: resp.Body, dec: sync.OnceFunc(g.Dec)}
			return resp, nil
		}
		errs = append(errs, fmt.Errorf("replica %s: %w", h.Replica.ID, err))
		if req.Context().Err() != nil || (body != nil && body.read.Load()) {
			break
		}
	}
	t.s.fl.forwarded.WithLabelValues(kindHTTP, "failed").Inc()
	return nil, &forwardFailed{label: t.label, err: errors.Join(errs...)}
}

// forwardFailed: no holder took a request.
type forwardFailed struct {
	label string
	err   error
}

func (e *forwardFailed) Error() string {
	return (&noAgentError{label: e.label}).Error() + "; forwarding to the replicas that hold it: " + e.err.Error()
}

func (e *forwardFailed) Unwrap() error { return e.err }

// forwardError answers as proxyError does; a request no holder took is a
// 503 like a missing agent (kubectl retries), counted as forward_failed.
func (s *Server) forwardError(w http.ResponseWriter, r *http.Request, err error) {
	var ff *forwardFailed
	if !errors.As(err, &ff) || errors.Is(err, context.Canceled) {
		s.proxyError(w, r, err)
		return
	}
	s.refuse(reasonForwardFailed, "host", ff.label, "remote", r.RemoteAddr, "error", ff.err.Error())
	kubestatus.Write(w, http.StatusServiceUnavailable, "ServiceUnavailable", "spectro-proxy: "+err.Error())
}

// onceBody lends a request body to one try after another, until a try
// reads from it.
type onceBody struct {
	rc   io.ReadCloser
	read atomic.Bool
}

func (b *onceBody) try() io.ReadCloser { return &bodyTry{b: b} }

type bodyTry struct{ b *onceBody }

func (t *bodyTry) Read(p []byte) (int, error) {
	t.b.read.Store(true)
	return t.b.rc.Read(p)
}

// Close leaves the body to the next try; ReverseProxy's server closes it.
func (t *bodyTry) Close() error { return nil }

// gaugeBody lowers the in-flight gauge when the response ends. For a 101
// it is the upgraded connection, which ReverseProxy writes to as well.
type gaugeBody struct {
	io.ReadCloser
	dec func()
}

func (b *gaugeBody) Close() error { defer b.dec(); return b.ReadCloser.Close() }

func (b *gaugeBody) Write(p []byte) (int, error) {
	if w, ok := b.ReadCloser.(io.Writer); ok {
		return w.Write(p)
	}
	return 0, errors.New("response body is not writable")
}
