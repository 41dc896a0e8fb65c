package bench

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// DelayLine is a TCP forwarder on 127.0.0.1 that holds every chunk for a
// fixed time in each direction: a long link on loopback. It reads as fast
// as the sender writes (up to maxQueued bytes per direction), so only
// windows above TCP (HTTP/2 flow control) can limit what is in flight.
type DelayLine struct {
	Addr   string
	ln     net.Listener
	target string
	delay  time.Duration

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

// maxQueued bounds the bytes one direction holds: 64 MiB is more than
// 50 ms at 1 GiB/s, so it never binds in the benchmark.
const maxQueued = 64 << 20

// StartDelayLine forwards to target with oneWay delay each way.
func StartDelayLine(target string, oneWay time.Duration) (*DelayLine, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening for delay line: %w", err)
	}
	d := &DelayLine{Addr: ln.Addr().String(), ln: ln, target: target, delay: oneWay, conns: map[net.Conn]struct{}{}}
	d.wg.Go(d.accept)
	return d, nil
}

func (d *DelayLine) track(c net.Conn) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conns == nil {
		return false
	}
	d.conns[c] = struct{}{}
	return true
}

func (d *DelayLine) accept() {
	for {
		c, err := d.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.DialTimeout("tcp", d.target, 10*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		if !d.track(c) || !d.track(up) {
			c.Close()
			up.Close()
			return
		}
		d.wg.Go(func() { d.pipe(c, up.(*net.TCPConn)) })
		d.wg.Go(func() { d.pipe(up, c.(*net.TCPConn)) })
	}
}

type chunk struct {
	b   []byte
	due time.Time
}

// pipe delays src's bytes into dst and half-closes dst after src's EOF.
func (d *DelayLine) pipe(src net.Conn, dst *net.TCPConn) {
	q := make(chan chunk, 4096)
	// One token per queued chunk of up to 64 KiB bounds the bytes held.
	sem := make(chan struct{}, maxQueued>>16)
	d.wg.Go(func() {
		defer close(q)
		buf := make([]byte, 64<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				sem <- struct{}{}
				q <- chunk{b: bytes.Clone(buf[:n]), due: time.Now().Add(d.delay)}
			}
			if err != nil {
				return
			}
		}
	})
	broken := false
	for c := range q {
		<-sem
		if broken {
			continue
		}
		if w := time.Until(c.due); w > 0 {
			time.Sleep(w)
		}
		if _, err := dst.Write(c.b); err != nil {
			broken = true
			src.Close()
		}
	}
	if broken {
		dst.Close()
		return
	}
	_ = dst.CloseWrite()
}

// Close stops the line and every connection through it.
func (d *DelayLine) Close() {
	d.ln.Close()
	d.mu.Lock()
	for c := range d.conns {
		c.Close()
	}
	d.conns = nil
	d.mu.Unlock()
	d.wg.Wait()
}

// StreamsResult is what parallel downloads on one HTTP/2 connection saw.
type StreamsResult struct {
	Throughput
	// MaxGap is the longest time any stream went without a byte once
	// it had started.
	MaxGap time.Duration
}

// ParallelStreams downloads the list on n HTTP/2 streams of one connection
// at once, checks every body and records the longest pause of any stream.
// A stream starved by flow control shows as a long pause.
func ParallelStreams(ctx context.Context, t Target, be *Backend, n int) (StreamsResult, error) {
	hc := t.Client(true, 1)
	defer hc.CloseIdleConnections()
	if err := getOnce(ctx, hc, t.URL(pathSmall), 1024, nil); err != nil {
		return StreamsResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var mu sync.Mutex
	var maxGap time.Duration
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, t.URL(pathList), nil)
			resp, err := hc.Do(req)
			if err != nil {
				errs[i] = err
				return
			}
			defer resp.Body.Close()
			h := sha256.New()
			buf := make([]byte, 32<<10)
			var gap time.Duration
			last := time.Time{}
			var got int64
			for {
				k, err := resp.Body.Read(buf)
				now := time.Now()
				if k > 0 {
					if !last.IsZero() {
						gap = max(gap, now.Sub(last))
					}
					last = now
					h.Write(buf[:k])
					got += int64(k)
				}
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					errs[i] = fmt.Errorf("stream %d after %d bytes: %w", i, got, err)
					return
				}
			}
			if !bytes.Equal(h.Sum(nil), be.ListSum[:]) {
				errs[i] = fmt.Errorf("stream %d: body of %d bytes differs from the list", i, got)
				return
			}
			mu.Lock()
			maxGap = max(maxGap, gap)
			mu.Unlock()
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return StreamsResult{}, err
	}
	return StreamsResult{Throughput: Throughput{Bytes: int64(n) * int64(len(be.List)), Elapsed: time.Since(start)}, MaxGap: maxGap}, nil
}
