// Package h2splice carries a client's HTTP/2 connection, whose TLS the
// relay ended, to an upstream that speaks HTTP/2 itself, as bytes: no
// request is parsed into a request, no stream gets a goroutine, and a
// batch of requests the client wrote together leaves in one write.
//
// It reads just enough of the connection to keep it on the host it was
// opened for. The relay's certificate covers every cluster's host, and a
// browser reuses an HTTP/2 connection for any host the certificate covers
// (RFC 9113, 9.1.1): a request for another tenant's host would otherwise
// reach the tenant this connection goes to, with its cookies. So the
// frame headers of both directions are followed, every request's header
// block is decoded (HPACK), and a request for another host is held back:
// the splice answers it 421 itself, which sends a browser to a connection
// of its own for that host, and since the upstream's HPACK table now
// misses that block, the connection goes away (GOAWAY): requests that
// follow it are retried on a new connection by the client. The upstream's
// answers are not decoded.
package h2splice

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/net/http2/hpack"

	"github.com/spectroproxy/spectro-proxy/internal/hostname"
)

// Frame types and flags of RFC 9113, section 6.
const (
	frameHeaderLen = 9

	typeData         = 0x0
	typeHeaders      = 0x1
	typeRSTStream    = 0x3
	typeSettings     = 0x4
	typePushPromise  = 0x5
	typeGoAway       = 0x7
	typeWindowUpdate = 0x8
	typeContinuation = 0x9

	flagAck        = 0x1
	flagEndStream  = 0x1
	flagEndHeaders = 0x4
	flagPadded     = 0x8
	flagPriority   = 0x20

	settingHeaderTableSize = 0x1
	// maxSettings bounds the SETTINGS payload followed for the header
	// table size: RFC 9113 defines six settings.
	maxSettings = 16 * 6

	lastStreamID = 1<<31 - 1
)

var clientPreface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

// ErrProtocol is the error of a client that broke HTTP/2's framing.
var ErrProtocol = errors.New("HTTP/2 protocol error")

// Options says which requests go through.
type Options struct {
	// Allow reports whether a request for host (lower case, no port; ""
	// when the request names none) may go on this connection.
	Allow func(host string) bool
	// Misdirected is told of each request held back (optional).
	Misdirected func(host string)
	// MaxHeaderBlock bounds a request's header block in bytes, encoded
	// (HEADERS and CONTINUATION payloads) and each decoded field alike.
	MaxHeaderBlock int
	// Extra is appended to every request's header block (not to
	// trailers): fields made by Fields, which leave HPACK's tables alone
	// on both ends, so the client's encoder and the upstream's decoder
	// stay in step. Under 16 KiB.
	Extra []byte
}

// Fields encodes fields for Options.Extra as literals never indexed: a
// field so sent enters no dynamic table.
func Fields(fields ...hpack.HeaderField) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range fields {
		f.Sensitive = true
		_ = enc.WriteField(f) // writes to a bytes.Buffer do not fail
	}
	return buf.Bytes()
}

// Conn is the client's connection as the upstream should see it: Read
// yields the client's bytes, the header blocks checked; Write sends the
// upstream's bytes to the client, between whose frames GoAway can put a
// GOAWAY. One goroutine may Read while another Writes.
type Conn struct {
	net.Conn
	opts Options
	br   *bufio.Reader
	dec  *hpack.Decoder

	// Read's state.
	prefaceDone bool
	pending     []byte // checked bytes Read has still to return
	passLeft    int    // payload bytes of the current frame to pass through
	dropLeft    int    // payload bytes of the current frame to drop
	hdr         [frameHeaderLen]byte
	block       []byte
	host        string
	sawHost     bool
	decodeErr   error
	refusing    bool   // a request was held back: new streams are dropped
	tableSize   uint32 // the decoder's allowed dynamic table size
	path        string // the :path of the block being decoded

	goneAway atomic.Bool // GoAway ran
	// lastStream is the highest stream a request went through on;
	// written by Read, read by Shut too.
	lastStream atomic.Uint32

	// upstreamTable is the upstream's SETTINGS_HEADER_TABLE_SIZE, which
	// the client's encoder may use (RFC 7541, 4.2).
	upstreamTable atomic.Uint32

	// wmu orders writes to the client; smu guards Write's state, which
	// GoAway reads, and is never held across I/O.
	wmu      sync.Mutex
	smu      sync.Mutex
	whdr     [frameHeaderLen]byte
	whdrN    int
	wLeft    int
	settings []byte // the payload of a SETTINGS frame being written, while following it
	inSet    bool
	started  bool   // the upstream's first frame (its SETTINGS) went out
	own      []byte // frames of the splice's own to send at the next frame boundary
	// streams are the requests open on the connection, by stream ID:
	// those whose client or upstream has not ended its side.
	streams map[uint32]*stream
}

