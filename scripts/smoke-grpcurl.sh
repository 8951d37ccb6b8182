#!/usr/bin/env bash
# Smoke test with a real grpcurl against `leadrelay up`, exactly as README.md shows it:
# every gRPC service lists itself, health and reflection; `describe` prints the documented
# model; health is SERVING; the gateway answers /healthz and refuses a webhook without token.
#
# Usage: scripts/smoke-grpcurl.sh [path/to/leadrelay] [path/to/grpcurl]
set -euo pipefail

leadrelay=$(realpath "${1:-target/debug/leadrelay}")
grpcurl=${2:-grpcurl}
workdir=$(mktemp -d)
log="$workdir/up.log"
pid=""

fail() {
  echo "smoke: FAILED: $*" >&2
  echo "--- leadrelay up output ---" >&2
  cat "$log" >&2 || true
  exit 1
}
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$workdir"
}
trap cleanup EXIT

# The default ports of the operator contract, as the README session uses them. They lie in
# Linux's ephemeral range (32768-60999), so right after the test suite's thousands of connections
# one of them may still be the local end of a closing connection: start-up then fails with
# "Address already in use", and is tried again a few times. (.ci/run reserves these ports first
# where it runs as root.)
start_up() {
  (cd "$workdir" && exec "$leadrelay" up) >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    grep -q "Stop with" "$log" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
for attempt in 1 2 3 4 5; do
  start_up && break
  grep -q "Address already in use" "$log" || fail "leadrelay up exited during start-up"
  [ "$attempt" -lt 5 ] || fail "a default port stayed in use"
  echo "smoke: a default port is still in use (attempt $attempt); trying again in 3 s"
  kill -KILL "$pid" 2>/dev/null || true
  sleep 3
done
grep -q "Stop with" "$log" || fail "leadrelay up did not announce itself within 10 s"

expect_services() {
  local port=$1; shift
  local listed
  listed=$("$grpcurl" -plaintext "127.0.0.1:$port" list) || fail "grpcurl list on :$port"
  for service in grpc.health.v1.Health grpc.reflection.v1.ServerReflection grpc.reflection.v1alpha.ServerReflection "$@"; do
    grep -qx "$service" <<<"$listed" || fail ":$port does not list $service (got: $listed)"
  done
  for service in "" "$@"; do
    local status
    status=$("$grpcurl" -plaintext -d "{\"service\":\"$service\"}" "127.0.0.1:$port" grpc.health.v1.Health/Check) \
      || fail "health check of '$service' on :$port"
    grep -q '"status": "SERVING"' <<<"$status" || fail "'$service' on :$port is not SERVING: $status"
  done
  echo "smoke: :$port lists and serves $*"
}

expect_services 50051 leadrelay.v1.OrchestratorService
expect_services 50052 leadrelay.hana.v1.HanaAdapterService leadrelay.v1.CrmSyncService
expect_services 50053 leadrelay.pipedrive.v1.PipedriveAdapterService leadrelay.v1.CrmSyncService
expect_services 50054 leadrelay.salesman.v1.SalesManAdapterService leadrelay.v1.CrmSyncService

described=$("$grpcurl" -plaintext 127.0.0.1:50051 describe leadrelay.v1.Lead) || fail "describe leadrelay.v1.Lead"
grep -q "// Lead is a customer captured in chat" <<<"$described" || fail "Lead is not documented: $described"
grep -q "repeated string emails" <<<"$described" || fail "Lead has no emails: $described"
echo "smoke: describe leadrelay.v1.Lead prints the documented message"

# Unconfigured adapters say which variable to set.
answer=$("$grpcurl" -plaintext -d '{"title":"Smoke"}' 127.0.0.1:50053 \
  leadrelay.pipedrive.v1.PipedriveAdapterService/AddDeal 2>&1 || true)
grep -q "FailedPrecondition" <<<"$answer" && grep -q "LEADRELAY_PIPEDRIVE_API_TOKEN" <<<"$answer" \
  || fail "AddDeal without a token: $answer"
echo "smoke: an unconfigured adapter names LEADRELAY_PIPEDRIVE_API_TOKEN"

code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/healthz)
[ "$code" = 200 ] || fail "GET /healthz answered $code"
body=$(curl -s -w '\n%{http_code}' -X POST -H 'Content-Type: application/json' -d '{}' \
  http://127.0.0.1:8080/webhooks/hana/lead.created)
[ "$(tail -n1 <<<"$body")" = 401 ] || fail "webhook without token answered: $body"
grep -q '"error"' <<<"$body" || fail "401 is not JSON: $body"
echo "smoke: /healthz is 200, a webhook without token is 401 JSON"

kill -TERM "$pid"
started=$(date +%s%N)
rc=0
wait "$pid" || rc=$?
took_ms=$(( ($(date +%s%N) - started) / 1000000 ))
pid=""
[ "$rc" = 0 ] || fail "leadrelay up exited with $rc after SIGTERM"
[ "$took_ms" -lt 5000 ] || fail "leadrelay up took ${took_ms} ms to stop"
echo "smoke: SIGTERM stopped leadrelay up in ${took_ms} ms with exit code 0"
echo "smoke: passed"
