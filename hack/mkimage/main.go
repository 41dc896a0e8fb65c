// Command mkimage builds a single-layer OCI image around one static binary,
// without a container daemon and without a base image: the layer holds the
// binary, the CA certificates of the build machine, a passwd/group entry for
// the non-root user 65532 and an empty /tmp.
//
// The output is one tar file that is at the same time an OCI image layout
// (oci-layout, index.json, blobs/) and a `docker save` archive (manifest.json),
// so `docker load`, `podman load`, `skopeo copy oci-archive:...` and
// `crane push` all accept it. Builds are reproducible: every timestamp is
// SOURCE_DATE_EPOCH (0 when unset).
//
//	go run ./hack/mkimage -binary bin/spectro-proxy-client \
//	    -ref ghcr.io/spectroproxy/spectro-proxy-client:1.3.0 -out bin/images/client.tar
//
// The test cluster's real node (hack/kube-bins.sh) builds its pause and
// busybox images the same way, with -dest, -user, -entrypoint, -cmd and
// -applets (a /bin symlink for every applet the binary lists with --list).
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path"
	"strconv"
	"strings"
	"time"
)

const (
	uid = 65532
	gid = 65532
)

func main() {
	binary := flag.String("binary", "", "Path of the static binary to put in the image.")
	ref := flag.String("ref", "", "Image reference to record, for example ghcr.io/spectroproxy/spectro-proxy-client:1.3.0.")
	out := flag.String("out", "", "Path of the tar file to write.")
	ca := flag.String("ca-file", "/etc/ssl/certs/ca-certificates.crt", "CA bundle to install as /etc/ssl/certs/ca-certificates.crt.")
	arch := flag.String("arch", "amd64", "Architecture the binary was built for.")
	dest := flag.String("dest", "", "Path of the binary in the image. Default /usr/local/bin/<binary's name>.")
	user := flag.String("user", fmt.Sprintf("%d:%d", uid, gid), "User (uid:gid) the image runs as.")
	entrypoint := flag.String("entrypoint", "-", "Entrypoint as a JSON array; '' for none. Default: the binary.")
	cmd := flag.String("cmd", "", "Cmd as a JSON array. Default none.")
	applets := flag.Bool("applets", false, "Add /bin/<applet> symlinks to the binary for every name `<binary> --list` prints (busybox).")
	flag.Parse()
	if *binary == "" || *ref == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "mkimage: -binary, -ref and -out are required")
		flag.Usage()
		os.Exit(2)
	}
	img := image{dest: *dest, user: *user, applets: *applets}
	if img.dest == "" {
		img.dest = "/usr/local/bin/" + path.Base(*binary)
	}
	switch *entrypoint {
	case "-":
		img.entrypoint = []string{img.dest}
	case "":
	default:
		if err := json.Unmarshal([]byte(*entrypoint), &img.entrypoint); err != nil {
			fmt.Fprintln(os.Stderr, "mkimage: -entrypoint:", err)
			os.Exit(2)
		}
	}
	if *cmd != "" {
		if err := json.Unmarshal([]byte(*cmd), &img.cmd); err != nil {
			fmt.Fprintln(os.Stderr, "mkimage: -cmd:", err)
			os.Exit(2)
		}
	}
	if err := build(*binary, *ref, *out, *ca, *arch, img); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

// epoch is the timestamp of every file and of the image.
func epoch() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("parsing SOURCE_DATE_EPOCH: %w", err)
	}
	return time.Unix(n, 0).UTC(), nil
}

type file struct {
	name string
	mode int64
	data []byte // nil for a directory
	link string // symlink target, for a symlink
}

// image is what varies between the images mkimage builds.
type image struct {
	dest       string   // absolute path of the binary in the image
	user       string   // uid:gid
	entrypoint []string // nil for none
	cmd        []string
	applets    bool
}