// New wraps c, the client's end, once its TLS negotiated "h2".
func New(c net.Conn, opts Options) *Conn {
	s := &Conn{Conn: c, opts: opts, br: bufio.NewReaderSize(c, 16<<10), tableSize: 4096, streams: map[uint32]*stream{}}
	s.upstreamTable.Store(4096)
	s.dec = hpack.NewDecoder(4096, s.field)
	s.dec.SetMaxStringLength(opts.MaxHeaderBlock)
	return s
}

func (c *Conn) field(f hpack.HeaderField) {
	switch f.Name {
	case ":path":
		c.path = f.Value
	case ":authority":
		c.host, c.sawHost = f.Value, true
	case "host":
		if !c.sawHost {
			c.host = f.Value
		}
	}
}

// Read returns the client's bytes that may go upstream. It returns what it
// holds before it would block for more.
func (c *Conn) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		switch {
		case len(c.pending) > 0:
			k := copy(p[n:], c.pending)
			c.pending = c.pending[k:]
			n += k
		case c.passLeft > 0:
			if n > 0 && c.br.Buffered() == 0 {
				return n, nil
			}
			k, err := c.br.Read(p[n:min(len(p), n+c.passLeft)])
			n += k
			c.passLeft -= k
			if err != nil {
				return n, unexpected(err)
			}
		case c.dropLeft > 0:
			if n > 0 && c.br.Buffered() == 0 {
				return n, nil
			}
			k, err := c.br.Discard(min(c.dropLeft, max(c.br.Buffered(), 1)))
			c.dropLeft -= k
			if err != nil {
				return n, unexpected(err)
			}
		default:
			if n > 0 && !c.frameBuffered() {
				return n, nil
			}
			if err := c.next(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// frameBuffered says whether the next frame can be taken without
// blocking: its header, and for a header block the whole frame.
func (c *Conn) frameBuffered() bool {
	if !c.prefaceDone || c.br.Buffered() < frameHeaderLen {
		return false
	}
	h, _ := c.br.Peek(frameHeaderLen)
	return h[3] != typeHeaders || c.br.Buffered() >= frameHeaderLen+frameLen(h)
}

func frameLen(h []byte) int { return int(h[0])<<16 | int(h[1])<<8 | int(h[2]) }

func streamOf(h []byte) uint32 { return binary.BigEndian.Uint32(h[5:9]) & lastStreamID }

// unexpected turns an EOF inside a frame into io.ErrUnexpectedEOF: only a
// client that ends between frames ended cleanly.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// next takes the next frame: a header block whole, checked; any other
// frame's header, its payload to pass through (or drop) after it.
func (c *Conn) next() error {
	if !c.prefaceDone {
		buf := make([]byte, len(clientPreface))
		if _, err := io.ReadFull(c.br, buf); err != nil {
			return fmt.Errorf("reading the client preface: %w", err)
		}
		if !bytes.Equal(buf, clientPreface) {
			return fmt.Errorf("%w: the connection does not start with HTTP/2's client preface", ErrProtocol)
		}
		c.prefaceDone = true
		c.pending = buf
		return nil
	}
	if _, err := io.ReadFull(c.br, c.hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return io.EOF
		}
		return unexpected(err)
	}
	length, typ, sid := frameLen(c.hdr[:]), c.hdr[3], streamOf(c.hdr[:])
	switch typ {
	case typeHeaders:
		return c.headerBlock(length)
	case typeContinuation:
		return fmt.Errorf("%w: CONTINUATION on stream %d outside a header block", ErrProtocol, sid)
	case typePushPromise:
		return fmt.Errorf("%w: PUSH_PROMISE from a client", ErrProtocol)
	}
	if c.refusing && sid > c.lastStream.Load() {
		// A frame of a stream that was held back (its body, say). What
		// a body takes of the connection's window the upstream never
		// gives back: the splice does, or the requests still open on
		// the connection could stall for it.
		c.dropLeft = length
		if typ == typeData && length > 0 {
			c.send(frame(typeWindowUpdate, 0, 0, binary.BigEndian.AppendUint32(nil, uint32(length))))
		}
		return nil
	}
	if typ == typeRSTStream || (typ == typeData && c.hdr[4]&flagEndStream != 0) {
		c.ended(sid, true, typ == typeRSTStream)
	}
	c.pending, c.passLeft = c.hdr[:], length
	return nil
}

// headerBlock reads a HEADERS frame and its CONTINUATIONs, decodes the
// block and decides whether it goes through.
func (c *Conn) headerBlock(length int) error {
	first := c.hdr
	sid := streamOf(first[:])
	if ts := c.upstreamTable.Load(); ts != c.tableSize {
		c.dec.SetAllowedMaxDynamicTableSize(ts)
		c.tableSize = ts
	}
	c.host, c.sawHost, c.decodeErr, c.path = "", false, nil, ""
	c.block = append(c.block[:0], first[:]...)
	flags := first[4]
	last := 0 // where the block's last frame header is in c.block
	for {
		if len(c.block)+length > c.opts.MaxHeaderBlock+frameHeaderLen {
			return fmt.Errorf("%w: a header block on stream %d over %d bytes", ErrProtocol, sid, c.opts.MaxHeaderBlock)
		}
		start := len(c.block)
		c.block = append(c.block, make([]byte, length)...)
		if _, err := io.ReadFull(c.br, c.block[start:]); err != nil {
			return unexpected(err)
		}
		frag := c.block[start:]
		if c.block[start-frameHeaderLen+3] == typeHeaders {
			var err error
			if frag, err = fragment(frag, flags); err != nil {
				return fmt.Errorf("%w: HEADERS on stream %d: %v", ErrProtocol, sid, err)
			}
		}
		if _, err := c.dec.Write(frag); err != nil && c.decodeErr == nil {
			c.decodeErr = err
		}
		if flags&flagEndHeaders != 0 {
			break
		}
		var h [frameHeaderLen]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return unexpected(err)
		}
		if h[3] != typeContinuation || streamOf(h[:]) != sid {
			return fmt.Errorf("%w: a header block on stream %d interrupted by a frame of type %d", ErrProtocol, sid, h[3])
		}
		last = len(c.block)
		c.block = append(c.block, h[:]...)
		length, flags = frameLen(h[:]), h[4]
	}
	if err := c.dec.Close(); err != nil && c.decodeErr == nil {
		c.decodeErr = err
	}
	if c.decodeErr != nil {
		// The upstream would fail the connection as well; without the
		// block decoded there is no telling where it goes.
		return fmt.Errorf("%w: decoding the header block of stream %d: %v", ErrProtocol, sid, c.decodeErr)
	}
	newStream := sid > c.lastStream.Load()
	if !newStream && first[4]&flagEndStream != 0 {
		c.ended(sid, true, false) // trailers
	}
	if newStream && c.refusing {
		return nil // the client had been told to go away
	}
	if host := canonicalHost(c.host); newStream && !c.opts.Allow(host) {
		// Answered 421 here (a client that chose this connection's name
		// itself gets the answer, not a retry on a connection like it),
		// and the connection goes away: the block is not forwarded, so
		// the upstream's HPACK table no longer matches the client's, and
		// no other request may follow it there.
		c.refusing = true
		if c.opts.Misdirected != nil {
			c.opts.Misdirected(host)
		}
		c.send(misdirected(sid), goAway(sid))
		return nil
	}
	if newStream {
		c.lastStream.Store(sid)
		c.smu.Lock()
		c.streams[sid] = &stream{path: c.path, local: first[4]&flagEndStream != 0}
		c.smu.Unlock()
		if len(c.opts.Extra) > 0 {
			// The fields go in a CONTINUATION of their own, which fits
			// any frame size the upstream allows.
			c.block[last+4] &^= flagEndHeaders
			c.block = appendFrame(c.block, typeContinuation, flagEndHeaders, sid, c.opts.Extra)
		}
	}
	c.pending = c.block
	return nil
}

