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
// header blocks are decoded too, for the cookies its answers set: a
// cookie whose Domain names the relay's domain would reach every tenant's
// hosts, so its Domain is hidden (see Write). Bodies pass as they come.
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
	"github.com/spectroproxy/spectro-proxy/internal/setcookie"
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
	// the client's encoder may use (RFC 7541, 4.2); clientTable the
	// client's, which the upstream's encoder may use.
	upstreamTable atomic.Uint32
	clientTable   atomic.Uint32

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

	// The upstream's header blocks, held whole (answers' cookies, see
	// Write).
	rdec       *hpack.Decoder
	rtable     uint32 // the table size rdec allows
	collecting bool   // a header block is under way
	blockEnds  bool   // its frame under way has END_HEADERS
	rblock     []byte // its frames so far
	rfrag      []byte // its fragments joined
	nfield     int    // fields decoded from it so far
	cookies    []int  // which of them are cookies with a Domain
	// streams are the requests open on the connection, by stream ID:
	// those whose client or upstream has not ended its side.
	streams map[uint32]*stream
}

// New wraps c, the client's end, once its TLS negotiated "h2".
func New(c net.Conn, opts Options) *Conn {
	s := &Conn{Conn: c, opts: opts, br: bufio.NewReaderSize(c, 16<<10), tableSize: 4096, streams: map[uint32]*stream{}}
	s.upstreamTable.Store(4096)
	s.clientTable.Store(4096)
	s.dec = hpack.NewDecoder(4096, s.field)
	s.dec.SetMaxStringLength(opts.MaxHeaderBlock)
	s.rtable = 4096
	s.rdec = hpack.NewDecoder(4096, s.answerField)
	s.rdec.SetMaxStringLength(maxAnswerBlock)
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
	return (h[3] != typeHeaders && h[3] != typeSettings) || c.br.Buffered() >= frameHeaderLen+frameLen(h)
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
	if typ == typeSettings && c.hdr[4]&flagAck == 0 && length <= maxSettings {
		// The client's header table size bounds the upstream's encoder,
		// whose blocks Write decodes.
		f := make([]byte, frameHeaderLen+length)
		copy(f, c.hdr[:])
		if _, err := io.ReadFull(c.br, f[frameHeaderLen:]); err != nil {
			return unexpected(err)
		}
		for s := f[frameHeaderLen:]; len(s) >= 6; s = s[6:] {
			if binary.BigEndian.Uint16(s) == settingHeaderTableSize {
				c.clientTable.Store(binary.BigEndian.Uint32(s[2:6]))
			}
		}
		c.pending = f
		return nil
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
	if host := hostname.OfAuthority(c.host); newStream && !c.opts.Allow(host) {
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
	if c.own == nil || !c.started || c.whdrN != 0 || c.wLeft != 0 || c.collecting {
		return nil
	}
	f := c.own
	c.own = nil
	return f
}

// Write sends the upstream's bytes to the client, following their frames.
// Its header blocks are held until whole and decoded (HPACK), so that a
// cookie it sets stays on the host that set it (see setcookie): the
// Domain attribute of a Set-Cookie is renamed, which keeps the field's
// length, and with it the two ends' HPACK tables in step. Other frames
// pass as they come.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	total := len(p)
	// A held header block goes out in one write with what follows it in
	// p, as a batch of answers came: one TLS record, not one per block.
	var buf *[]byte
	defer func() {
		if buf != nil {
			*buf = (*buf)[:0]
			writeBufs.Put(buf)
		}
	}()
	for len(p) > 0 {
		c.smu.Lock()
		sc := c.scan(p, c.own != nil)
		c.smu.Unlock()
		out := p[sc.from:sc.pass]
		if len(sc.held) > 0 || sc.block != nil || (buf != nil && len(*buf) > 0) {
			if buf == nil {
				buf = writeBufs.Get().(*[]byte)
			}
			*buf = append(append(append(*buf, sc.held...), out...), sc.block...)
			out = *buf
		}
		p = p[sc.took:]
		if sc.block != nil && sc.err == nil && len(p) > 0 {
			continue
		}
		if len(out) > 0 {
			if _, err := c.Conn.Write(out); err != nil {
				return total - len(p), err
			}
		}
		if buf != nil {
			*buf = (*buf)[:0]
		}
		if sc.err != nil {
			return total - len(p), sc.err
		}
		if f := c.takeOwn(); f != nil {
			if _, err := c.Conn.Write(f); err != nil {
				return total - len(p), err
			}
		}
	}
	return total, nil
}

var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 32<<10); return &b }}

// scanned is what scan found: write held (a frame header that straddled
// two writes), then p[from:pass], then block (a header block made whole);
// took bytes of p are done with.
type scanned struct {
	held             []byte
	from, pass, took int
	block            []byte
	err              error
}

