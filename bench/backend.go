// Package bench measures what Spectro Proxy adds on top of a direct
// connection to an API server: the same load runs against a TLS backend
// directly and through the real relay and agent binaries (passthrough and
// terminate mode), in one run, so ratios compare like with like.
//
// Run it with `make bench`; `go test ./bench` runs a short smoke version that
// checks every path moves the bytes intact and asserts no timings.
package bench

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spectroproxy/spectro-proxy/internal/pki"
)

// Paths the backend serves, shaped like the API server requests they stand
// for.
const (
	pathSmall  = "/api/v1/namespaces/default/configmaps/small"
	pathList   = "/api/v1/pods"
	pathUpload = "/api/v1/namespaces/default/configmaps"
	pathWatch  = "/api/v1/pods?watch=true"
)

// Backend is an API-server stand-in: real TLS (HTTP/1.1 and HTTP/2) with a
// private CA, a ~1 KiB JSON object, a large JSON list, an upload sink and a
// paced watch stream.
type Backend struct {
	Addr   string
	CAFile string
	Roots  *x509.CertPool
	// List is the body of pathList; ListSum its SHA-256.
	List    []byte
	ListSum [sha256.Size]byte

	small []byte
	srv   *http.Server
	ln    net.Listener
	done  chan struct{}
}

// StartBackend serves on 127.0.0.1 with a certificate that also carries
// names, the host names clients use through the relay in passthrough mode.
// listSize is the size of the list body in bytes.
func StartBackend(dir string, listSize int, names []string, log *slog.Logger) (*Backend, error) {
	ca, err := pki.NewCA("bench backend CA")
	if err != nil {
		return nil, fmt.Errorf("creating backend CA: %w", err)
	}
	leaf, err := ca.Issue("bench-backend", append([]string{"127.0.0.1"}, names...), nil, false)
	if err != nil {
		return nil, fmt.Errorf("issuing backend certificate: %w", err)
	}
	cert, err := leaf.TLSCertificate()
	if err != nil {
		return nil, fmt.Errorf("loading backend certificate: %w", err)
	}
	b := &Backend{CAFile: filepath.Join(dir, "backend-ca.crt"), done: make(chan struct{})}
	if err := os.WriteFile(b.CAFile, ca.CertPEM, 0o600); err != nil {
		return nil, fmt.Errorf("writing backend CA: %w", err)
	}
	if b.Roots, err = pki.Pool(ca.CertPEM); err != nil {
		return nil, fmt.Errorf("backend CA pool: %w", err)
	}
	b.small = jsonObject(1024)
	b.List = jsonList(listSize)
	b.ListSum = sha256.Sum256(b.List)

	mux := http.NewServeMux()
	mux.HandleFunc("GET "+pathSmall, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b.small)))
		w.Write(b.small)
	})
	mux.HandleFunc("GET "+pathList, b.serveList)
	mux.HandleFunc("POST "+pathUpload, serveUpload)
	b.ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening for backend: %w", err)
	}
	b.Addr = b.ln.Addr().String()
	b.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}},
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	go func() {
		defer close(b.done)
		_ = b.srv.ServeTLS(b.ln, "", "")
	}()
	return b, nil
}

// Close stops the backend and its connections.
func (b *Backend) Close() {
	b.srv.Close()
	<-b.done
}

// serveList answers the list, or with ?watch=true a stream of ~1 KiB events
// at rate per second for n events, each stamped with the time it was written
// so the reader can tell how long it took to arrive.
func (b *Backend) serveList(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("watch") != "true" {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b.List)))
		w.Write(b.List)
		return
	}
	rate, _ := strconv.Atoi(r.URL.Query().Get("rate"))
	n, _ := strconv.Atoi(r.URL.Query().Get("n"))
	if rate <= 0 || n <= 0 || n > 1_000_000 {
		http.Error(w, "rate and n (<= 1e6) are required", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if rc.Flush() != nil {
		return
	}
	pad := strings.Repeat("x", 900)
	interval := time.Second / time.Duration(rate)
	start := time.Now()
	for i := range n {
		// Pacing against the start time, not the previous event, keeps
		// the rate true when a sleep overshoots.
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
				return
			}
		}
		fmt.Fprintf(w, `{"type":"MODIFIED","sent":%d,"object":{"kind":"Pod","apiVersion":"v1","metadata":{"name":"pod-%d","namespace":"default","resourceVersion":"%d"},"pad":"%s"}}`+"\n",
			time.Now().UnixNano(), i, 1000+i, pad)
		if rc.Flush() != nil {
			return
		}
	}
}

// serveUpload reads the body and answers its size and, when asked with
// ?verify=1, its SHA-256 (hashing only when asked keeps the hash's CPU out
// of the throughput figures).
func serveUpload(w http.ResponseWriter, r *http.Request) {
	var dst io.Writer = io.Discard
	h := sha256.New()
	if r.URL.Query().Get("verify") == "1" {
		dst = h
	}
	n, err := io.Copy(dst, r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"kind":"Status","bytes":%d,"sha256":%q}`, n, hex.EncodeToString(h.Sum(nil)))
}

// jsonObject is a ConfigMap-like object of exactly size bytes.
func jsonObject(size int) []byte {
	head := `{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"small","namespace":"default","resourceVersion":"42"},"data":{"k":"`
	tail := `"}}`
	return []byte(head + strings.Repeat("v", max(0, size-len(head)-len(tail))) + tail)
}

// jsonList is a pod list of about size bytes (exactly size when size is a
// few KiB or more). Items differ so nothing on the path can dedupe them.
func jsonList(size int) []byte {
	var buf bytes.Buffer
	buf.Grow(size + 1024)
	buf.WriteString(`{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[`)
	for i := 0; buf.Len() < size-1024; i++ {
		if i > 0 {
			buf.WriteByte(',')
		}
		fmt.Fprintf(&buf, `{"metadata":{"name":"pod-%07d","namespace":"ns-%03d","uid":"%016x"},"spec":{"nodeName":"node-%04d","containers":[{"name":"app","image":"registry.example/app:%d"}]},"status":{"phase":"Running","podIP":"10.%d.%d.%d"}}`,
			i, i%997, uint64(i)*0x9e3779b97f4a7c15, i%4093, i%17, i>>16&255, i>>8&255, i&255)
	}
	buf.WriteString(`]}`)
	for buf.Len() < size {
		buf.WriteByte(' ')
	}
	return buf.Bytes()
}

// checkUpload verifies an upload answer.
func checkUpload(body []byte, want int64, sum []byte) error {
	wantStr := fmt.Sprintf(`"bytes":%d,`, want)
	if !bytes.Contains(body, []byte(wantStr)) {
		return fmt.Errorf("upload answer %q: want %s", body, wantStr)
	}
	if sum != nil && !bytes.Contains(body, []byte(hex.EncodeToString(sum))) {
		return errors.New("upload arrived with a different SHA-256")
	}
	return nil
}