// fragment is a HEADERS payload's header block fragment: without padding
// and priority fields.
func fragment(p []byte, flags byte) ([]byte, error) {
	pad := 0
	if flags&flagPadded != 0 {
		if len(p) < 1 {
			return nil, errors.New("padded frame without its pad length")
		}
		pad, p = int(p[0]), p[1:]
	}
	if flags&flagPriority != 0 {
		if len(p) < 5 {
			return nil, errors.New("priority fields cut short")
		}
		p = p[5:]
	}
	if pad > len(p) {
		return nil, errors.New("padding longer than the payload")
	}
	return p[:len(p)-pad], nil
}

// canonicalHost is host without its port, in hostname's canonical form.
func canonicalHost(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	return hostname.Canonical(h)
}

// GoAway tells the client, at the next frame boundary, to open no more
// streams on this connection (a GOAWAY naming the highest stream ID, as a
// server that shuts down gracefully first does); the streams open go on.
// Calls after the first do nothing; only the first returns true.
func (c *Conn) GoAway() bool {
	if c.goneAway.Swap(true) {
		return false
	}
	c.send(goAway(lastStreamID))
	return true
}

// Shut ends the connection as a server that shuts down gracefully does
// (RFC 9113, 6.8): a GOAWAY naming the last stream that went upstream, so
// that the client retries elsewhere any request it sent after that,
// then the close. Call it a round trip or more after GoAway. It does not
// wait for a client that does not read.
func (c *Conn) Shut() {
	c.smu.Lock()
	c.own = append(c.own, goAway(c.lastStream.Load())...)
	c.smu.Unlock()
	go func() {
		c.flushOwn()
		c.Conn.Close()
	}()
}

