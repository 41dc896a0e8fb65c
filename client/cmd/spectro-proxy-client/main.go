// Command spectro-proxy-client is the agent that runs in the cluster and
// keeps a tunnel to the relay up. Its kubeconfig subcommand prints a
// kubeconfig that reaches the cluster through the relay.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/flagenv"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/kubeconfig"
	"github.com/spectroproxy/spectro-proxy/internal/sysmon"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
)

const envPrefix = "SPECTRO_PROXY_"

func main() {
	if err := run(os.Args[1:]); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "spectro-proxy-client:", err)
		}
		os.Exit(2)
	}
}

func run(args []string) error {
	if len(args) > 0 && args[0] == "kubeconfig" {
		return printKubeconfig(args[1:])
	}
	return agent(args)
}

func agent(args []string) error {
	fs := flag.NewFlagSet("spectro-proxy-client", flag.ContinueOnError)
	var cfg client.Config
	mode := fs.String("mode", string(client.ModeAuto), "How the relay treats API server connections: passthrough (TLS ends at the API server), terminate (TLS ends at the relay), or auto: passthrough when the API server certificate is valid for <subdomain>.<server>, else terminate, checked at every start.")
	fs.StringVar(&cfg.Server, "server", "", "The relay's domain. The agent dials wss://<server>:<port>.")
	fs.IntVar(&cfg.Port, "port", client.DefaultPort, "The relay's port.")
	fs.StringVar(&cfg.RelayAddress, "relay-address", "", "A host:port to dial instead of <server>:<port>, for runs without DNS. The TLS server name stays <server>.")
	fs.StringVar(&cfg.ClusterUID, "cluster-uid", "", "This cluster's uid; the token must be issued for it.")
	fs.StringVar(&cfg.Subdomain, "subdomain", "", "The API server's host name label (default cluster-<uid>).")
	fs.StringVar(&cfg.TokenFile, "token-file", client.DefaultTokenFile, "A file holding the tunnel token; read at each connect, so a rotated Secret takes effect.")
	fs.StringVar(&cfg.RelayCAFile, "relay-ca-file", "", "A PEM CA to trust for the relay (system roots when empty).")
	fs.StringVar(&cfg.APIServer, "api-server", "", "The API server URL (default: the in-cluster one from KUBERNETES_SERVICE_HOST/PORT).")
	fs.StringVar(&cfg.APIServerCAFile, "api-server-ca-file", client.InClusterCAFile, "The API server's CA.")
	fs.StringVar(&cfg.K8sDashboardURL, "k8s-dashboard-url", "", "When set, serve this in-cluster dashboard at <subdomain>-dashboard.<server>.")
	fs.StringVar(&cfg.VMDashboardURL, "vm-dashboard-url", "", "When set, serve this in-cluster VM dashboard at <subdomain>-vmdashboard.<server>.")
	fs.BoolVar(&cfg.DashboardInsecureSkipVerify, "dashboard-insecure-skip-verify", true, "Accept dashboards' self-signed in-cluster certificates.")
	fs.StringVar(&cfg.KubeconfigConfigMap, "kubeconfig-configmap", "", "When set, write the kubeconfig skeleton for this cluster (server, CA for the mode, no credentials) into this existing ConfigMap, as the pod's service account.")
	fs.StringVar(&cfg.Namespace, "namespace", "", "The ConfigMap's namespace (default $POD_NAMESPACE, else the pod's service account namespace).")
	fs.StringVar(&cfg.ServiceAccountTokenFile, "service-account-token-file", client.InClusterTokenFile, "The service account token the agent writes the ConfigMap with.")
	fs.StringVar(&cfg.HealthAddr, "health-addr", client.DefaultHealthAddr, "Serve /healthz, /readyz and /metrics here; empty disables.")
	fs.BoolVar(&cfg.Pprof, "pprof", false, "Also serve Go's runtime profiles (net/http/pprof) at /debug/pprof/ on --health-addr. Off by default: for measuring (make bench -profile), not for production.")
	fs.StringVar(&cfg.AgentID, "agent-id", "", "This replica's id (default $POD_NAME, else the host name).")
	fs.StringVar(&cfg.Tunnels, "tunnels", client.TunnelsAuto, "Tunnels to hold, on distinct relay replicas: 1, 2, or auto: 2 when the relay reports more than one replica. The second registers as <agent-id>~1.")
	fs.DurationVar(&cfg.Liveness.ReadIdle, "tunnel-idle-timeout", tunnel.DefaultReadIdle, "After this long without a frame from the relay, ping it.")
	fs.DurationVar(&cfg.Liveness.Ping, "tunnel-ping-timeout", tunnel.DefaultPing, "Reconnect when the relay does not answer a ping within this long.")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", client.DefaultDrainTimeout, "On SIGTERM, how long streams in flight may take to finish.")
	procs := fs.Int("procs", 1, "How many threads run Go code at once (GOMAXPROCS). 0 is Go's default (the CPUs, or the container's CPU limit, at least 2). A GOMAXPROCS environment variable wins over this flag.")
	logLevel := fs.String("log-level", "info", "One of debug, info, warn, error.")
	keepAwake := fs.Bool("keep-sysmon-awake", true, sysmon.FlagUsage)
	if err := flagenv.Parse(fs, args, envPrefix); err != nil {
		return err
	}
	if err := setProcs(*procs); err != nil {
		return err
	}
	awakeErr := sysmon.Keep(*keepAwake)
	cfg.Mode = tunnel.Mode(*mode)
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("log level %q: %w", *logLevel, err)
	}
	cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	sysmon.Report(cfg.Logger, awakeErr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c, err := client.New(cfg)
	if err != nil {
		return err
	}
	return c.Run(ctx)
}

