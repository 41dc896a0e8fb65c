// Command spectro-proxy-server is the relay. Agents dial in; kubectl and
// browsers reach clusters at https://<label>.<domain>.
//
//	spectro-proxy-server --domain proxy.example.com --state-dir /var/lib/spectro-proxy
//	spectro-proxy-server token issue --cluster-uid UID --state-dir /var/lib/spectro-proxy
//	spectro-proxy-server token revoke --id ID --revocation-file FILE
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/flagenv"
	"github.com/spectroproxy/spectro-proxy/internal/profiling"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

const envPrefix = "SPECTRO_PROXY_"

func main() {
	if err := run(os.Args[1:]); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "spectro-proxy-server:", err)
		}
		os.Exit(2)
	}
}

func run(args []string) error {
	if len(args) >= 2 && args[0] == "token" {
		switch args[1] {
		case "issue":
			return tokenIssue(args[2:])
		case "revoke":
			return tokenRevoke(args[2:])
		}
		return fmt.Errorf("unknown token command %q (want issue or revoke)", args[1])
	}
	return serve(args)
}

func serve(args []string) error {
	fs := flag.NewFlagSet("spectro-proxy-server", flag.ContinueOnError)
	var cfg server.Config
	fs.StringVar(&cfg.Listen, "listen", server.DefaultListen, "The address of the one public TLS listener, shared by agents and users.")
	fs.StringVar(&cfg.Domain, "domain", "", "The relay's own host name. Clusters are reached at <label>.<domain>.")
	fs.StringVar(&cfg.TLSCertFile, "tls-cert-file", "", "A PEM certificate valid for the domain and *.domain. Without it, --state-dir gets a local CA and certificate.")
	fs.StringVar(&cfg.TLSKeyFile, "tls-key-file", "", "The private key of --tls-cert-file.")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "A directory for what the relay creates itself: a local CA and certificate (when no certificate is given) and the token signing key.")
	fs.StringVar(&cfg.SigningKeyFile, "signing-key-file", "", "The key agent tokens are signed with (default <state-dir>/signing.key, created if missing).")
	fs.StringVar(&cfg.RevocationFile, "revocation-file", "", "A file of revoked token ids, one per line; re-read when it changes.")
	fs.DurationVar(&cfg.RevocationInterval, "revocation-interval", server.DefaultRevocationInterval, "How often live tunnels are checked against --revocation-file; revoking a token ends its tunnels within this long.")
	fs.DurationVar(&cfg.HelloTimeout, "hello-timeout", server.DefaultHelloTimeout, "How long a new connection may take to send its TLS ClientHello.")
	fs.DurationVar(&cfg.Liveness.ReadIdle, "tunnel-idle-timeout", tunnel.DefaultReadIdle, "After this long without a frame from an agent, ping it.")
	fs.DurationVar(&cfg.Liveness.Ping, "tunnel-ping-timeout", tunnel.DefaultPing, "Drop a tunnel whose agent does not answer a ping within this long.")
	fs.DurationVar(&cfg.StreamTimeout, "stream-timeout", server.DefaultStreamTimeout, "How long an agent may take to answer a new stream.")
	maxStreams := fs.Uint("max-streams-per-tunnel", server.DefaultMaxStreamsPerTunnel, "The most concurrent streams one agent is asked to carry.")
	fs.IntVar(&cfg.MaxStreamsPerSource, "max-streams-per-source", server.DefaultMaxStreamsPerSource, "The most concurrent streams one source address (an IPv6 /64) may have open to one host name.")
	fs.IntVar(&cfg.MaxIdleConnsPerSource, "max-idle-conns-per-source", server.DefaultMaxIdleConnsPerSource, "The most idle keep-alive connections one source address (an IPv6 /64) may keep open to the relay.")
	fs.DurationVar(&cfg.WriteStallTimeout, "write-stall-timeout", server.DefaultWriteStallTimeout, "Cut a public connection, or a stream of one, whose client takes no data for this long.")
	fs.IntVar(&cfg.MaxSessionsPerCluster, "max-sessions-per-cluster", server.DefaultMaxSessionsPerCluster, "The most tunnels (agent replicas) one cluster may have connected at once.")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", server.DefaultDrainTimeout, "On SIGTERM, how long connections in flight may take to finish.")
	fs.DurationVar(&cfg.ShutdownDelay, "shutdown-delay", 0, "On SIGTERM, keep accepting for this long with /readyz failing, so load balancers stop sending connections first; then drain.")
	fs.Float64Var(&cfg.RegistrationsPerSecond, "registrations-per-second", server.DefaultRegistrationsPerSecond, "New tunnels accepted per second; the rest are told to retry later.")
	healthAddr := fs.String("health-addr", "", "When set, also serve /healthz, /readyz and /metrics in plain HTTP here (for kubelet probes and scrapers inside the cluster).")
	pprofOn := fs.Bool("pprof", false, "Also serve Go's runtime profiles (net/http/pprof) at /debug/pprof/ on --health-addr. Off by default: for measuring (make bench -profile), not for production.")
	logLevel := fs.String("log-level", "info", "One of debug, info, warn, error.")
	if err := flagenv.Parse(fs, args, envPrefix); err != nil {
		return err
	}
	cfg.MaxStreamsPerTunnel = uint32(*maxStreams)
	logger, err := newLogger(*logLevel)
	if err != nil {
		return err
	}
	cfg.Logger = logger
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	s, err := server.New(cfg)
	if err != nil {
		return err
	}
	if *healthAddr != "" {
		ln, err := net.Listen("tcp", *healthAddr)
		if err != nil {
			return fmt.Errorf("listening for health checks on %s: %w", *healthAddr, err)
		}
		h := s.HealthHandler()
		if *pprofOn {
			h = profiling.Wrap(h)
		}
		hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(ln)
		defer hs.Close()
	}
	return s.Run(ctx)
}

