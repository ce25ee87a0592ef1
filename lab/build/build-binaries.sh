#!/usr/bin/env bash
# Builds the lab's real binaries from Go modules into a cache keyed by version, once.
#   kube-apiserver, kube-controller-manager, kube-scheduler  (k8s.io/kubernetes, pinned)
#   kwok                                                      (sigs.k8s.io/kwok)
#   helm                                                      (helm.sh/helm/v3)
#   etcd                                                      (go.etcd.io/etcd/server/v3)
# etcd is built because client-go >= 0.35 (kwok v0.8.0 uses 0.36) opens informers with streaming watch-lists,
# which kube-apiserver refuses unless etcd supports RequestWatchProgress (>= 3.4.31 / 3.5.13); Debian's
# etcd-server 3.4.23 leaves such informers stale ("required storage feature RequestWatchProgress is disabled").
# Re-running is cheap: a binary whose versioned path exists is not rebuilt.
set -euo pipefail
K8S_VERSION="${K8S_VERSION:-1.35.4}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE="${GPUFORGE_CACHE:-$HOME/.cache/gpuforge}"
BIN="$CACHE/bin"
mkdir -p "$BIN"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

minor="${K8S_VERSION#*.}"; minor="${minor%%.*}"
k8s_dir="$BIN/kubernetes-v$K8S_VERSION"
if [[ ! -x "$k8s_dir/kube-scheduler" ]]; then
  echo "building Kubernetes v$K8S_VERSION control plane (first time: long)" >&2
  work="$CACHE/src/k8sbins-$K8S_VERSION"; mkdir -p "$work" "$k8s_dir"
  staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider cluster-bootstrap
    code-generator component-base component-helpers controller-manager cri-api cri-client csi-translation-lib
    dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy
    kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver)
  if (( minor >= 36 )); then staging+=(cri-streaming streaming); fi
  {
    echo "module lab/k8sbins"; echo; echo "go 1.26"; echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"; echo; echo "replace ("
    for s in "${staging[@]}"; do echo "	k8s.io/$s => k8s.io/$s v0.${K8S_VERSION#1.}"; done
    echo ")"
  } > "$work/go.mod"
  cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
  ldf="-s -w"
  for kv in "gitVersion=v$K8S_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean "buildDate=1970-01-01T00:00:00Z"; do
    ldf="$ldf -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  (cd "$work" && go mod tidy -e >/dev/null 2>&1 || true
   cd "$work" && go get k8s.io/kubernetes@v$K8S_VERSION >/dev/null
   for c in kube-apiserver kube-controller-manager kube-scheduler; do
     echo "  go build $c" >&2
     go build -p 2 -trimpath -tags selinux,notest,tools -ldflags "$ldf" -o "$k8s_dir/$c.tmp" "k8s.io/kubernetes/cmd/$c"
     mv "$k8s_dir/$c.tmp" "$k8s_dir/$c"
   done)
fi

kwok_bin="$BIN/kwok-$KWOK_VERSION"
if [[ ! -x "$kwok_bin" ]]; then
  echo "building kwok $KWOK_VERSION" >&2
  GOBIN="$CACHE/src/kwok-$KWOK_VERSION" go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  mv "$CACHE/src/kwok-$KWOK_VERSION/kwok" "$kwok_bin"
fi
# kwok's CRDs (the lab applies Logs) next to the binary, so the lab does not depend on the Go module cache.
kwok_crds="$BIN/kwok-$KWOK_VERSION-crds"
if [[ ! -f "$kwok_crds/kwok.x-k8s.io_logs.yaml" ]]; then
  moddir="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION"
  [[ -d "$moddir" ]] || (cd "$CACHE/src" && GOFLAGS=-mod=mod go mod download "sigs.k8s.io/kwok@$KWOK_VERSION")
  mkdir -p "$kwok_crds.tmp"
  cp "$moddir"/kustomize/crd/bases/*.yaml "$kwok_crds.tmp/"
  chmod 644 "$kwok_crds.tmp"/*.yaml
  rm -rf "$kwok_crds"; mv "$kwok_crds.tmp" "$kwok_crds"
fi

helm_bin="$BIN/helm-$HELM_VERSION"
if [[ ! -x "$helm_bin" ]]; then
  echo "building helm $HELM_VERSION" >&2
  GOBIN="$CACHE/src/helm-$HELM_VERSION" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$CACHE/src/helm-$HELM_VERSION/helm" "$helm_bin"
fi
etcd_dir="$BIN/etcd-$ETCD_VERSION"
if [[ ! -x "$etcd_dir/etcd" ]]; then
  echo "building etcd $ETCD_VERSION" >&2
  # server/v3's go.mod has replace lines, so `go install @version` is refused: build from a wrapper module.
  work="$CACHE/src/etcdbin-$ETCD_VERSION"; mkdir -p "$work" "$etcd_dir"
  printf 'module lab/etcdbin\n\ngo 1.26\n' > "$work/go.mod"
  cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$work" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
   go build -p 2 -trimpath -tags tools -ldflags "-s -w" -o "$etcd_dir/etcd.tmp" go.etcd.io/etcd/server/v3
   mv "$etcd_dir/etcd.tmp" "$etcd_dir/etcd")
fi
echo "$BIN"
