#!/bin/sh
# kquant operator: `kopf run -m kquant_operator` with its namespace scope and liveness port
# taken from the environment (the Helm chart sets them):
#   KQUANT_WATCH_NAMESPACES  comma list of namespaces; empty: --all-namespaces
#   KQUANT_LIVENESS_PORT     port of http://0.0.0.0:PORT/healthz (8080)
#   KQUANT_PEERING           kopf peering name (replicas > 1: one active operator); empty:
#                            --standalone
#   KQUANT_PEERING_PRIORITY  this replica's kopf priority (default: random, 1 to 16777216).
#                            kopf pauses every operator that shares the highest priority, so
#                            replicas of one priority would all stand still: each draws its
#                            own, the highest runs, the others wait and take over when it goes.
# Extra arguments are passed to `kopf run` (e.g. --verbose, --log-format=plain).
set -eu
peering="--standalone"
priority=""
if [ -n "${KQUANT_PEERING:-}" ]; then
  peering="--peering=$KQUANT_PEERING"
  drawn=$(od -An -N3 -tu4 /dev/urandom | tr -d ' ')
  priority="--priority=${KQUANT_PEERING_PRIORITY:-$((drawn + 1))}"
fi
scope="--all-namespaces"
if [ -n "${KQUANT_WATCH_NAMESPACES:-}" ]; then
  scope=""
  for ns in $(printf '%s' "$KQUANT_WATCH_NAMESPACES" | tr ',' ' '); do
    scope="$scope --namespace=$ns"
  done
fi
# $scope is split on purpose: one flag per namespace; $priority is empty or one flag.
# shellcheck disable=SC2086
exec kopf run -m kquant_operator "$peering" $priority $scope \
  --liveness="http://0.0.0.0:${KQUANT_LIVENESS_PORT:-8080}/healthz" \
  --log-format=json "$@"