func tokenIssue(args []string) error {
	fs := flag.NewFlagSet("spectro-proxy-server token issue", flag.ContinueOnError)
	uid := fs.String("cluster-uid", "", "The cluster the token is for.")
	sub := fs.String("subdomain", "", "The cluster's subdomain (default cluster-<uid>).")
	ttl := fs.Duration("ttl", 0, "How long the token is valid; 0 means until revoked.")
	keyFile := fs.String("signing-key-file", "", "The relay's signing key.")
	stateDir := fs.String("state-dir", "", "The relay's state dir; its signing.key is used when --signing-key-file is empty.")
	if err := flagenv.Parse(fs, args, envPrefix); err != nil {
		return err
	}
	if *keyFile == "" && *stateDir != "" {
		*keyFile = filepath.Join(*stateDir, server.StateSigningKey)
	}
	if *keyFile == "" {
		return errors.New("--signing-key-file or --state-dir is required")
	}
	key, err := token.ReadKey(*keyFile)
	if err != nil {
		return err
	}
	tok, claims, err := token.Issue(key, *uid, *sub, *ttl, time.Now())
	if err != nil {
		return err
	}
	exp := "never"
	if claims.ExpiresAt != 0 {
		exp = time.Unix(claims.ExpiresAt, 0).UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(os.Stderr, "token id %s for cluster %s (hosts %v), expires %s\n", claims.ID, claims.ClusterUID, claims.Labels(), exp)
	fmt.Println(tok)
	return nil
}

func tokenRevoke(args []string) error {
	fs := flag.NewFlagSet("spectro-proxy-server token revoke", flag.ContinueOnError)
	id := fs.String("id", "", "The id of the token to revoke (printed by token issue).")
	file := fs.String("revocation-file", "", "The relay's revocation file.")
	comment := fs.String("comment", "", "Why, for the record.")
	if err := flagenv.Parse(fs, args, envPrefix); err != nil {
		return err
	}
	if *file == "" {
		return errors.New("--revocation-file is required")
	}
	if err := token.Revoke(*file, *id, *comment); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "revoked token %s; running relays refuse it from their next check\n", *id)
	return nil
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}