// setProcs applies --procs. The agent forwards bytes between a few
// connections, one request's frames handed from goroutine to goroutine;
// with more than one thread running Go code, each hand-off may wake
// another thread that then finds nothing to do. On one, a request at a
// time costs half the context switches and a third less CPU, and one core
// carries about 17,000 small requests a second or 450 MiB/s on the bench
// machine (docs/performance.md, sixth pass).
func setProcs(n int) error {
	if n < 0 {
		return fmt.Errorf("--procs %d: must be 0 (Go's default) or more", n)
	}
	if n > 0 && os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(n)
	}
	return nil
}

func printKubeconfig(args []string) error {
	fs := flag.NewFlagSet("spectro-proxy-client kubeconfig", flag.ContinueOnError)
	var o kubeconfig.Options
	mode := fs.String("mode", "passthrough", "passthrough (keep the cluster CA and your credentials) or terminate (trust the relay CA, or system roots without --ca-file, and use a bearer token).")
	fs.StringVar(&o.Server, "server", "", "The relay's domain.")
	fs.IntVar(&o.Port, "port", 443, "The relay's port.")
	fs.StringVar(&o.Subdomain, "subdomain", "", "The cluster's subdomain (default cluster-<uid>).")
	uid := fs.String("cluster-uid", "", "The cluster uid, for the default subdomain.")
	fs.StringVar(&o.Connect, "connect", "", "Dial this host:port and send <subdomain>.<server> as tls-server-name (no DNS needed).")
	fs.StringVar(&o.Name, "name", "", "The name of the cluster, user and context (default the subdomain).")
	from := fs.String("from", "", "Rewrite this kubeconfig's current context instead of building a new one.")
	caFile := fs.String("ca-file", "", "The CA kubectl trusts: the relay CA in terminate mode, the cluster CA in passthrough mode (default: in-cluster CA for passthrough).")
	relayCAFile := fs.String("relay-ca-file", "", "Alias of --ca-file in terminate mode.")
	tokenFile := fs.String("user-token-file", "", "A file holding the bearer token for the kubeconfig's user (terminate mode: the chart's service account token).")
	if err := flagenv.Parse(fs, args, envPrefix); err != nil {
		return err
	}
	o.Mode = tunnel.Mode(*mode)
	if o.Subdomain == "" && *uid != "" {
		o.Subdomain = hostname.DefaultSubdomain(*uid)
	}
	if *caFile == "" {
		*caFile = *relayCAFile
	}
	if *caFile == "" && o.Mode == tunnel.Passthrough && *from == "" {
		*caFile = client.InClusterCAFile
	}
	if *caFile != "" {
		b, err := os.ReadFile(*caFile)
		if err != nil {
			return fmt.Errorf("reading CA: %w", err)
		}
		o.CAPEM = b
	}
	if *tokenFile != "" {
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return fmt.Errorf("reading user token: %w", err)
		}
		o.BearerToken = strings.TrimSpace(string(b))
	}
	var out []byte
	var err error
	if *from != "" {
		src, rerr := os.ReadFile(*from)
		if rerr != nil {
			return fmt.Errorf("reading kubeconfig: %w", rerr)
		}
		out, err = kubeconfig.Rewrite(src, o)
	} else {
		out, err = kubeconfig.New(o)
	}
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(out)
	return err
}