// frame is an HTTP/2 frame.
func frame(typ, flags byte, sid uint32, payload []byte) []byte {
	return appendFrame(nil, typ, flags, sid, payload)
}

// appendFrame appends an HTTP/2 frame to dst.
func appendFrame(dst []byte, typ, flags byte, sid uint32, payload []byte) []byte {
	dst = append(dst, byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload)), typ, flags)
	dst = binary.BigEndian.AppendUint32(dst, sid)
	return append(dst, payload...)
}

// goAway is a GOAWAY (NO_ERROR) naming last.
func goAway(last uint32) []byte {
	return frame(typeGoAway, 0, 0, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, last), 0))
}

// misdirected answers stream sid 421 (RFC 9110, 15.5.20). The header block
// is ":status: 421" as a literal not indexed (0x08: the name is static
// entry 8), which changes no HPACK table.
func misdirected(sid uint32) []byte {
	return frame(typeHeaders, flagEndHeaders|flagEndStream, sid, []byte{0x08, 3, '4', '2', '1'})
}

// send queues frames of the splice's own for the client. They are not
// written from the caller's goroutine, which may be Read's: a client
// blocked writing to us may not read until Read goes on, and a Write under
// way may be blocked on that client. The goroutine ends once the frames
// are written, or with the connection; Write sends them first if it
// reaches a frame boundary first.
func (c *Conn) send(frames ...[]byte) {
	c.smu.Lock()
	for _, f := range frames {
		c.own = append(c.own, f...)
	}
	c.smu.Unlock()
	go c.flushOwn()
}

// flushOwn writes the splice's frames waiting, unless an upstream frame is
// under way (Write sends them when it ends).
func (c *Conn) flushOwn() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if f := c.takeOwn(); f != nil {
		_, _ = c.Conn.Write(f) // a failed write fails the upstream's next one too
	}
}

