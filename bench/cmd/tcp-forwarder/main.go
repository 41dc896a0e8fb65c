// Command tcp-forwarder is the benchmark's floor: the least a relay process
// can do, copying bytes between two connections with one goroutine per
// direction. Two of them chained stand where the relay and the agent stand,
// so `make bench` can show how much of the proxy's cost is the two extra
// processes on the path and how much is Spectro Proxy's own. With TLS
// between the two (--tls-listen on the agent's side, --tls-to on the
// relay's), the pair is the least an encrypted tunnel can cost.
//
//	tcp-forwarder --to 127.0.0.1:6443 [--tls-listen DIR] [--tls-to CA_FILE]
//
// It listens on 127.0.0.1 (a free port) and logs {"msg":"listening","addr":...}.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
	"github.com/spectroproxy/spectro-proxy/internal/procs"
	"github.com/spectroproxy/spectro-proxy/internal/sysmon"
)

func main() {
	fs := flag.NewFlagSet("tcp-forwarder", flag.ContinueOnError)
	to := fs.String("to", "", "The address to forward every connection to (host:port).")
	tlsListen := fs.String("tls-listen", "", "Serve TLS, with a new CA and a certificate for 127.0.0.1 written to this directory (ca.crt).")
	tlsTo := fs.String("tls-to", "", "Dial --to with TLS, trusting this CA file (server name 127.0.0.1).")
	// The floor runs on the same runtime settings as relay and agent, so
	// that its distance to them is the design's, not the runtime's.
	keepAwake := fs.Bool("keep-sysmon-awake", true, sysmon.FlagUsage)
	adaptProcs := fs.Bool("adapt-procs", true, procs.FlagUsage)
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	awakeErr := sysmon.Keep(*keepAwake)
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	sysmon.Report(log, awakeErr)
	if err := run(*to, *tlsListen, *tlsTo, *adaptProcs, log); err != nil {
		fmt.Fprintln(os.Stderr, "tcp-forwarder:", err)
		os.Exit(1)
	}
}

func run(to, tlsListen, tlsTo string, adaptProcs bool, log *slog.Logger) error {
	if _, _, err := net.SplitHostPort(to); err != nil {
		return fmt.Errorf("--to %q: want host:port: %w", to, err)
	}
	// dial reaches the next hop; alpn is what the incoming TLS connection
	// negotiated, when this forwarder terminates one.
	dial := func(alpn string) (net.Conn, error) { return net.DialTimeout("tcp", to, 10*time.Second) }
	if tlsTo != "" {
		caPEM, err := os.ReadFile(tlsTo)
		if err != nil {
			return fmt.Errorf("reading --tls-to CA: %w", err)
		}
		roots, err := pki.Pool(caPEM)
		if err != nil {
			return err
		}
		dial = func(alpn string) (net.Conn, error) {
			conf := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
			if alpn != "" {
				// Carry the client's protocol on, as a proxy that ends
				// TLS must: HTTP/2 clients insist on it.
				conf.NextProtos = []string{alpn}
			}
			d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: conf}
			return d.Dial("tcp", to)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	if tlsListen != "" {
		conf, err := serverTLS(tlsListen)
		if err != nil {
			return err
		}
		ln = tls.NewListener(ln, conf)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	go func() { <-sig; ln.Close() }()
	var open atomic.Int64 // connections being forwarded, as the relay counts its passthrough ones
	if adaptProcs {
		defer procs.Start(context.Background(), procs.Config{InFlight: func() int { return int(open.Load()) }, Logger: log})()
	}
	log.Info("listening", "addr", ln.Addr().String(), "to", to)
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accepting: %w", err)
		}
		open.Add(1)
		go func() { defer open.Add(-1); forward(c, dial, log) }()
	}
}

// serverTLS makes a CA and a certificate for 127.0.0.1, and writes the CA
// to dir for the other forwarder.
func serverTLS(dir string) (*tls.Config, error) {
	ca, err := pki.NewCA("tcp-forwarder")
	if err != nil {
		return nil, err
	}
	leaf, err := ca.Issue("127.0.0.1", []string{"127.0.0.1"}, nil, false)
	if err != nil {
		return nil, err
	}
	cert, err := leaf.TLSCertificate()
	if err != nil {
		return nil, err
	}
	if err := pki.WriteFiles(dir, map[string][]byte{"ca.crt": ca.CertPEM}); err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2", "http/1.1"}}, nil
}

type closeWriter interface{ CloseWrite() error }

func forward(c net.Conn, dial func(alpn string) (net.Conn, error), log *slog.Logger) {
	defer c.Close()
	var alpn string
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.Handshake(); err != nil {
			log.Warn("handshake", "error", err)
			return
		}
		alpn = tc.ConnectionState().NegotiatedProtocol
	}
	up, err := dial(alpn)
	if err != nil {
		log.Warn("dialing", "error", err)
		return
	}
	defer up.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(up, c)
		up.(closeWriter).CloseWrite()
	}()
	io.Copy(c, up)
	c.(closeWriter).CloseWrite()
	<-done
}
