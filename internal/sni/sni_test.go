package sni

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clientHello records the first flight of a real crypto/tls client.
func clientHello(t testing.TB, serverName string) []byte {
	t.Helper()
	c1, c2 := net.Pipe()
	done := make(chan []byte)
	go func() {
		buf := make([]byte, maxHello)
		n, _ := io.ReadAtLeast(c2, buf, 5)
		for n < 5+int(buf[3])<<8|int(buf[4]) {
			m, err := c2.Read(buf[n:])
			if err != nil {
				break
			}
			n += m
		}
		c2.Close()
		done <- buf[:n]
	}()
	cl := tls.Client(c1, &tls.Config{ServerName: serverName, InsecureSkipVerify: serverName == ""})
	_ = cl.Handshake()
	c1.Close()
	return <-done
}

func TestServerName(t *testing.T) {
	tests := []struct {
		name    string
		input   func(t *testing.T) []byte
		want    string
		wantErr error
	}{
		{"cluster label", func(t *testing.T) []byte { return clientHello(t, "cluster-abc.proxy.test") }, "cluster-abc.proxy.test", nil},
		{"no server name", func(t *testing.T) []byte { return clientHello(t, "") }, "", nil},
		{"http request", func(*testing.T) []byte { return []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n") }, "", ErrNotTLS},
		{"zero length record", func(*testing.T) []byte { return []byte{0x16, 3, 1, 0, 0} }, "", ErrNotTLS},
		{"garbage handshake", func(*testing.T) []byte { return append([]byte{0x16, 3, 1, 0, 4}, 1, 0, 0, 0) }, "", ErrNotTLS},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.input(t)
			br := bufio.NewReaderSize(bytes.NewReader(in), maxHello)
			got, err := ServerName(br)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			// Peeking must not consume: every byte is still there.
			rest, err := io.ReadAll(br)
			require.NoError(t, err)
			assert.Equal(t, in, rest)
		})
	}
}

func TestPeekReplaysBytes(t *testing.T) {
	hello := clientHello(t, "cluster-x.proxy.test")
	c1, c2 := net.Pipe()
	defer c1.Close()
	go func() {
		c2.Write(hello)
		c2.Write([]byte("tail"))
		c2.Close()
	}()
	name, pc, err := Peek(c1, time.Second)
	require.NoError(t, err)
	assert.Equal(t, "cluster-x.proxy.test", name)
	all, err := io.ReadAll(pc)
	require.NoError(t, err)
	assert.Equal(t, append(hello, "tail"...), all)
	assert.Nil(t, pc.pending, "replayed bytes must not stay pinned for the connection's life")
}

func TestPeekTimesOut(t *testing.T) {
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	start := time.Now()
	_, _, err := Peek(c1, 50*time.Millisecond)
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "want a timeout, got %v", err)
	assert.Less(t, time.Since(start), 5*time.Second)
}

func TestPeekBoundsMemory(t *testing.T) {
	// A record header claiming more than a TLS record may hold is refused
	// before any of it is buffered.
	br := bufio.NewReaderSize(bytes.NewReader([]byte{0x16, 3, 1, 0xff, 0xff}), maxHello)
	_, err := ServerName(br)
	require.ErrorIs(t, err, ErrNotTLS)
}

func FuzzServerName(f *testing.F) {
	f.Add(clientHello(f, "cluster-abc.proxy.test"))
	f.Add(clientHello(f, ""))
	f.Add([]byte{0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(in), maxHello)
		name, err := ServerName(br)
		if err != nil && name != "" {
			t.Fatalf("name %q returned with error %v", name, err)
		}
		rest, _ := io.ReadAll(br)
		if !bytes.Equal(rest, in) {
			t.Fatalf("peek consumed bytes")
		}
	})
}
