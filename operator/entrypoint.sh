#!/bin/sh
# kquant operator: `kopf run -m kquant_operator` with its namespace scope and liveness port
# taken from the environment (the Helm chart sets them):
#   KQUANT_WATCH_NAMESPACES  comma list of namespaces; empty: --all-namespaces
#   KQUANT_LIVENESS_PORT     port of http://0.0.0.0:PORT/healthz (8080)
#   KQUANT_PEERING           kopf peering name (replicas > 1: one active operator); empty:
#                            --standalone
# Extra arguments are passed to `kopf run` (e.g. --verbose, --log-format=plain).
set -eu
peering="--standalone"
if [ -n "${KQUANT_PEERING:-}" ]; then
  peering="--peering=$KQUANT_PEERING"
fi
scope="--all-namespaces"
if [ -n "${KQUANT_WATCH_NAMESPACES:-}" ]; then
  scope=""
  for ns in $(printf '%s' "$KQUANT_WATCH_NAMESPACES" | tr ',' ' '); do
    scope="$scope --namespace=$ns"
  done
fi
# $scope is split on purpose: one flag per namespace.
# shellcheck disable=SC2086
exec kopf run -m kquant_operator "$peering" $scope \
  --liveness="http://0.0.0.0:${KQUANT_LIVENESS_PORT:-8080}/healthz" \
  --log-format=json "$@"
