#!/usr/bin/env bash
# Builds the real control-plane binaries the end-to-end tests run (etcd,
# kube-apiserver, kwok; for a real node also kubelet, kube-proxy,
# kube-controller-manager, kube-scheduler, CoreDNS and the pause and busybox
# images) from the Go module proxy, and caches them outside the
# repository keyed by version, so only the first run on a machine pays the
# ~12 minutes. Prints the cache directory holding the binaries.
#
# Kubernetes cannot be `go install`ed: its go.mod replaces every k8s.io/*
# staging module with ./staging/..., which the module zip leaves empty. A
# throwaway wrapper module replaces each of them with the published v0.X.Y.
set -euo pipefail

ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KUBE_VERSION=${KUBE_VERSION:-v1.34.4}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.7}
CACHE=${SPECTRO_PROXY_CACHE:-$HOME/.cache/spectro-proxy}
BIN=$CACHE/bin
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$BIN"
# etcd reads every ETCD_* variable as a flag; none of ours may leak into it.
unset $(env | grep -o '^ETCD_[A-Z_]*' | grep -v '^ETCD_VERSION$' || true)

log() { echo "kube-bins: $*" >&2; }

build_etcd() {
  local out=$BIN/etcd-$ETCD_VERSION
  [ -x "$out" ] && return
  log "building etcd $ETCD_VERSION (about 2 minutes the first time)"
  local w; w=$(mktemp -d)
  cat >"$w/go.mod" <<MOD
module etcdwrapper

go 1.24.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$w/tools.go"
  (cd "$w" && GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 && go build -trimpath -ldflags "-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3)
  mv "$out.tmp" "$out"
  rm -rf "$w"
}

# kube_wrapper writes the wrapper module into $1. Its tools.go imports every
# command we build, so `go mod tidy` keeps one module graph for all of them:
# the graph is k8s.io/kubernetes' own requirements either way, and with the
# same flags the later commands reuse the packages kube-apiserver compiled.
kube_wrapper() {
  local w=$1
  local staging=v0.${KUBE_VERSION#v1.}
  local gomod
  gomod=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  {
    printf 'module kubewrapper\n\ngo 1.24.0\n\ngodebug default=go1.24\n\nrequire k8s.io/kubernetes %s\n\n' "$KUBE_VERSION"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}' | grep -v '/sample-' |
      while read -r m; do printf 'replace %s => %s %s\n' "$m" "$m" "$staging"; done
  } >"$w/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for c in kube-apiserver $KUBE_NODE_CMDS; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
    printf ')\n'
  } >"$w/tools.go"
  (cd "$w" && GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1)
}

# The commands of a real node (internal/testcluster's RealNode mode).
KUBE_NODE_CMDS="kubelet kube-proxy kube-controller-manager kube-scheduler"

# build_kube_cmds builds each named k8s.io/kubernetes command missing from
# the cache, from one wrapper module and with the same flags throughout.
build_kube_cmds() {
  local missing=() c
  for c in "$@"; do [ -x "$BIN/$c-$KUBE_VERSION" ] || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] && return
  log "building ${missing[*]} $KUBE_VERSION (kube-apiserver about 9 minutes the first time; the node commands about 2 more)"
  local w; w=$(mktemp -d)
  kube_wrapper "$w"
  local pkg=k8s.io/component-base/version
  for c in "${missing[@]}"; do
    local out=$BIN/$c-$KUBE_VERSION
    (cd "$w" &&
      go build -trimpath -ldflags "-s -w -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)" \
        -o "$out.tmp" "k8s.io/kubernetes/cmd/$c")
    mv "$out.tmp" "$out"
  done
  rm -rf "$w"
}

# CoreDNS serves the real node's cluster DNS. Built with only the plugins the
# test cluster's Corefile uses (CoreDNS' documented way of a custom build),
# which leaves out the cloud providers' SDKs that its full plugin set pulls in.
build_coredns() {
  local out=$BIN/coredns-$COREDNS_VERSION
  [ -x "$out" ] && return
  log "building coredns $COREDNS_VERSION (about 2 minutes the first time)"
  local w; w=$(mktemp -d)
  printf 'module corednswrapper\n\ngo 1.25.0\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" >"$w/go.mod"
  cat >"$w/main.go" <<'GO'
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/template"
)

func main() { coremain.Run() }
GO
  (cd "$w" && GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 && go build -trimpath -ldflags "-s -w" -o "$out.tmp" .)
  mv "$out.tmp" "$out"
  rm -rf "$w"
}

