package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"
)

// bufPool holds copy buffers. 32 KiB matches io.Copy; larger buffers did not
// help because HTTP/2 DATA frames are 16 KiB by default.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// Copy is io.Copy with a pooled buffer.
func Copy(dst io.Writer, src io.Reader) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	return io.CopyBuffer(dst, src, *bp)
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

// Join copies bytes both ways between a and b until both directions end,
// half-closing each destination when its source hits EOF. It closes both
// when done and returns the bytes moved a→b and b→a, and the first error
// that was not a plain close.
func Join(a, b io.ReadWriteCloser) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var errAB, errBA error
	wg.Add(1)
	go func() {
		defer wg.Done()
		aToB, errAB = Copy(b, a)
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
	if errBA != nil {
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
