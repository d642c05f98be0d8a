#!/usr/bin/env bash
# Builds the control-plane and test binaries from the Go module proxy into a cache outside
# the repo, keyed by version: etcd, kube-apiserver, kube-controller-manager, kubectl, helm,
# csi-sanity. Idempotent: a binary already in the cache is not rebuilt.
set -euo pipefail

K8S_VERSION=1.37.2
ETCD_VERSION=3.6.16
HELM_VERSION=3.22.0
CSI_SANITY_VERSION=5.6.0
CSI_SPEC_VERSION=1.13.0

CACHE=${VMT_CACHE:-$HOME/.cache/vmthunder}
BIN=$CACHE/bin
mkdir -p "$BIN"
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local

have() { [ -x "$BIN/$1" ]; }
log() { printf '[build-tools] %s\n' "$*" >&2; }

build_etcd() {
  have etcd-$ETCD_VERSION && return
  log "etcd v$ETCD_VERSION"
  local w; w=$(mktemp -d)
  (cd "$w" && cat > go.mod <<MOD
module vmthunder.local/etcd
go 1.24
MOD
    cat > tools.go <<'GO'
//go:build tools
package tools
import (
	_ "go.etcd.io/etcd/server/v3"
	_ "go.etcd.io/etcd/etcdctl/v3"
)
GO
    go get go.etcd.io/etcd/server/v3@v$ETCD_VERSION go.etcd.io/etcd/etcdctl/v3@v$ETCD_VERSION >/dev/null
    go mod tidy >/dev/null
    go build -trimpath -ldflags='-s -w' -o "$BIN/etcd-$ETCD_VERSION" go.etcd.io/etcd/server/v3
  )
  rm -rf "$w"
}

build_kubernetes() {
  have kube-apiserver-$K8S_VERSION && have kube-controller-manager-$K8S_VERSION \
    && have kubectl-$K8S_VERSION && return
  log "kubernetes v$K8S_VERSION (kube-apiserver, kube-controller-manager, kubectl)"
  local w; w=$(mktemp -d)
  local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
  local staging=0.${K8S_VERSION#1.}
  local gomod
  gomod=$(go mod download -json k8s.io/kubernetes@v$K8S_VERSION | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  (cd "$w"
    printf 'module vmthunder.local/k8s\n\ngo 1.25\n\nrequire k8s.io/kubernetes v%s\n\n' "$K8S_VERSION" > go.mod
    # Every staging module the kubernetes module replaces locally is published on its own.
    for m in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
      case $m in
        k8s.io/sample-cli-plugin|k8s.io/sample-controller)  # not on the proxy; unused here
          mkdir -p "stub/$m"; printf 'module %s\n' "$m" > "stub/$m/go.mod"
          echo "replace $m => ./stub/$m" >> go.mod ;;
        *) echo "replace $m => $m v$staging" >> go.mod ;;
      esac
    done
    cat > tools.go <<'GO'
//go:build tools
package tools
import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    go mod tidy >/dev/null 2>&1 || go mod tidy
    local ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld="$ld -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    done
    for c in kube-apiserver kube-controller-manager kubectl; do
      have $c-$K8S_VERSION && continue
      log "  go build $c"
      go build -trimpath -ldflags="$ld" -o "$BIN/$c-$K8S_VERSION" k8s.io/kubernetes/cmd/$c
    done
  )
  rm -rf "$w"
}

build_go_install() {  # name version module-path
  have "$1-$2" && return
  log "$1 v$2"
  local d; d=$(mktemp -d)
  GOBIN=$d go install "$3@v$2"
  mv "$d/$1" "$BIN/$1-$2"; rm -rf "$d"
}

fetch_csi_proto() {
  [ -f "$CACHE/csi-spec-$CSI_SPEC_VERSION/csi.proto" ] && return
  log "csi.proto v$CSI_SPEC_VERSION"
  local dir
  dir=$(go mod download -json github.com/container-storage-interface/spec@v$CSI_SPEC_VERSION | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$CACHE/csi-spec-$CSI_SPEC_VERSION"
  cp "$dir/csi.proto" "$CACHE/csi-spec-$CSI_SPEC_VERSION/csi.proto"
}

link() {  # unversioned names for the current pins, so callers need not know the versions
  case $1 in
    etcd) ln -sf etcd-$ETCD_VERSION "$BIN/etcd" ;;
    kubernetes) for c in kube-apiserver kube-controller-manager kubectl; do ln -sf $c-$K8S_VERSION "$BIN/$c"; done ;;
    helm) ln -sf helm-$HELM_VERSION "$BIN/helm" ;;
    csi-sanity) ln -sf csi-sanity-$CSI_SANITY_VERSION "$BIN/csi-sanity" ;;
    csi-proto) ln -sfn csi-spec-$CSI_SPEC_VERSION "$CACHE/csi-spec" ;;
  esac
}

want=${*:-etcd kubernetes helm csi-sanity csi-proto}
for t in $want; do
  case $t in
    etcd) build_etcd ;;
    kubernetes) build_kubernetes ;;
    helm) build_go_install helm $HELM_VERSION helm.sh/helm/v3/cmd/helm ;;
    csi-sanity) build_go_install csi-sanity $CSI_SANITY_VERSION github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity ;;
    csi-proto) fetch_csi_proto ;;
    *) echo "unknown tool: $t" >&2; exit 2 ;;
  esac
  link "$t"
done
log "done: $BIN"
