#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the operator tests and bench:
# etcd + kube-apiserver + kube-controller-manager 1.20.2 (no scheduler or kubelet: pods never run).
#
#   scripts/kube.sh build   build kube-apiserver/-controller-manager once from Debian's `kubernetes`
#                           source package; cached outside the repo in ${V4D_KUBE_CACHE:-~/.cache/v4d/k8s}
#   scripts/kube.sh start   start etcd + apiserver + controller-manager, write a kubeconfig, wait for readyz
#   scripts/kube.sh stop    stop them (recorded PIDs)
#   scripts/kube.sh env     print `export KUBECONFIG=...`
#
# Ports: etcd 2379/2380, apiserver 6443, controller-manager 10257 (all 127.0.0.1).
# State lives in ${V4D_KUBE_DIR:-<repo>/.cache/kube} (wiped on start).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Its own variable: tests point V4D_CACHE (model checkpoints) at temp dirs, which must not force a rebuild.
CACHE=${V4D_KUBE_CACHE:-$HOME/.cache/v4d/k8s}
BIN=$CACHE/bin
RUN=${V4D_KUBE_DIR:-$ROOT/.cache/kube}
K8S_VERSION=1.20.2

log() { echo "kube.sh: $*" >&2; }

apt_install() {  # install the Debian packages that are missing
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

built() { [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; }

build() {
  apt_install golang-go rsync etcd-server
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.build.lock"
  flock 9  # a second caller waits for the first build, then finds the binaries
  if built; then log "binaries cached in $BIN"; return 0; fi
  local B=$CACHE/build
  rm -rf "$B"
  mkdir -p "$B/apt/lists/partial" "$B/apt/cache/archives/partial" "$B/apt/parts" "$B/home" "$B/src"
  # Private apt config with deb-src entries: the system's apt configuration stays untouched.
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$B/apt/parts/src.sources"
  local APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$B/apt/parts"
             -o "Dir::State::Lists=$B/apt/lists" -o "Dir::Cache=$B/apt/cache")
  log "downloading the kubernetes source package"
  apt-get "${APT[@]}" update -qq
  (cd "$B/src" && apt-get "${APT[@]}" source --download-only -qq kubernetes >/dev/null \
     && apt-get download -qq golang-github-modern-go-reflect2-dev >/dev/null)
  tar -xzf "$B"/src/kubernetes_*.orig.tar.gz -C "$B/src"
  local T=$B/src/kubernetes-$K8S_VERSION
  # The vendored reflect2 1.0.1 segfaults under Go >= 1.18 at the first CR create: use Debian's 1.0.2.
  dpkg-deb -x "$B"/src/golang-github-modern-go-reflect2-dev_*.deb "$B/reflect2"
  local R=$T/vendor/github.com/modern-go/reflect2
  rm -f "$R"/*.go "$R"/*.s
  cp "$B"/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R"/
  cp "$B"/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$R"/ 2>/dev/null || true
  cat >"$B/version.env" <<EOF
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='v$K8S_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
  log "building kube-apiserver + kube-controller-manager (several minutes)"
  (cd "$T" && env HOME="$B/home" GOFLAGS= GOPROXY=off CGO_ENABLED=0 KUBE_GIT_VERSION_FILE="$B/version.env" \
     make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$B/make.log" 2>&1) \
     || { tail -30 "$B/make.log" >&2; exit 1; }
  mkdir -p "$BIN"
  cp "$T/_output/bin/kube-apiserver" "$T/_output/bin/kube-controller-manager" "$BIN/"
  "$BIN/kube-apiserver" --version
  rm -rf "$B"  # ~2 GB of tree and Go cache; the binaries are all we keep
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  for p in controller-manager apiserver etcd; do
    if pid_alive "$RUN/$p.pid"; then
      kill "$(cat "$RUN/$p.pid")" 2>/dev/null || true
      for _ in $(seq 50); do pid_alive "$RUN/$p.pid" || break; sleep 0.1; done
      pid_alive "$RUN/$p.pid" && kill -9 "$(cat "$RUN/$p.pid")" 2>/dev/null || true
    fi
    rm -f "$RUN/$p.pid"
  done
}

write_kubeconfig() {  # PATH TOKEN
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: v4d-local
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$RUN/pki/serving.crt"}
users:
- name: user
  user: {token: "$2"}
contexts:
- name: v4d-local
  context: {cluster: v4d-local, user: user, namespace: default}
current-context: v4d-local
EOF
}

start() {
  built || build
  command -v etcd >/dev/null || apt_install etcd-server
  stop
  rm -rf "$RUN"
  mkdir -p "$RUN/etcd-data" "$RUN/pki"
  openssl genrsa -out "$RUN/pki/sa.key" 2048 2>/dev/null
  # Our own serving certificate, so that kubeconfigs verify it (no insecure-skip-tls-verify, no warnings).
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=v4d-local-apiserver \
    -addext "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes.default.svc" \
    -keyout "$RUN/pki/serving.key" -out "$RUN/pki/serving.crt" 2>/dev/null
  local token optoken
  token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  optoken=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  # A second identity for the operator under test, so that the audit log can count its writes alone.
  printf '%s\n' "$token,admin,admin-uid,system:masters" \
    "$optoken,v4d-operator,v4d-operator-uid,system:masters" >"$RUN/pki/tokens.csv"
  write_kubeconfig "$RUN/kubeconfig" "$token"
  write_kubeconfig "$RUN/operator.kubeconfig" "$optoken"
  # Audit every write (metadata only): tests and the bench count API writes per user from audit.log.
  cat >"$RUN/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
EOF
  (cd "$RUN" && exec etcd --name v4d --data-dir etcd-data \
     --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
     --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
     --initial-cluster v4d=http://127.0.0.1:2380 >etcd.log 2>&1) &
  echo $! >"$RUN/etcd.pid"
  (cd "$RUN" && exec "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
     --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=6443 \
     --tls-cert-file=pki/serving.crt --tls-private-key-file=pki/serving.key \
     --token-auth-file=pki/tokens.csv --authorization-mode=RBAC \
     --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=pki/sa.key \
     --service-account-signing-key-file=pki/sa.key --service-cluster-ip-range=10.96.0.0/24 \
     --audit-policy-file=audit-policy.yaml --audit-log-path=audit.log \
     >apiserver.log 2>&1) &
  echo $! >"$RUN/apiserver.pid"
  local ok=""
  for _ in $(seq 90); do
    if [ "$(curl -sk -m 2 -H "Authorization: Bearer $token" https://127.0.0.1:6443/readyz 2>/dev/null)" = ok ]; then
      ok=1; break
    fi
    pid_alive "$RUN/apiserver.pid" || break
    sleep 1
  done
  if [ -z "$ok" ]; then
    log "apiserver did not become ready; last log lines:"; tail -20 "$RUN/apiserver.log" >&2 || true
    stop; exit 1
  fi
  # The controller-manager gives ownerReference GC, namespace deletion, ResourceQuota status (quota
  # admission enforces a quota only once its status is filled in) and the default ServiceAccount.
  (cd "$RUN" && exec "$BIN/kube-controller-manager" --kubeconfig=kubeconfig --leader-elect=false \
     --bind-address=127.0.0.1 --secure-port=10257 --port=0 \
     --service-account-private-key-file=pki/sa.key --use-service-account-credentials=false \
     >controller-manager.log 2>&1) &
  echo $! >"$RUN/controller-manager.pid"
  log "ready: export KUBECONFIG=$RUN/kubeconfig"
}

case "${1:-}" in
  build) build ;;
  start) start ;;
  stop) stop ;;
  env) echo "export KUBECONFIG=$RUN/kubeconfig" ;;
  *) echo "usage: $0 build|start|stop|env" >&2; exit 2 ;;
esac