# Images for the real node, built without Docker and cached by version:
# pause from Kubernetes' pause.c (static, with gcc), busybox from Debian's
# busybox-static. Each is an OCI archive for `ctr images import`.
PAUSE_VERSION=${PAUSE_VERSION:-3.10.1}
build_images() {
  local img=$CACHE/images
  mkdir -p "$img"
  local pause=$img/pause-$PAUSE_VERSION-$KUBE_VERSION.tar
  if [ ! -f "$pause" ]; then
    command -v gcc >/dev/null || { log "gcc missing: apt-get install gcc libc6-dev (the pause image)"; exit 1; }
    local src; src=$(cd /tmp && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
    [ -f "$src/build/pause/linux/pause.c" ] || { log "pause.c not found in $src/build/pause/linux"; exit 1; }
    local t; t=$(mktemp -d)
    gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION" -o "$t/pause" "$src/build/pause/linux/pause.c"
    strip "$t/pause"
    (cd "$REPO" && go run ./hack/mkimage -binary "$t/pause" -dest /pause -user 65535:65535 \
      -ref "registry.k8s.io/pause:$PAUSE_VERSION" -out "$pause.tmp" >/dev/null)
    mv "$pause.tmp" "$pause"
    rm -rf "$t"
  fi
  if [ -x /bin/busybox ] && [ -n "$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null)" ]; then
    local bv; bv=$(dpkg-query -W -f '${Version}' busybox-static | sed 's/^[0-9]*://; s/[^A-Za-z0-9_.-]/_/g')
    local busybox=$img/busybox-$bv.tar
    if [ ! -f "$busybox" ]; then
      (cd "$REPO" && go run ./hack/mkimage -binary /bin/busybox -dest /bin/busybox -applets -user 0:0 -entrypoint '' -cmd '["sh"]' \
        -ref "spectro-proxy.local/busybox:$bv" -out "$busybox.tmp" >/dev/null)
      mv "$busybox.tmp" "$busybox"
    fi
    ln -sfn "busybox-$bv.tar" "$img/busybox.tar"
  else
    log "busybox-static not installed: no busybox image (the real-node tests skip)"
  fi
  ln -sfn "pause-$PAUSE_VERSION-$KUBE_VERSION.tar" "$img/pause.tar"
  ln -sfn ../images "$BIN/images"
}

build_kwok() {
  local out=$BIN/kwok-$KWOK_VERSION
  [ -x "$out" ] && return
  log "building kwok $KWOK_VERSION (about 3-6 minutes the first time)"
  GOBIN=$BIN/kwok-build go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  mv "$BIN/kwok-build/kwok" "$out"
  rmdir "$BIN/kwok-build"
}

# kwok ships no default stages and does not install its own CRDs (kwokctl
# does). Copy both from kwok's module source into version-keyed directories
# next to the binaries; internal/testcluster reads them through the
# $BIN/kwok-stages and $BIN/kwok-crds links. Written once per version (into
# temporary directories, then renamed) and left alone when present: tests of
# another run may be reading them. Fails loudly when something is missing.
copy_kwok_files() {
  local final_stages=$CACHE/kwok-stages-$KWOK_VERSION final_crds=$CACHE/kwok-crds-$KWOK_VERSION
  if [ -d "$final_stages" ] && [ -d "$final_crds" ]; then
    ln -sfn "../kwok-stages-$KWOK_VERSION" "$BIN/kwok-stages"
    ln -sfn "../kwok-crds-$KWOK_VERSION" "$BIN/kwok-crds"
    return
  fi
  local src tmp; tmp=$(mktemp -d)
  src=$(cd "$tmp" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  rmdir "$tmp"
  [ -d "$src/kustomize/stage" ] || { log "kwok module source not found (got '$src')"; exit 1; }
  local stages crds
  stages=$(mktemp -d "$CACHE/.kwok-stages.XXXXXX") crds=$(mktemp -d "$CACHE/.kwok-crds.XXXXXX")
  # The "fast" set as kwok's kustomize/stage/fast/kustomization.yaml lists it.
  # Only the Stage documents: each directory also has a kustomization.yaml
  # (same name in every directory), which is not kwok configuration.
  local d f n=0
  for d in node/fast node/heartbeat-with-lease pod/fast; do
    for f in "$src/kustomize/stage/$d"/*.yaml; do
      [ "$(basename "$f")" = kustomization.yaml ] && continue
      grep -q '^kind: Stage$' "$f" || { log "$f is not a kwok Stage"; exit 1; }
      cp "$f" "$stages/$(echo "$d" | tr / -)-$(basename "$f")"
      n=$((n + 1))
    done
  done
  ls "$stages"/node-fast-*.yaml "$stages"/pod-fast-*.yaml >/dev/null ||
    { log "node or pod fast stages missing in $src/kustomize/stage"; exit 1; }
  cp "$src"/kustomize/crd/bases/*.yaml "$crds/"
  for f in execs logs portforwards attaches; do
    [ -f "$crds/kwok.x-k8s.io_$f.yaml" ] || { log "kwok CRD $f missing in $src/kustomize/crd/bases"; exit 1; }
  done
  chmod -R u+w "$stages" "$crds"
  chmod 755 "$stages" "$crds"
  [ -d "$final_stages" ] && rm -rf "$stages" || mv "$stages" "$final_stages"
  [ -d "$final_crds" ] && rm -rf "$crds" || mv "$crds" "$final_crds"
  stages=$final_stages crds=$final_crds
  ln -sfn "../kwok-stages-$KWOK_VERSION" "$BIN/kwok-stages"
  ln -sfn "../kwok-crds-$KWOK_VERSION" "$BIN/kwok-crds"
  log "kwok: $n stage files in $stages, CRDs in $crds"
}

# Sequential on purpose: two heavy Go builds at once on 2 cores thrash.
build_etcd
build_kwok
build_kube_cmds kube-apiserver
copy_kwok_files
ln -sf "etcd-$ETCD_VERSION" "$BIN/etcd"
ln -sf "kube-apiserver-$KUBE_VERSION" "$BIN/kube-apiserver"
# The real node's parts (SPECTRO_PROXY_NO_NODE=1 skips them).
if [ -z "${SPECTRO_PROXY_NO_NODE:-}" ]; then
  build_kube_cmds $KUBE_NODE_CMDS
  build_coredns
  build_images
  for c in $KUBE_NODE_CMDS; do ln -sf "$c-$KUBE_VERSION" "$BIN/$c"; done
  ln -sf "coredns-$COREDNS_VERSION" "$BIN/coredns"
fi
ln -sf "kwok-$KWOK_VERSION" "$BIN/kwok"
echo "$BIN"
