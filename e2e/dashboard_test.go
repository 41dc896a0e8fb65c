package e2e

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"html/template"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/spectroproxy/spectro-proxy/client"
	"github.com/spectroproxy/spectro-proxy/internal/hostname"
	"github.com/spectroproxy/spectro-proxy/internal/token"
	"github.com/spectroproxy/spectro-proxy/internal/tunnel"
	"github.com/spectroproxy/spectro-proxy/server"
)

//go:embed testdata/dashboard
var dashboardFiles embed.FS

// The login the dashboard stand-in accepts.
const (
	dashUser     = "admin"
	dashPassword = "dashboard"
	dashCookie   = "dash_session"
)

// dashApp is a dashboard-like web app: a login form that redirects and sets
// a session cookie, large script, stylesheet and download, a server-sent
// event stream and a WebSocket echo, all but the static files behind the
// session. It builds absolute URLs from the Host and X-Forwarded-Proto it
// receives, as dashboards behind a proxy do, so a proxy that loses either
// sends the browser somewhere it cannot go.
type dashApp struct {
	title string
	srv   *httptest.Server
	pages *template.Template

	vendorJS  []byte // a large script whose string the page hashes
	vendorSum string
	themeCSS  []byte // a large stylesheet whose last rule the page checks
	blob      []byte
	// wsSeen tells the event stream that a WebSocket message arrived.
	wsSeen chan struct{}

	mu        sync.Mutex
	sessions  map[string]string // session id -> user
	hosts     map[string]bool   // Host headers seen
	protos    map[string]bool   // X-Forwarded-Proto values seen
	redirects int               // unauthenticated requests sent to /login
	logins    int
}

func newDashApp(t *testing.T, title string, useTLS bool) *dashApp {
	t.Helper()
	rng := rand.NewChaCha8([32]byte{1}) // same bytes every run
	raw := make([]byte, 2<<20)
	_, _ = rng.Read(raw)
	blobText := base64.StdEncoding.EncodeToString(raw) // 2.7 MiB of script
	sum := sha256.Sum256([]byte(blobText))
	var css bytes.Buffer
	for i := 0; css.Len() < 1<<20; i++ {
		fmt.Fprintf(&css, ".pad-%d { margin: 0; padding: 0; }\n", i)
	}
	css.WriteString("#css-marker { color: rgb(1, 2, 3); }\n")
	a := &dashApp{
		title:     title,
		pages:     template.Must(template.ParseFS(dashboardFiles, "testdata/dashboard/*.html")),
		vendorJS:  []byte("window.vendorBlob = \"" + blobText + "\";\n"),
		vendorSum: hex.EncodeToString(sum[:]),
		themeCSS:  css.Bytes(),
		blob:      make([]byte, 4<<20),
		wsSeen:    make(chan struct{}, 1),
		sessions:  map[string]string{},
		hosts:     map[string]bool{},
		protos:    map[string]bool{},
	}
	_, _ = rng.Read(a.blob)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", a.index)
	mux.HandleFunc("/login", a.login)
	mux.HandleFunc("GET /static/main.js", a.static("testdata/dashboard/main.js", "text/javascript"))
	mux.HandleFunc("GET /static/vendor.js", a.bytes(a.vendorJS, "text/javascript"))
	mux.HandleFunc("GET /static/theme.css", a.bytes(a.themeCSS, "text/css"))
	mux.HandleFunc("GET /api/blob", a.authed(a.bytes(a.blob, "application/octet-stream")))
	mux.HandleFunc("GET /events", a.authed(a.events))
	mux.HandleFunc("GET /ws", a.authed(a.websocket))
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.hosts[r.Host] = true
		a.protos[r.Header.Get("X-Forwarded-Proto")] = true
		a.mu.Unlock()
		mux.ServeHTTP(w, r)
	})
	if useTLS {
		// httptest's own self-signed certificate, as in-cluster dashboards
		// have: the agent must accept it (--dashboard-insecure-skip-verify).
		a.srv = httptest.NewUnstartedServer(h)
		a.srv.EnableHTTP2 = true
		a.srv.StartTLS()
	} else {
		a.srv = httptest.NewServer(h)
	}
	t.Cleanup(a.srv.Close)
	return a
}

