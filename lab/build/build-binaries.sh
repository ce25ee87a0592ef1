#!/usr/bin/env bash
# Builds the lab's real binaries from Go modules into a cache keyed by version, once.
#   kube-apiserver, kube-controller-manager, kube-scheduler  (k8s.io/kubernetes, pinned)
#   kwok                                                      (sigs.k8s.io/kwok)
#   helm                                                      (helm.sh/helm/v3)
# Re-running is cheap: a binary whose versioned path exists is not rebuilt.
set -euo pipefail
K8S_VERSION="${K8S_VERSION:-1.35.4}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
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

helm_bin="$BIN/helm-$HELM_VERSION"
if [[ ! -x "$helm_bin" ]]; then
  echo "building helm $HELM_VERSION" >&2
  GOBIN="$CACHE/src/helm-$HELM_VERSION" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$CACHE/src/helm-$HELM_VERSION/helm" "$helm_bin"
fi
echo "$BIN"
