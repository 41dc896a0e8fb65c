#!/usr/bin/env bash
# Builds the real control-plane binaries the end-to-end tests run (etcd,
# kube-apiserver, kwok) from the Go module proxy, and caches them outside the
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
CACHE=${SPECTRO_PROXY_CACHE:-$HOME/.cache/spectro-proxy}
BIN=$CACHE/bin
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

build_kube() {
  local out=$BIN/kube-apiserver-$KUBE_VERSION
  [ -x "$out" ] && return
  log "building kube-apiserver $KUBE_VERSION (about 9 minutes the first time)"
  local w; w=$(mktemp -d)
  local staging=v0.${KUBE_VERSION#v1.}
  local gomod
  gomod=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  {
    printf 'module kubewrapper\n\ngo 1.24.0\n\ngodebug default=go1.24\n\nrequire k8s.io/kubernetes %s\n\n' "$KUBE_VERSION"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk '{print $1}' | grep -v '/sample-' |
      while read -r m; do printf 'replace %s => %s %s\n' "$m" "$m" "$staging"; done
  } >"$w/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n' >"$w/tools.go"
  local pkg=k8s.io/component-base/version
  (cd "$w" && GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 &&
    go build -trimpath -ldflags "-s -w -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)" \
      -o "$out.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$out.tmp" "$out"
  rm -rf "$w"
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
# $BIN/kwok-stages and $BIN/kwok-crds links. Runs every time (it is cheap and
# repairs a partial copy); fails loudly when something is missing.
copy_kwok_files() {
  local src tmp; tmp=$(mktemp -d)
  src=$(cd "$tmp" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  rmdir "$tmp"
  [ -d "$src/kustomize/stage" ] || { log "kwok module source not found (got '$src')"; exit 1; }
  local stages=$CACHE/kwok-stages-$KWOK_VERSION crds=$CACHE/kwok-crds-$KWOK_VERSION
  rm -rf "$stages" "$crds"
  mkdir -p "$stages" "$crds"
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
  ln -sfn "../kwok-stages-$KWOK_VERSION" "$BIN/kwok-stages"
  ln -sfn "../kwok-crds-$KWOK_VERSION" "$BIN/kwok-crds"
  log "kwok: $n stage files in $stages, CRDs in $crds"
}

# Sequential on purpose: two heavy Go builds at once on 2 cores thrash.
build_etcd
build_kwok
build_kube
copy_kwok_files
ln -sf "etcd-$ETCD_VERSION" "$BIN/etcd"
ln -sf "kube-apiserver-$KUBE_VERSION" "$BIN/kube-apiserver"
ln -sf "kwok-$KWOK_VERSION" "$BIN/kwok"
echo "$BIN"