func build(binary, ref, out, caFile, arch string, img image) error {
	mtime, err := epoch()
	if err != nil {
		return err
	}
	bin, err := os.ReadFile(binary)
	if err != nil {
		return fmt.Errorf("reading binary: %w", err)
	}
	cas, err := os.ReadFile(caFile)
	if err != nil {
		return fmt.Errorf("reading CA bundle: %w", err)
	}
	name := path.Base(img.dest)
	files := []file{
		{name: "etc/", mode: 0o755},
		{name: "etc/passwd", mode: 0o644, data: []byte(fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", uid, gid))},
		{name: "etc/group", mode: 0o644, data: []byte(fmt.Sprintf("root:x:0:\nnonroot:x:%d:\n", gid))},
		{name: "etc/ssl/", mode: 0o755},
		{name: "etc/ssl/certs/", mode: 0o755},
		{name: "etc/ssl/certs/ca-certificates.crt", mode: 0o644, data: cas},
		{name: "home/", mode: 0o755},
		{name: "home/nonroot/", mode: 0o700},
		{name: "tmp/", mode: 0o1777},
	}
	have := map[string]bool{}
	for _, f := range files {
		have[f.name] = true
	}
	addDirs := func(p string) { // every parent directory of p, outermost first
		parts := strings.Split(strings.Trim(path.Dir(p), "/"), "/")
		for i := range parts {
			d := strings.Join(parts[:i+1], "/") + "/"
			if d != "/" && d != "./" && !have[d] {
				files = append(files, file{name: d, mode: 0o755})
				have[d] = true
			}
		}
	}
	addDirs(img.dest)
	files = append(files, file{name: strings.TrimPrefix(img.dest, "/"), mode: 0o755, data: bin})
	have[strings.TrimPrefix(img.dest, "/")] = true
	if img.applets {
		list, err := exec.Command(binary, "--list").Output()
		if err != nil {
			return fmt.Errorf("listing applets of %s: %w", binary, err)
		}
		addDirs("/bin/x")
		for _, a := range strings.Fields(string(list)) {
			n := "bin/" + a
			if have[n] || strings.Contains(a, "/") {
				continue
			}
			files = append(files, file{name: n, mode: 0o777, link: img.dest})
			have[n] = true
		}
	}

	// The layer, and its uncompressed digest (the config's diff_id).
	var layerTar bytes.Buffer
	tw := tar.NewWriter(&layerTar)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: mtime, Format: tar.FormatPAX}
		if f.name == "home/nonroot/" {
			h.Uid, h.Gid = uid, gid
		}
		switch {
		case f.link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.link
		case f.data == nil:
			h.Typeflag = tar.TypeDir
		default:
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(f.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	diffID := digest(layerTar.Bytes())
	var layerGz bytes.Buffer
	gz, err := gzip.NewWriterLevel(&layerGz, gzip.BestCompression)
	if err != nil {
		return err
	}
	if _, err := gz.Write(layerTar.Bytes()); err != nil {
		return err
	}
	if err := gz.Close(); err != nil {
		return err
	}
	layer := layerGz.Bytes()

	repo, tag := splitRef(ref)
	env := "PATH=/usr/local/bin"
	if img.applets || !strings.HasPrefix(img.dest, "/usr/local/bin/") {
		env = "PATH=/usr/local/bin:/usr/bin:/bin"
	}
	cfg := map[string]any{
		"User":       img.user,
		"Env":        []string{env},
		"WorkingDir": "/",
		"Labels": map[string]string{
			"org.opencontainers.image.source":  "https://github.com/spectroproxy/spectro-proxy",
			"org.opencontainers.image.version": tag,
			"org.opencontainers.image.title":   name,
		},
	}
	if img.entrypoint != nil {
		cfg["Entrypoint"] = img.entrypoint
	}
	if img.cmd != nil {
		cfg["Cmd"] = img.cmd
	}
	config, err := json.Marshal(map[string]any{
		"created":      mtime.Format(time.RFC3339),
		"architecture": arch,
		"os":           "linux",
		"config":       cfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{diffID}},
		"history":      []map[string]string{{"created": mtime.Format(time.RFC3339), "created_by": "hack/mkimage " + name}},
	})
	if err != nil {
		return err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        descriptor("application/vnd.oci.image.config.v1+json", config),
		"layers":        []any{descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer)},
	})
	if err != nil {
		return err
	}
	md := descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
	md["annotations"] = map[string]string{
		"io.containerd.image.name":          ref,
		"org.opencontainers.image.ref.name": tag,
	}
	md["platform"] = map[string]string{"architecture": arch, "os": "linux"}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests":     []any{md},
	})
	if err != nil {
		return err
	}
	dockerManifest, err := json.Marshal([]map[string]any{{
		"Config":   blobPath(config),
		"RepoTags": []string{repo + ":" + tag},
		"Layers":   []string{blobPath(layer)},
	}})
	if err != nil {
		return err
	}

	var archive bytes.Buffer
	aw := tar.NewWriter(&archive)
	entries := []file{
		{name: "blobs/", mode: 0o755},
		{name: "blobs/sha256/", mode: 0o755},
		{name: blobPath(config), mode: 0o644, data: config},
		{name: blobPath(layer), mode: 0o644, data: layer},
		{name: blobPath(manifest), mode: 0o644, data: manifest},
		{name: "index.json", mode: 0o644, data: index},
		{name: "manifest.json", mode: 0o644, data: dockerManifest},
		{name: "oci-layout", mode: 0o644, data: []byte(`{"imageLayoutVersion":"1.0.0"}`)},
	}
	for _, f := range entries {
		h := &tar.Header{Name: f.name, Mode: f.mode, ModTime: mtime, Typeflag: tar.TypeReg, Size: int64(len(f.data))}
		if f.data == nil {
			h.Typeflag, h.Size = tar.TypeDir, 0
		}
		if err := aw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := aw.Write(f.data); err != nil {
			return err
		}
	}
	if err := aw.Close(); err != nil {
		return err
	}
	if err := os.WriteFile(out, archive.Bytes(), 0o644); err != nil {
		return err
	}
	fmt.Printf("%s %s (%d bytes, manifest %s)\n", out, ref, archive.Len(), md["digest"])
	return nil
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func blobPath(b []byte) string {
	return "blobs/sha256/" + strings.TrimPrefix(digest(b), "sha256:")
}

func descriptor(mediaType string, b []byte) map[string]any {
	return map[string]any{"mediaType": mediaType, "digest": digest(b), "size": len(b)}
}

// splitRef splits "repo:tag" (the repository may hold a registry port).
func splitRef(ref string) (repo, tag string) {
	i := strings.LastIndex(ref, ":")
	if i < 0 || strings.Contains(ref[i:], "/") {
		return ref, "latest"
	}
	return ref[:i], ref[i+1:]
}
