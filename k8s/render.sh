#!/usr/bin/env bash
# Re-renders each reference deployment's manifests.yaml from the chart and its values.yaml.
# tests/test_helm.py checks that the committed manifests equal what the chart renders.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=${HELM:-helm}
for dir in k8s/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  [ -f "$dir/values.yaml" ] || continue
  {
    echo "# Rendered from helm/moe-cluster with k8s/$name/values.yaml by k8s/render.sh; do not edit."
    "$HELM" template "$name" helm/moe-cluster --namespace moe-cluster -f "$dir/values.yaml"
  } > "$dir/manifests.yaml"
  echo "wrote $dir/manifests.yaml"
done
