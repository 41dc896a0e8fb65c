// Command devrun is `make run`: a local kube-apiserver (with etcd and a kwok
// node), a relay and two agents (one per mode) on 127.0.0.1, and a ready
// kubeconfig for each mode in .run/. It prints "ready" once kubectl works
// through the relay in both modes and runs until interrupted.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubeconfig"
	"github.com/spectroproxy/spectro-proxy/internal/testcluster"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "devrun:", err)
		os.Exit(1)
	}
}

func run() error {
	dir := flag.String("dir", ".run", "Where kubeconfigs, relay state and cluster files go.")
	listen := flag.String("listen", "127.0.0.1:8443", "The relay's listener.")
	domain := flag.String("domain", "proxy.local", "The relay's domain.")
	uid := flag.String("cluster-uid", "dev", "The cluster uid; the terminate-mode agent uses <uid>-t.")
	verbose := flag.Bool("v", false, "Log relay and agent activity at debug level.")
	flag.Parse()

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	ptHost := hostname.Host(hostname.DefaultSubdomain(*uid), *domain)
	log.Info("starting etcd, kube-apiserver and kwok", "dir", filepath.Join(abs, "cluster"))
	cluster, err := testcluster.Start(ctx, testcluster.Options{
		Dir: filepath.Join(abs, "cluster"), Kwok: true, ExtraSANs: []string{ptHost}, Log: log,
	})
	if err != nil {
		return fmt.Errorf("starting the control plane: %w", err)
	}
	defer cluster.Stop()

	stateDir := filepath.Join(abs, "relay")
	relay, err := server.New(server.Config{Domain: *domain, StateDir: stateDir,
		RevocationFile: filepath.Join(stateDir, "revoked"), Logger: log.With("component", "relay"), DrainTimeout: 2 * time.Second})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("relay listener: %w", err)
	}
	relayDone := make(chan error, 1)
	go func() { relayDone <- relay.Serve(ctx, ln) }()

	key, err := token.ReadKey(filepath.Join(stateDir, "signing.key"))
	if err != nil {
		return err
	}
	relayCA, err := os.ReadFile(filepath.Join(stateDir, "ca.crt"))
	if err != nil {
		return err
	}
	_, port, _ := net.SplitHostPort(*listen)
	agentDone := make(chan struct{}, 2)
	kubeconfigs := map[tunnel.Mode]string{}
	for _, mode := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		id := *uid
		if mode == tunnel.Terminate {
			id = *uid + "-t"
		}
		tok, _, err := token.Issue(key, id, "", 0, time.Now())
		if err != nil {
			return err
		}
		tokFile := filepath.Join(abs, "token-"+string(mode))
		if err := os.WriteFile(tokFile, []byte(tok), 0o600); err != nil {
			return err
		}
		a, err := client.New(client.Config{Server: *domain, RelayAddress: *listen, ClusterUID: id, TokenFile: tokFile,
			RelayCAFile: filepath.Join(stateDir, "ca.crt"), Mode: mode, APIServer: cluster.URL, APIServerCAFile: cluster.CAFile,
			AgentID: "devrun-" + string(mode), Logger: log.With("component", "agent-"+string(mode))})
		if err != nil {
			return err
		}
		go func() { a.Run(ctx); agentDone <- struct{}{} }()

		opts := kubeconfig.Options{Mode: mode, Server: *domain, Subdomain: hostname.DefaultSubdomain(id), Connect: *listen, Name: "spectro-proxy-" + string(mode)}
		fmt.Sscan(port, &opts.Port)
		out, err := cluster.ProxiedKubeconfig(ctx, opts, relayCA, 24*time.Hour)
		if err != nil {
			return fmt.Errorf("writing the %s kubeconfig: %w", mode, err)
		}
		path := filepath.Join(abs, "kubeconfig-"+string(mode))
		if err := os.WriteFile(path, out, 0o600); err != nil {
			return err
		}
		kubeconfigs[mode] = path
	}

	// Ready means kubectl itself works through the relay in both modes.
	deadline := time.Now().Add(60 * time.Second)
	for _, mode := range []tunnel.Mode{tunnel.Passthrough, tunnel.Terminate} {
		for {
			out, err := exec.CommandContext(ctx, "kubectl", "--kubeconfig", kubeconfigs[mode], "get", "--raw", "/readyz").CombinedOutput()
			if err == nil {
				break
			}
			if ctx.Err() != nil || time.Now().After(deadline) {
				return fmt.Errorf("kubectl through the relay (%s) never worked: %s", mode, strings.TrimSpace(string(out)))
			}
			time.Sleep(200 * time.Millisecond) // polling kubectl: nothing to wait on but its answer
		}
	}
	fmt.Printf("kubeconfigs: %s %s\n", kubeconfigs[tunnel.Passthrough], kubeconfigs[tunnel.Terminate])
	fmt.Printf("try: kubectl --kubeconfig %s get namespaces\n", kubeconfigs[tunnel.Passthrough])
	fmt.Println("ready")

	<-ctx.Done()
	log.Info("shutting down")
	<-agentDone
	<-agentDone
	if err := <-relayDone; err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