// origin is where the browser sees this app.
func origin(r *http.Request) string {
	proto := r.Header.Get("X-Forwarded-Proto")
	if proto == "" {
		proto = "http"
		if r.TLS != nil {
			proto = "https"
		}
	}
	return proto + "://" + r.Host
}

func (a *dashApp) user(r *http.Request) (string, bool) {
	c, err := r.Cookie(dashCookie)
	if err != nil {
		return "", false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	u, ok := a.sessions[c.Value]
	return u, ok
}

func (a *dashApp) index(w http.ResponseWriter, r *http.Request) {
	user, ok := a.user(r)
	if !ok {
		a.mu.Lock()
		a.redirects++
		a.mu.Unlock()
		http.Redirect(w, r, origin(r)+"/login?next="+url.QueryEscape(r.URL.Path), http.StatusFound)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_ = a.pages.ExecuteTemplate(w, "index.html", map[string]string{"Title": a.title, "User": user})
}

func (a *dashApp) login(w http.ResponseWriter, r *http.Request) {
	next := r.FormValue("next")
	if !strings.HasPrefix(next, "/") || strings.HasPrefix(next, "//") {
		next = "/"
	}
	if r.Method == http.MethodPost {
		if r.PostFormValue("username") == dashUser && r.PostFormValue("password") == dashPassword {
			id := crand.Text()
			a.mu.Lock()
			a.sessions[id] = dashUser
			a.logins++
			a.mu.Unlock()
			http.SetCookie(w, &http.Cookie{Name: dashCookie, Value: id, Path: "/", HttpOnly: true, Secure: true, SameSite: http.SameSiteLaxMode})
			http.Redirect(w, r, origin(r)+next, http.StatusSeeOther)
			return
		}
		w.WriteHeader(http.StatusUnauthorized)
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_ = a.pages.ExecuteTemplate(w, "login.html", map[string]string{"Title": a.title, "Next": next})
}

func (a *dashApp) authed(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if _, ok := a.user(r); !ok {
			http.Error(w, "not signed in", http.StatusUnauthorized)
			return
		}
		h(w, r)
	}
}

func (a *dashApp) static(name, ctype string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		b, err := dashboardFiles.ReadFile(name)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		a.bytes(b, ctype)(w, r)
	}
}

func (a *dashApp) bytes(b []byte, ctype string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", ctype)
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write(b)
	}
}

// events sends "hello", then holds the stream until the page's WebSocket
// has carried a message, then sends "bye": a proxy that buffers the stream
// never lets "hello" through, and the page never opens the WebSocket.
func (a *dashApp) events(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprint(w, "event: hello\ndata: 1\n\n")
	w.(http.Flusher).Flush()
	select {
	case <-a.wsSeen:
		fmt.Fprint(w, "event: bye\ndata: after-websocket\n\n")
	case <-r.Context().Done():
	case <-time.After(30 * time.Second):
	}
}

// websocket echoes text messages with an "echo: " prefix. The default
// origin check stays on: it passes only when the Host the app receives is
// the public host name the browser's Origin names.
func (a *dashApp) websocket(w http.ResponseWriter, r *http.Request) {
	var up websocket.Upgrader
	c, err := up.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer c.Close()
	for range 10 {
		typ, msg, err := c.ReadMessage()
		if err != nil {
			return
		}
		select {
		case a.wsSeen <- struct{}{}:
		default:
		}
		if err := c.WriteMessage(typ, append([]byte("echo: "), msg...)); err != nil {
			return
		}
	}
}

func (a *dashApp) seen() (hosts, protos []string, redirects, logins int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for h := range a.hosts {
		hosts = append(hosts, h)
	}
	for p := range a.protos {
		protos = append(protos, p)
	}
	return hosts, protos, a.redirects, a.logins
}

