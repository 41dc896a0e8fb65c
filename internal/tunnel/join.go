package tunnel

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
)

// Copy buffers come in two sizes. A connection that is mostly idle (a
// watch, an exec session) blocks in Read for most of its life holding its
// buffer, so it gets a small one; once a read fills the small buffer, more
// is queued behind it and the copy moves to a large one, which cuts the
// syscalls, HTTP/2 DATA frames and WebSocket messages per byte. A short read
// hands the large buffer back before the next, probably blocking, Read.
// (make bench, in-process, 10 MiB over one passthrough stream: see the
// commit that introduced this.) A copy whose destination stalls holds its
// large buffer until the write-stall timeout, on relay and agent both, so
// it is 128 KiB, not 256: two A/B runs of make bench's bulk figures (3
// repetitions each) could not tell the two apart, and 32 never-reading
// streams, one source's most, pin 8 MiB less.
const (
	smallCopy = 16 << 10
	largeCopy = 128 << 10
)

var (
	smallBufs = sync.Pool{New: func() any { b := make([]byte, smallCopy); return &b }}
	largeBufs = sync.Pool{New: func() any { b := make([]byte, largeCopy); return &b }}
)

// Copy copies src to dst until EOF like io.Copy, with pooled buffers sized
// by how busy src is. It never uses src's WriterTo or dst's ReaderFrom:
// for TCP and TLS connections those fall back to io.Copy with a fresh
// 32 KiB buffer per call.
func Copy(dst io.Writer, src io.Reader) (written int64, err error) {
	small := smallBufs.Get().(*[]byte)
	defer smallBufs.Put(small)
	var large *[]byte
	defer func() {
		if large != nil {
			largeBufs.Put(large)
		}
	}()
	buf := *small
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			written += int64(w)
			if werr != nil {
				return written, werr
			}
			if w != n {
				return written, io.ErrShortWrite
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return written, nil
			}
			return written, rerr
		}
		switch {
		case n == len(buf) && large == nil:
			large = largeBufs.Get().(*[]byte)
			buf = *large
		case n < smallCopy && large != nil:
			largeBufs.Put(large)
			large = nil
			buf = *small
		}
	}
}

// closeWriter is implemented by *net.TCPConn, *tls.Conn and our stream types.
type closeWriter interface{ CloseWrite() error }

// CloseWrite half-closes c when it can, so that EOF travels on while the
// other direction keeps flowing; otherwise it closes c.
func CloseWrite(c io.Closer) error {
	if cw, ok := c.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// sourceTaker is a Stream (or a type embedding one): it can read a source
// itself instead of being written to. (takesSource keeps *net.TCPConn,
// whose ReadFrom is io.Copy with a fresh buffer, out.)
type sourceTaker interface {
	ReadFrom(src io.Reader) (int64, error)
	takesSource()
}

// Join copies bytes both ways between a and b until both directions end,
// half-closing each destination when its source hits EOF. It closes both
// when done and returns the bytes moved a→b and b→a, and the first error
// that was not a plain close. An a that cannot half-close (the agent's end
// of a stream, whose response only ends with its handler) ends the join
// when b's side ends: both are closed then.
func Join(a, b io.ReadWriteCloser) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var errAB, errBA error
	wg.Add(1)
	go func() {
		defer wg.Done()
		if rf, ok := b.(sourceTaker); ok {
			aToB, errAB = rf.ReadFrom(a)
		} else {
			aToB, errAB = Copy(b, a)
		}
		if errAB != nil {
			// A broken direction means the whole connection is gone:
			// closing both unblocks the other copy.
			a.Close()
			b.Close()
			return
		}
		CloseWrite(b)
	}()
	bToA, errBA = Copy(a, b)
	if _, halfCloses := a.(closeWriter); errBA != nil || !halfCloses {
		a.Close()
		b.Close()
	} else {
		CloseWrite(a)
	}
	wg.Wait()
	a.Close()
	b.Close()
	return aToB, bToA, firstReal(errAB, errBA)
}

func firstReal(errs ...error) error {
	for _, err := range errs {
		if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.ErrClosedPipe) {
			return err
		}
	}
	return nil
}

// ProxyBuffers is the copy-buffer pool of the relay's and the agent's
// reverse proxies (terminate mode). Without one, ReverseProxy allocates a
// 32 KiB buffer per response, which at thousands of small requests per
// second is most of the garbage both processes make. The size stays
// ReverseProxy's own: a watch holds its buffer for as long as it runs.
var ProxyBuffers httputil.BufferPool = proxyBuffers{}

type proxyBuffers struct{}

var proxyBufs = sync.Pool{New: func() any { return make([]byte, 32<<10) }}

func (proxyBuffers) Get() []byte { return proxyBufs.Get().([]byte) }

// Put boxes the slice header (a few bytes) to pool a 32 KiB buffer.
//
//lint:ignore SA6002 the interface is httputil.BufferPool's; the box costs 24 bytes, the buffer 32 KiB
func (proxyBuffers) Put(b []byte) { proxyBufs.Put(b) }

// ResponseBuffers is the copy-buffer pool of one proxied response: Size,
// called from ModifyResponse, gives a body of known length of at least
// largeCopy the large buffers Copy moves bulk with, and everything else
// (watches, logs -f, small answers) ProxyBuffers' 32 KiB. ReverseProxy
// takes its buffer after ModifyResponse, so a watch still holds 32 KiB
// for as long as it runs, while a download moves in 128 KiB reads: 4
// times fewer HTTP/2 DATA frames, WebSocket messages, window updates and
// wakeups per byte between relay and agent.
type ResponseBuffers struct{ large bool }

var _ httputil.BufferPool = (*ResponseBuffers)(nil)

// Size picks the buffer for resp's body.
func (b *ResponseBuffers) Size(resp *http.Response) { b.large = resp.ContentLength >= largeCopy }

func (b *ResponseBuffers) Get() []byte {
	if b.large {
		return *largeBufs.Get().(*[]byte)
	}
	return ProxyBuffers.Get()
}

func (b *ResponseBuffers) Put(buf []byte) {
	if cap(buf) == largeCopy {
		buf = buf[:largeCopy]
		largeBufs.Put(&buf)
		return
	}
	ProxyBuffers.Put(buf)
}