// takeOwn returns the splice's frames waiting, if they can go now: after
// the upstream's SETTINGS (the server's preface comes first) and between
// its frames.
func (c *Conn) takeOwn() []byte {
	c.smu.Lock()
	defer c.smu.Unlock()
	if c.own == nil || !c.started || c.whdrN != 0 || c.wLeft != 0 {
		return nil
	}
	f := c.own
	c.own = nil
	return f
}

// Write sends the upstream's bytes to the client, following their frames.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	written := 0
	for len(p) > 0 {
		c.smu.Lock()
		k := c.scan(p, c.own != nil)
		c.smu.Unlock()
		n, err := c.Conn.Write(p[:k])
		written += n
		if err != nil {
			return written, err
		}
		p = p[k:]
		if f := c.takeOwn(); f != nil {
			if _, err := c.Conn.Write(f); err != nil {
				return written, err
			}
		}
	}
	return written, nil
}

// scan follows the frames in p and returns how much of p to write: all of
// it, or with stop up to the end of the first frame that ends in it.
func (c *Conn) scan(p []byte, stop bool) int {
	i := 0
	for i < len(p) {
		if c.wLeft > 0 {
			k := min(c.wLeft, len(p)-i)
			if c.inSet && len(c.settings)+k <= maxSettings {
				c.settings = append(c.settings, p[i:i+k]...)
			}
			c.wLeft -= k
			i += k
			if c.wLeft == 0 {
				c.frameDone()
				if stop {
					return i
				}
			}
			continue
		}
		k := min(frameHeaderLen-c.whdrN, len(p)-i)
		copy(c.whdr[c.whdrN:], p[i:i+k])
		c.whdrN += k
		i += k
		if c.whdrN < frameHeaderLen {
			continue
		}
		c.whdrN = 0
		c.wLeft = frameLen(c.whdr[:])
		c.inSet = c.whdr[3] == typeSettings && c.whdr[4]&flagAck == 0 && c.wLeft <= maxSettings
		if t := c.whdr[3]; t == typeRSTStream || ((t == typeData || t == typeHeaders) && c.whdr[4]&flagEndStream != 0) {
			c.endedLocked(streamOf(c.whdr[:]), false, t == typeRSTStream)
		}
		c.settings = c.settings[:0]
		if c.wLeft == 0 {
			c.frameDone()
			if stop {
				return i
			}
		}
	}
	return i
}

// frameDone ends a frame the upstream wrote; a SETTINGS frame's header
// table size is the client encoder's limit from now on.
func (c *Conn) frameDone() {
	c.started = true
	if !c.inSet {
		return
	}
	c.inSet = false
	for s := c.settings; len(s) >= 6; s = s[6:] {
		if binary.BigEndian.Uint16(s) == settingHeaderTableSize {
			c.upstreamTable.Store(binary.BigEndian.Uint32(s[2:6]))
		}
	}
}

// CloseWrite half-closes the client's connection when it can.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// stream is a request open on the connection: which sides have ended.
type stream struct {
	path          string
	local, remote bool // the client's side, the upstream's
}

// ended notes that a side of stream sid ended (reset: both).
func (c *Conn) ended(sid uint32, client, reset bool) {
	c.smu.Lock()
	defer c.smu.Unlock()
	c.endedLocked(sid, client, reset)
}

func (c *Conn) endedLocked(sid uint32, client, reset bool) {
	st, ok := c.streams[sid]
	if !ok {
		return
	}
	if client {
		st.local = true
	} else {
		st.remote = true
	}
	if reset || (st.local && st.remote) {
		delete(c.streams, sid)
	}
}

// Open counts the requests open on the connection: those whose path
// staysOpen says never end by themselves (a watch, logs -f), and the rest.
func (c *Conn) Open(staysOpen func(path string) bool) (plain, streamed int) {
	c.smu.Lock()
	defer c.smu.Unlock()
	for _, st := range c.streams {
		if staysOpen(st.path) {
			streamed++
		} else {
			plain++
		}
	}
	return plain, streamed
}