// registrationLog is a slog handler that keeps the host names the relay
// logs when it accepts an agent, and passes every record on.
type registrationLog struct {
	next slog.Handler
	mu   *sync.Mutex
	seen *[]string
}

func newRegistrationLog(next slog.Handler) registrationLog {
	return registrationLog{next: next, mu: &sync.Mutex{}, seen: new([]string)}
}

func (l registrationLog) Enabled(context.Context, slog.Level) bool { return true }

func (l registrationLog) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "agent connected" {
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "hostnames" {
				l.mu.Lock()
				*l.seen = append(*l.seen, fmt.Sprint(a.Value.Any()))
				l.mu.Unlock()
			}
			return true
		})
	}
	if l.next.Enabled(ctx, r.Level) {
		return l.next.Handle(ctx, r)
	}
	return nil
}

func (l registrationLog) WithAttrs(as []slog.Attr) slog.Handler {
	return registrationLog{next: l.next.WithAttrs(as), mu: l.mu, seen: l.seen}
}

func (l registrationLog) WithGroup(name string) slog.Handler {
	return registrationLog{next: l.next.WithGroup(name), mu: l.mu, seen: l.seen}
}

func (l registrationLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(*l.seen, "\n")
}

// TestDashboards exposes a Kubernetes dashboard over HTTPS with a
// self-signed certificate, one on its plain-HTTP port, and a VM dashboard,
// checks them with a Go client and then in headless Chromium.
func TestDashboards(t *testing.T) {
	// The relay's log is read back: it must name the dashboard hosts.
	logs := newRegistrationLog(testLogger(t).Handler())
	r := startRelay(t, "127.0.0.1:0", "", func(c *server.Config) { c.Logger = slog.New(logs) })
	k8s := newDashApp(t, "Kubernetes Dashboard", true)
	insecure := newDashApp(t, "Kubernetes Dashboard (insecure port)", false)
	vm := newDashApp(t, "VM Dashboard", true)

	// Cluster "dash" has both dashboards over HTTPS; cluster "plain" has
	// the Kubernetes dashboard on its plain-HTTP port (useInsecurePort).
	tokDash, _ := r.issue(t, "dash", "", time.Hour)
	startAgent(t, r, client.Config{ClusterUID: "dash", TokenFile: tokDash, APIServer: "https://127.0.0.1:1",
		K8sDashboardURL: k8s.srv.URL, VMDashboardURL: vm.srv.URL, DashboardInsecureSkipVerify: true}).waitReady(t)
	tokPlain, _ := r.issue(t, "plain", "", time.Hour)
	startAgent(t, r, client.Config{ClusterUID: "plain", TokenFile: tokPlain, APIServer: "https://127.0.0.1:1",
		K8sDashboardURL: insecure.srv.URL}).waitReady(t)

	cases := []struct {
		name string
		host string
		app  *dashApp
	}{
		{"kubernetes dashboard over https", hostname.Host(hostname.Dashboard(hostname.DefaultSubdomain("dash")), domain), k8s},
		{"kubernetes dashboard on the insecure port", hostname.Host(hostname.Dashboard(hostname.DefaultSubdomain("plain")), domain), insecure},
		{"vm dashboard", hostname.Host(hostname.VMDashboard(hostname.DefaultSubdomain("dash")), domain), vm},
	}

	t.Run("relay logs the dashboard host names", func(t *testing.T) {
		for _, tc := range cases {
			assert.Eventually(t, func() bool { return strings.Contains(logs.String(), tc.host+" (terminate)") },
				5*time.Second, 10*time.Millisecond, "relay log names %s", tc.host)
		}
	})

	t.Run("login redirect stays on the public https host", func(t *testing.T) {
		for _, tc := range cases {
			hc := httpClient(r, tc.host, r.caPool(t), true)
			hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
			resp, err := hc.Get("https://" + tc.host + "/")
			require.NoError(t, err)
			resp.Body.Close()
			hc.CloseIdleConnections()
			assert.Equal(t, http.StatusFound, resp.StatusCode, tc.name)
			assert.Equal(t, "https://"+tc.host+"/login?next=%2F", resp.Header.Get("Location"), tc.name)
		}
	})

	t.Run("a token may register only its own cluster's dashboards", func(t *testing.T) {
		tokOther, _ := r.issue(t, "other", "", time.Hour)
		b, err := os.ReadFile(tokOther)
		require.NoError(t, err)
		for _, label := range []string{"cluster-dash-dashboard", "cluster-dash-vmdashboard"} {
			code, body := register(t, r, string(b), "cluster-other=passthrough,"+label+"=terminate")
			assert.Equal(t, http.StatusForbidden, code, label)
			assert.Contains(t, body, fmt.Sprintf("may not register %q", label))
		}
		// A cluster whose own subdomain is another's dashboard label would
		// get that label legitimately; such a subdomain is never issued.
		key, err := token.ReadKey(filepath.Join(r.stateDir, "signing.key"))
		require.NoError(t, err)
		_, _, err = token.Issue(key, "other", "cluster-dash-dashboard", time.Hour, time.Now())
		assert.ErrorContains(t, err, "reserved")
	})

	t.Run("browser", func(t *testing.T) {
		b := startChromium(t, r)
		if b == nil {
			return
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				browseDashboard(t, b, tc.host, tc.app)
			})
		}
	})
}

