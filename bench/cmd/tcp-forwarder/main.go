// Command tcp-forwarder is the benchmark's floor: the least a relay process
// can do, copying bytes between two TCP connections with one goroutine per
// direction. Two of them chained stand where the relay and the agent stand,
// so `make bench` can show how much of the proxy's cost is the two extra
// processes on the path and how much is Spectro Proxy's own.
//
//	tcp-forwarder --to 127.0.0.1:6443
//
// It listens on 127.0.0.1 (a free port) and logs {"msg":"listening","addr":...}.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	fs := flag.NewFlagSet("tcp-forwarder", flag.ContinueOnError)
	to := fs.String("to", "", "The address to forward every connection to (host:port).")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if err := run(*to, log); err != nil {
		fmt.Fprintln(os.Stderr, "tcp-forwarder:", err)
		os.Exit(1)
	}
}

func run(to string, log *slog.Logger) error {
	if _, _, err := net.SplitHostPort(to); err != nil {
		return fmt.Errorf("--to %q: want host:port: %w", to, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	go func() { <-sig; ln.Close() }()
	log.Info("listening", "addr", ln.Addr().String(), "to", to)
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accepting: %w", err)
		}
		go forward(c.(*net.TCPConn), to, log)
	}
}

func forward(c *net.TCPConn, to string, log *slog.Logger) {
	defer c.Close()
	up, err := net.DialTimeout("tcp", to, 10*time.Second)
	if err != nil {
		log.Warn("dialing", "to", to, "error", err)
		return
	}
	defer up.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(up, c)
		up.(*net.TCPConn).CloseWrite()
	}()
	io.Copy(c, up)
	c.CloseWrite()
	<-done
}
