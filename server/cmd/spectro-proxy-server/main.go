// Command spectro-proxy-server is the relay. Agents dial in; kubectl and
// browsers reach clusters at https://<label>.<domain>.
//
//	spectro-proxy-server --domain proxy.example.com --state-dir /var/lib/spectro-proxy
//	spectro-proxy-server token issue --cluster-uid UID --state-dir /var/lib/spectro-proxy
//	spectro-proxy-server token revoke --id ID (--revocation-file FILE | --etcd-endpoints URLS)
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
	"strings"
	"syscall"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/flagenv"
	"github.com/spectroproxy/spectro-proxy/internal/procs"
	"github.com/spectroproxy/spectro-proxy/internal/profiling"
	"github.com/spectroproxy/spectro-proxy/internal/registry"
	"github.com/spectroproxy/spectro-proxy/internal/sysmon"
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
	fs.BoolVar(&cfg.NoSplice, "no-splice", false, "Serve every terminate-mode connection request by request on the relay's own HTTPS server, rather than carrying it as bytes to the API server (see docs/design.md); a way back should a client misbehave on a spliced connection.")
	fs.IntVar(&cfg.MaxSessionsPerCluster, "max-sessions-per-cluster", server.DefaultMaxSessionsPerCluster, "The most tunnels (agent replicas) one cluster may have connected at once.")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", server.DefaultDrainTimeout, "On SIGTERM, how long connections in flight may take to finish.")
	fs.DurationVar(&cfg.ShutdownDelay, "shutdown-delay", 0, "On SIGTERM, keep accepting for this long with /readyz failing, so load balancers stop sending connections first; then drain.")
	fs.Float64Var(&cfg.RegistrationsPerSecond, "registrations-per-second", server.DefaultRegistrationsPerSecond, "New tunnels accepted per second; the rest are told to retry later.")
	fs.StringVar(&cfg.ReplicaID, "replica-id", "", "This replica's name in the fleet (default $POD_NAME, else the host name).")
	etcdEndpoints := etcdFlags(fs, &cfg)
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", server.DefaultLeaseTTL, "The replica's etcd lease: a replica that dies leaves the fleet's view after this long.")
	fs.StringVar(&cfg.PeerListen, "peer-listen", "", "The address of the internal listener other replicas forward users' connections to (mutual TLS from the relay's CA), e.g. :8444; required with --etcd-endpoints.")
	fs.StringVar(&cfg.PeerAdvertise, "peer-advertise", "", "host:port other replicas dial to reach --peer-listen (default $POD_IP with its port, else --peer-listen when it names a host).")
	fs.StringVar(&cfg.PeerCAFile, "peer-ca-file", "", "The CA each replica issues its peer certificate from at start and verifies peers against (default <state-dir>/ca.crt).")
	fs.StringVar(&cfg.PeerCAKeyFile, "peer-ca-key-file", "", "The key of --peer-ca-file (default <state-dir>/ca.key).")
	healthAddr := fs.String("health-addr", "", "When set, also serve /healthz, /readyz and /metrics in plain HTTP here (for kubelet probes and scrapers inside the cluster).")
	pprofOn := fs.Bool("pprof", false, "Also serve Go's runtime profiles (net/http/pprof) at /debug/pprof/ on --health-addr. Off by default: for measuring (make bench -profile), not for production.")
	logLevel := fs.String("log-level", "info", "One of debug, info, warn, error.")
	keepAwake := fs.Bool("keep-sysmon-awake", true, sysmon.FlagUsage)
	adaptProcs := fs.Bool("adapt-procs", true, procs.FlagUsage)
	if err := flagenv.Parse(fs, args, envPrefix); err != nil {
		return err
	}
	awakeErr := sysmon.Keep(*keepAwake)
	cfg.MaxStreamsPerTunnel = uint32(*maxStreams)
	cfg.EtcdEndpoints = splitList(*etcdEndpoints)
	logger, err := newLogger(*logLevel)
	if err != nil {
		return err
	}
	cfg.Logger = logger
	sysmon.Report(logger, awakeErr)
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
	if *adaptProcs {
		defer procs.Start(ctx, procs.Config{InFlight: s.InFlight, Logger: logger})()
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
	var cfg server.Config
	etcdEndpoints := etcdFlags(fs, &cfg)
	ttl := fs.Duration("ttl", 0, "With --etcd-endpoints: how long the revocation is kept (past the token's expiry it is moot); 0 means forever.")
	if err := flagenv.Parse(fs, args, envPrefix); err != nil {
		return err
	}
	cfg.EtcdEndpoints = splitList(*etcdEndpoints)
	if *file == "" && len(cfg.EtcdEndpoints) == 0 {
		return errors.New("--revocation-file or --etcd-endpoints is required")
	}
	if *id == "" {
		return errors.New("--id is required")
	}
	if *file != "" {
		if err := token.Revoke(*file, *id, *comment); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "revoked token %s in %s; relays reading it refuse it from their next check\n", *id, *file)
	}
	if len(cfg.EtcdEndpoints) > 0 {
		if err := revokeInEtcd(cfg, *id, *ttl); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "revoked token %s in etcd; every relay of the fleet refuses it from its next check\n", *id)
	}
	return nil
}

// revokeInEtcd writes the revocation into the fleet's registry.
func revokeInEtcd(cfg server.Config, id string, ttl time.Duration) error {
	host, _ := os.Hostname()
	reg, err := server.NewEtcdRegistry(cfg, registry.Replica{ID: "token-revoke@" + host}, nil)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	defer reg.Close(ctx)
	var expires time.Time
	if ttl > 0 {
		expires = time.Now().Add(ttl)
	}
	if err := reg.Revoke(ctx, id, expires); err != nil {
		return fmt.Errorf("revoking token %s in etcd: %w", id, err)
	}
	return nil
}

// etcdFlags defines the etcd client's flags (the relay's and token
// revoke's) into cfg; the endpoints come back as the raw comma list.
func etcdFlags(fs *flag.FlagSet, cfg *server.Config) *string {
	endpoints := fs.String("etcd-endpoints", "", "Comma-separated etcd client URLs of the fleet's registry (https:// with TLS); empty: a single relay with an in-memory registry.")
	fs.StringVar(&cfg.EtcdCAFile, "etcd-ca-file", "", "A PEM CA to verify etcd's certificate (system roots when empty).")
	fs.StringVar(&cfg.EtcdCertFile, "etcd-cert-file", "", "A client certificate for etcd (with --etcd-key-file).")
	fs.StringVar(&cfg.EtcdKeyFile, "etcd-key-file", "", "The key of --etcd-cert-file.")
	fs.StringVar(&cfg.EtcdPrefix, "etcd-prefix", server.DefaultEtcdPrefix, "The prefix of the fleet's keys in etcd.")
	return endpoints
}

// splitList splits a comma-separated list, dropping blanks.
func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}