// register opens a raw tunnel registration and returns the relay's answer.
func register(t *testing.T, r *relay, tok, routes string) (int, string) {
	t.Helper()
	h := http.Header{}
	h.Set("Authorization", "Bearer "+strings.TrimSpace(tok))
	h.Set(tunnel.HeaderAgent, "intruder")
	h.Set(tunnel.HeaderRoutes, routes)
	d := websocket.Dialer{
		NetDialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, r.addr)
		},
		TLSClientConfig:  &tls.Config{ServerName: domain, RootCAs: r.caPool(t)},
		HandshakeTimeout: 10 * time.Second,
	}
	ws, resp, err := d.Dial("wss://"+domain+tunnel.Path, h)
	require.NotNil(t, resp, "dial error: %v", err)
	if ws != nil {
		ws.Close()
		return resp.StatusCode, ""
	}
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// dashResults is what main.js writes into #results.
type dashResults struct {
	Host        string   `json:"host"`
	Protocol    string   `json:"protocol"`
	PageHTTP    string   `json:"pageProtocol"`
	Errors      []string `json:"errors"`
	VendorBytes int      `json:"vendorBytes"`
	VendorSHA   string   `json:"vendorSHA"`
	CSSColor    string   `json:"cssColor"`
	BlobBytes   int      `json:"blobBytes"`
	BlobSHA     string   `json:"blobSHA"`
	SSE         []string `json:"sse"`
	WS          []string `json:"ws"`
}