// scan follows the frames in p: up to its end, to a header block made
// whole, or with stop to the end of the first frame that ends in it.
func (c *Conn) scan(p []byte, stop bool) scanned {
	var sc scanned
	i := 0
	pass := func() { // p so far goes out, unless it is held in a block
		if !c.collecting {
			sc.pass = i
		}
	}
	for i < len(p) {
		if c.wLeft > 0 {
			k := min(c.wLeft, len(p)-i)
			switch {
			case c.collecting:
				if len(c.rblock)+k > maxAnswerBlock+frameHeaderLen {
					sc.took, sc.err = i, fmt.Errorf("%w: a header block over %d bytes", ErrUpstream, maxAnswerBlock)
					return sc
				}
				c.rblock = append(c.rblock, p[i:i+k]...)
			case c.inSet && len(c.settings)+k <= maxSettings:
				c.settings = append(c.settings, p[i:i+k]...)
			}
			c.wLeft -= k
			i += k
			pass()
			if c.wLeft > 0 {
				continue
			}
			if c.collecting {
				if c.blockEnds {
					sc.block, sc.err = c.answerBlock()
					sc.took = i
					return sc
				}
				continue
			}
			c.frameDone()
			if stop {
				sc.took = i
				return sc
			}
			continue
		}
		// A frame header: whole in p, or held until it is.
		if c.whdrN == 0 && len(p)-i < frameHeaderLen {
			c.whdrN = copy(c.whdr[:], p[i:])
			sc.took = len(p)
			return sc
		}
		var h []byte
		held := c.whdrN > 0
		if held {
			k := copy(c.whdr[c.whdrN:], p[i:])
			c.whdrN += k
			i += k
			if c.whdrN < frameHeaderLen {
				sc.took = i
				return sc
			}
			h = c.whdr[:]
		} else {
			h = p[i : i+frameHeaderLen]
			i += frameHeaderLen
		}
		c.whdrN = 0
		t := h[3]
		c.wLeft = frameLen(h)
		if t == typeRSTStream || ((t == typeData || t == typeHeaders) && h[4]&flagEndStream != 0) {
			c.endedLocked(streamOf(h), false, t == typeRSTStream)
		}
		switch {
		case t == typePushPromise:
			sc.took, sc.err = i, fmt.Errorf("%w: PUSH_PROMISE", ErrUpstream)
			return sc
		case c.collecting && t != typeContinuation:
			sc.took, sc.err = i, fmt.Errorf("%w: a frame of type %d inside a header block", ErrUpstream, t)
			return sc
		case t == typeHeaders || t == typeContinuation:
			if !c.collecting {
				if t == typeContinuation {
					sc.took, sc.err = i, fmt.Errorf("%w: CONTINUATION outside a header block", ErrUpstream)
					return sc
				}
				if held {
					sc.from, sc.pass = i, i
				} else {
					sc.pass = i - frameHeaderLen
				}
				c.collecting = true
				c.rblock = c.rblock[:0]
			}
			c.rblock = append(c.rblock, h...)
			c.blockEnds = h[4]&flagEndHeaders != 0
			if c.wLeft == 0 && c.blockEnds {
				sc.block, sc.err = c.answerBlock()
				sc.took = i
				return sc
			}
			continue
		}
		if held {
			// Its tail in p goes out with it.
			sc.held, sc.from = append([]byte(nil), h...), i
		}
		c.inSet = t == typeSettings && h[4]&flagAck == 0 && c.wLeft <= maxSettings
		c.settings = c.settings[:0]
		pass()
		if c.wLeft == 0 {
			c.frameDone()
			if stop {
				sc.took = i
				return sc
			}
		}
	}
	sc.took = i
	return sc
}

// maxAnswerBlock bounds an answer's header block, as the
// request-by-request path bounds an answer's header section
// (tunnel.MaxResponseHeaderBytes), and maxAnswerTable the HPACK table the
// upstream may make the relay keep for its answers.
const (
	maxAnswerBlock = 1 << 20
	maxAnswerTable = 64 << 10
)

// ErrUpstream is the error of an upstream that broke HTTP/2's framing or
// header compression.
var ErrUpstream = errors.New("upstream broke HTTP/2")

func (c *Conn) answerField(f hpack.HeaderField) {
	if f.Name == "set-cookie" && setcookie.HasDomain([]byte(f.Value)) {
		c.cookies = append(c.cookies, c.nfield)
	}
	c.nfield++
}