// browseDashboard opens host in a fresh browser context (no cookies), signs
// in through the login redirect, waits for the page's own checks, verifies
// them and the session cookie, and saves a screenshot.
func browseDashboard(t *testing.T, b *chromium, host string, app *dashApp) {
	p := b.newPage(t)
	p.navigate(t, "https://"+host+"/")
	p.waitFor(t, `location.pathname === "/login" && !!document.getElementById("login")`, 30*time.Second)
	p.eval(t, `document.getElementById("username").value = "`+dashUser+`";
		document.getElementById("password").value = "`+dashPassword+`";
		document.getElementById("login").submit(); true`, nil)
	p.waitFor(t, `location.pathname === "/" && document.body && document.body.dataset.done === "1"`, 60*time.Second)

	var text string
	p.eval(t, `document.getElementById("results").textContent`, &text)
	var res dashResults
	require.NoError(t, json.Unmarshal([]byte(text), &res), text)
	assert.Empty(t, res.Errors, "errors in the page")
	assert.Equal(t, host, res.Host, "the page stays on the public host")
	assert.Equal(t, "https:", res.Protocol)
	assert.Equal(t, "h2", res.PageHTTP, "the browser speaks HTTP/2 to the relay")
	blobSum := sha256.Sum256(app.blob)
	assert.Equal(t, len(app.vendorJS)-len("window.vendorBlob = \"\";\n"), res.VendorBytes, "script size")
	assert.Equal(t, app.vendorSum, res.VendorSHA, "script intact")
	assert.Equal(t, "rgb(1, 2, 3)", res.CSSColor, "the stylesheet's last rule applied")
	assert.Equal(t, len(app.blob), res.BlobBytes, "download size")
	assert.Equal(t, hex.EncodeToString(blobSum[:]), res.BlobSHA, "download intact")
	assert.Equal(t, []string{"hello:1", "bye:after-websocket"}, res.SSE, "server-sent events")
	assert.Equal(t, []string{"echo: hello from the browser", fmt.Sprintf("echo of %d bytes", 256*1024+len("echo: "))}, res.WS, "WebSocket echoes")

	var cookies struct {
		Cookies []struct {
			Name     string `json:"name"`
			Domain   string `json:"domain"`
			Secure   bool   `json:"secure"`
			HTTPOnly bool   `json:"httpOnly"`
		} `json:"cookies"`
	}
	p.call(t, "Network.getCookies", map[string]any{"urls": []string{"https://" + host + "/"}}, &cookies)
	require.Len(t, cookies.Cookies, 1, "the session cookie")
	c := cookies.Cookies[0]
	assert.Equal(t, dashCookie, c.Name)
	assert.Equal(t, host, c.Domain, "cookie scoped to the dashboard host")
	assert.True(t, c.Secure && c.HTTPOnly, "secure, http-only cookie kept")

	hosts, protos, redirects, logins := app.seen()
	assert.Equal(t, []string{host}, hosts, "the app saw only the public host name")
	assert.Equal(t, []string{"https"}, protos, "the app learns the browser spoke https")
	assert.GreaterOrEqual(t, redirects, 1, "the first visit was redirected to the login")
	assert.Equal(t, 1, logins)

	var shot struct {
		Data string `json:"data"`
	}
	p.call(t, "Page.captureScreenshot", map[string]any{"format": "png"}, &shot)
	png, err := base64.StdEncoding.DecodeString(shot.Data)
	require.NoError(t, err)
	path := filepath.Join(t.ArtifactDir(), host+".png")
	require.NoError(t, os.WriteFile(path, png, 0o644))
	t.Logf("screenshot: %s (%d bytes)", path, len(png))
}

// chromium is a headless Chromium from the distribution's package, driven
// over the DevTools protocol on one WebSocket (flattened sessions).
type chromium struct {
	cmd *exec.Cmd
	cdp *cdpConn
}

// startChromium starts a browser that resolves every *.proxy.test name to
// the relay and trusts exactly the relay's certificate. It returns nil after
// skipping when Chromium is not installed, except under CI, which must
// have it (.ci/run installs it).
func startChromium(t *testing.T, r *relay) *chromium {
	t.Helper()
	bin := os.Getenv("CHROMIUM")
	if bin == "" {
		for _, name := range []string{"chromium", "chromium-browser"} {
			if p, err := exec.LookPath(name); err == nil {
				bin = p
				break
			}
		}
	}
	if bin == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("chromium is not installed; CI must install it (apt-get install chromium)")
		}
		t.Skip("chromium is not installed (apt-get install chromium)")
		return nil
	}
	pin := relaySPKIPin(t, r)
	args := []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		// The machine has no route out: without these Chromium keeps
		// trying to reach Google's services.
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
		"--user-data-dir=" + t.TempDir(),
		"--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
		"--window-size=1100,640",
		// No DNS: the dashboard names resolve to the relay on its test
		// port; the browser still believes it talks to port 443, so the
		// Host, Origin and cookies are exactly what production sees.
		"--host-resolver-rules=MAP *." + domain + " " + r.addr,
		// Trust exactly the relay's certificate (by its public key), not
		// any certificate error: the honest stand-in for installing the
		// relay's CA, which headless Chromium has no flag for.
		"--ignore-certificate-errors-spki-list=" + pin,
		"about:blank",
	}
	cmd := exec.Command(bin, args...)
	// Chromium forks helpers; its own process group lets cleanup end them
	// all by id.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Helpers inherit stderr: do not let them keep Wait hanging.
	cmd.WaitDelay = 5 * time.Second
	out := newDevToolsWatcher()
	cmd.Stderr = out
	require.NoError(t, cmd.Start())
	b := &chromium{cmd: cmd}
	t.Cleanup(b.stop)

	var wsURL string
	select {
	case wsURL = <-out.url:
	case <-time.After(30 * time.Second):
		t.Fatalf("chromium printed no DevTools address in 30s; stderr:\n%s", out.tail())
	}
	c, err := dialCDP(wsURL)
	require.NoError(t, err)
	b.cdp = c
	return b
}

func (b *chromium) stop() {
	if b.cdp != nil {
		// A graceful close lets Chromium end its helpers itself.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = b.cdp.call(ctx, "", "Browser.close", nil, nil)
		cancel()
		b.cdp.close()
	}
	exited := make(chan struct{})
	go func() { _ = b.cmd.Wait(); close(exited) }()
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
	}
	// Whatever is left of our own process group goes, by its id.
	_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	<-exited
}

// relaySPKIPin is the base64 SHA-256 of the relay certificate's public key,
// the form --ignore-certificate-errors-spki-list takes.
func relaySPKIPin(t *testing.T, r *relay) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(r.stateDir, "tls.crt"))
	require.NoError(t, err)
	blk, _ := pem.Decode(b)
	require.NotNil(t, blk, "relay tls.crt is PEM")
	cert, err := x509.ParseCertificate(blk.Bytes)
	require.NoError(t, err)
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// devToolsWatcher reads Chromium's stderr for the DevTools address and
// keeps the last few KiB for failure messages.
type devToolsWatcher struct {
	url  chan string
	mu   sync.Mutex
	buf  []byte
	sent bool
}

var devToolsLine = regexp.MustCompile(`DevTools listening on (ws://\S+)`)

func newDevToolsWatcher() *devToolsWatcher { return &devToolsWatcher{url: make(chan string, 1)} }

func (w *devToolsWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	if !w.sent {
		if m := devToolsLine.FindSubmatch(w.buf); m != nil {
			w.url <- string(m[1])
			w.sent = true
		}
	}
	if len(w.buf) > 16<<10 {
		w.buf = w.buf[len(w.buf)-8<<10:]
	}
	return len(p), nil
}

func (w *devToolsWatcher) tail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.buf)
}

// cdpConn is a DevTools protocol connection: numbered commands, answers
// matched by id, events ignored (the tests poll the page instead).
type cdpConn struct {
	ws   *websocket.Conn
	wmu  sync.Mutex
	mu   sync.Mutex
	id   int64
	wait map[int64]chan cdpMessage
	done chan struct{}
}