// answerBlock decodes the header block held in rblock and returns its
// frames as they go to the client.
func (c *Conn) answerBlock() ([]byte, error) {
	c.collecting = false
	c.started = true
	frag := c.rfrag[:0]
	first := c.rblock[:frameHeaderLen]
	for b := c.rblock; len(b) > 0; {
		n := frameLen(b)
		payload := b[frameHeaderLen : frameHeaderLen+n]
		if b[3] == typeHeaders {
			var err error
			if payload, err = fragment(payload, b[4]); err != nil {
				return nil, fmt.Errorf("%w: %w", ErrUpstream, err)
			}
		}
		frag = append(frag, payload...)
		b = b[frameHeaderLen+n:]
	}
	c.rfrag = frag
	if ts := min(c.clientTable.Load(), maxAnswerTable); ts != c.rtable {
		c.rdec.SetAllowedMaxDynamicTableSize(ts)
		c.rtable = ts
	}
	c.nfield, c.cookies = 0, c.cookies[:0]
	if _, err := c.rdec.Write(frag); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUpstream, err)
	}
	if err := c.rdec.Close(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUpstream, err)
	}
	if len(c.cookies) == 0 {
		return c.rblock, nil
	}
	frag, err := hideCookieDomains(frag, c.cookies)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUpstream, err)
	}
	// The block again, unpadded and without priority (advisory, and
	// deprecated by RFC 9113), in frames no client refuses.
	var out []byte
	typ, flags := byte(typeHeaders), first[4]&flagEndStream
	for {
		n := min(len(frag), 16384)
		f := flags
		if n == len(frag) {
			f |= flagEndHeaders
		}
		out = appendFrame(out, typ, f, streamOf(first), frag[:n])
		frag = frag[n:]
		if len(frag) == 0 {
			return out, nil
		}
		typ, flags = typeContinuation, 0
	}
}

// hideCookieDomains rewrites a header block whose fields at the indexes
// in marks (in order) are cookies with a Domain: each of those that came
// as a literal comes again as a plain literal of the same representation
// with the Domain hidden. One that came from the dynamic table is left:
// the client's entry was made from the rewritten literal.
func hideCookieDomains(block []byte, marks []int) ([]byte, error) {
	out := make([]byte, 0, len(block)+16)
	field := 0
	for b := block; len(b) > 0; {
		var prefix int
		switch {
		case b[0]&0x80 != 0: // indexed
			_, n, err := hpackInt(b, 7)
			if err != nil {
				return nil, err
			}
			out = append(out, b[:n]...)
			b = b[n:]
			if len(marks) > 0 && marks[0] == field {
				marks = marks[1:] // the client's entry has it hidden
			}
			field++
			continue
		case b[0]&0xe0 == 0x20: // dynamic table size update
			_, n, err := hpackInt(b, 5)
			if err != nil {
				return nil, err
			}
			out = append(out, b[:n]...)
			b = b[n:]
			continue
		case b[0]&0xc0 == 0x40: // literal, indexed after
			prefix = 6
		default: // literal, not indexed or never indexed
			prefix = 4
		}
		idx, pos, err := hpackInt(b, prefix)
		if err != nil {
			return nil, err
		}
		if idx == 0 { // a literal name
			n, err := hpackString(b[pos:])
			if err != nil {
				return nil, err
			}
			pos += n
		}
		start := pos
		n, err := hpackString(b[pos:])
		if err != nil {
			return nil, err
		}
		pos += n
		if len(marks) > 0 && marks[0] == field {
			marks = marks[1:]
			v, err := stringValue(b[start:pos])
			if err != nil {
				return nil, err
			}
			setcookie.HideDomain(v)
			out = append(out, b[:start]...)
			out = appendHpackInt(out, 0, 7, uint64(len(v)))
			out = append(out, v...)
		} else {
			out = append(out, b[:pos]...)
		}
		b = b[pos:]
		field++
	}
	return out, nil
}

// hpackInt decodes an integer with an n-bit prefix (RFC 7541, 5.1) and
// returns it and its length.
func hpackInt(b []byte, n int) (uint64, int, error) {
	mask := uint64(1)<<n - 1
	v := uint64(b[0]) & mask
	if v < mask {
		return v, 1, nil
	}
	for i, m := 1, 0; i < len(b) && m <= 56; i, m = i+1, m+7 {
		v += uint64(b[i]&0x7f) << m
		if b[i]&0x80 == 0 {
			return v, i + 1, nil
		}
	}
	return 0, 0, errors.New("bad HPACK integer")
}

// hpackString returns the length of the string literal at the start of b.
func hpackString(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, errors.New("HPACK string missing")
	}
	l, n, err := hpackInt(b, 7)
	if err != nil {
		return 0, err
	}
	if uint64(len(b)-n) < l {
		return 0, errors.New("HPACK string cut short")
	}
	return n + int(l), nil
}

// stringValue decodes a string literal (Huffman-coded or not).
func stringValue(b []byte) ([]byte, error) {
	_, n, err := hpackInt(b, 7)
	if err != nil {
		return nil, err
	}
	if b[0]&0x80 == 0 {
		return append([]byte(nil), b[n:]...), nil
	}
	var buf bytes.Buffer
	if _, err := hpack.HuffmanDecode(&buf, b[n:]); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// appendHpackInt appends v with an n-bit prefix, first's high bits set.
func appendHpackInt(dst []byte, first byte, n int, v uint64) []byte {
	mask := uint64(1)<<n - 1
	if v < mask {
		return append(dst, first|byte(v))
	}
	dst = append(dst, first|byte(mask))
	for v -= mask; v >= 128; v >>= 7 {
		dst = append(dst, byte(v&0x7f)|0x80)
	}
	return append(dst, byte(v))
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