type cdpMessage struct {
	ID     int64           `json:"id"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func dialCDP(wsURL string) (*cdpConn, error) {
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	ws, _, err := d.Dial(wsURL, nil)
	if err != nil {
		return nil, fmt.Errorf("dialing DevTools %s: %w", wsURL, err)
	}
	c := &cdpConn{ws: ws, wait: map[int64]chan cdpMessage{}, done: make(chan struct{})}
	go c.readLoop()
	return c, nil
}

// readLoop ends when the connection closes (close, or Chromium exits).
func (c *cdpConn) readLoop() {
	defer close(c.done)
	for {
		_, data, err := c.ws.ReadMessage()
		if err != nil {
			return
		}
		var m cdpMessage
		if json.Unmarshal(data, &m) != nil || m.ID == 0 {
			continue
		}
		c.mu.Lock()
		ch := c.wait[m.ID]
		delete(c.wait, m.ID)
		c.mu.Unlock()
		if ch != nil {
			ch <- m
		}
	}
}

func (c *cdpConn) close() {
	c.ws.Close()
	<-c.done
}

// call sends method to the browser (session "") or a page session and
// decodes the result into out (when not nil).
func (c *cdpConn) call(ctx context.Context, session, method string, params, out any) error {
	if params == nil {
		params = struct{}{}
	}
	ch := make(chan cdpMessage, 1)
	c.mu.Lock()
	c.id++
	id := c.id
	c.wait[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.wait, id)
		c.mu.Unlock()
	}()
	req := map[string]any{"id": id, "method": method, "params": params}
	if session != "" {
		req["sessionId"] = session
	}
	c.wmu.Lock()
	err := c.ws.WriteJSON(req)
	c.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", method, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return fmt.Errorf("%s: %s (%d)", method, m.Error.Message, m.Error.Code)
		}
		if out != nil {
			return json.Unmarshal(m.Result, out)
		}
		return nil
	case <-c.done:
		return fmt.Errorf("%s: DevTools connection closed", method)
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", method, ctx.Err())
	}
}

// page is a tab in its own browser context, so each dashboard starts
// without cookies.
type page struct {
	cdp     *cdpConn
	session string
}

func (b *chromium) newPage(t *testing.T) *page {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var bc struct {
		ID string `json:"browserContextId"`
	}
	require.NoError(t, b.cdp.call(ctx, "", "Target.createBrowserContext", nil, &bc))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = b.cdp.call(ctx, "", "Target.disposeBrowserContext", map[string]any{"browserContextId": bc.ID}, nil)
	})
	var tg struct {
		ID string `json:"targetId"`
	}
	require.NoError(t, b.cdp.call(ctx, "", "Target.createTarget", map[string]any{"url": "about:blank", "browserContextId": bc.ID}, &tg))
	var att struct {
		Session string `json:"sessionId"`
	}
	require.NoError(t, b.cdp.call(ctx, "", "Target.attachToTarget", map[string]any{"targetId": tg.ID, "flatten": true}, &att))
	p := &page{cdp: b.cdp, session: att.Session}
	p.call(t, "Page.enable", nil, nil)
	return p
}

func (p *page) call(t *testing.T, method string, params, out any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, p.cdp.call(ctx, p.session, method, params, out))
}

func (p *page) navigate(t *testing.T, u string) {
	t.Helper()
	var nav struct {
		ErrorText string `json:"errorText"`
	}
	p.call(t, "Page.navigate", map[string]any{"url": u}, &nav)
	require.Empty(t, nav.ErrorText, "navigating to %s", u)
}

// evaluate runs expr in the page and decodes its value into out.
func (p *page) evaluate(ctx context.Context, expr string, out any) error {
	var res struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		Exception *struct {
			Text string `json:"text"`
		} `json:"exceptionDetails"`
	}
	err := p.cdp.call(ctx, p.session, "Runtime.evaluate",
		map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true}, &res)
	if err != nil {
		return err
	}
	if res.Exception != nil {
		return fmt.Errorf("evaluating %q: %s", expr, res.Exception.Text)
	}
	if out != nil {
		return json.Unmarshal(res.Result.Value, out)
	}
	return nil
}

func (p *page) eval(t *testing.T, expr string, out any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, p.evaluate(ctx, expr, out))
}

// waitFor polls cond in the page until it is true. Evaluation errors while
// a navigation replaces the document are expected and retried.
func (p *page) waitFor(t *testing.T, cond string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var ok bool
		last = p.evaluate(ctx, "Boolean("+cond+")", &ok)
		cancel()
		if last == nil && ok {
			return
		}
		select {
		case <-tick.C:
			continue
		case <-deadline:
		}
		break
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var where string
	_ = p.evaluate(ctx, `location.href + "\n" + (document.body ? document.body.innerText : "")`, &where)
	t.Fatalf("page never met %s within %s (last error: %v); page:\n%s", cond, timeout, last, where)
}
