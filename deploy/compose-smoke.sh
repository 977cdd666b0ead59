#!/usr/bin/env bash
# Builds the images (no registry), starts the compose cluster, waits for health, asks for
# candidates through the orchestrator from inside the compose network (container name
# resolution), retrains from the NATS stream and rolls out v2 under client traffic, SIGKILLs one
# user-tower replica during the rollout, checks that no client request failed, that every host
# serves v2 and that no answer mixed versions, restarts the replica (it rebuilds its state from
# the stream), then tears everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME="tandem-smoke-$$"
export TANDEM_HOMEFEED_PORT="${TANDEM_HOMEFEED_PORT:-17301}"
export TANDEM_HOMEFEED_METRICS_PORT="${TANDEM_HOMEFEED_METRICS_PORT:-19301}"
export TANDEM_DASHBOARD_PORT="${TANDEM_DASHBOARD_PORT:-17401}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tandem-target}"
if docker compose version >/dev/null 2>&1; then
  compose() { docker compose -f docker-compose.yml "$@"; }
else
  compose() { docker-compose -f docker-compose.yml "$@"; }
fi
cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
t0=$(date +%s)
say() { echo "[compose-smoke $(( $(date +%s) - t0 ))s] $*"; }

deploy/build-image.sh
t_image=$(( $(date +%s) - t0 ))
say "image built"

compose up -d user-tower-0 user-tower-1 ann-0 ann-1 ann-2 ann-3 homefeed dashboard
run() { compose run --rm --no-deps -T retrainer "$@"; }
# Healthy means the orchestrator answers: bootstrap done, user tower and hosts loaded.
deadline=$(( $(date +%s) + 300 ))
until first=$(run call homefeed candidates --addr http://homefeed:7301 --user u1 --k 10 --json 2>/dev/null); do
  [ "$(date +%s)" -lt "$deadline" ] || { compose ps; compose logs --tail 20; exit 1; }
  sleep 2
done
t_up=$(( $(date +%s) - t0 - t_image ))
say "cluster healthy (NATS, bootstrap, 2 user-tower replicas, 2 shards × 2 ANN hosts, homefeed)"
echo "$first" | grep -q '"model_version": "v1"' || { echo "expected an answer from v1: $first"; exit 1; }
say "GetCandidates through the orchestrator answered from v1"

# Client traffic from the host through the published port while the retrainer rolls out v2.
profile="${TANDEM_IMAGE_PROFILE:-release}"
if [ "$profile" = dev ]; then bin="$CARGO_TARGET_DIR/debug/tandem"; else bin="$CARGO_TARGET_DIR/$profile/tandem"; fi
traffic=$(mktemp)
# One line per request: its versions, or FAILED with the error.
( for i in $(seq 1 100000); do
    if out=$("$bin" call homefeed candidates --addr "http://127.0.0.1:$TANDEM_HOMEFEED_PORT" --user "u$((i % 500))" --k 10 --json 2>&1); then
      echo "$out" | tr -d ' \n' | grep -o '"model_version":"v[0-9]*"\|"embedding_version":"v[0-9]*"' | tr '\n' ' ' >> "$traffic" || true
      echo >> "$traffic"
    else
      echo "FAILED $out" | tr '\n' ' ' >> "$traffic"; echo >> "$traffic"
    fi
    [ -f "$traffic.stop" ] && break
  done ) &
driver=$!
# The orchestrator's version-skew gauge, scraped through its published metrics port.
skew=$(mktemp)
( while [ ! -f "$traffic.stop" ]; do
    curl -fsS "http://127.0.0.1:$TANDEM_HOMEFEED_METRICS_PORT/metrics" 2>/dev/null \
      | grep '^tandem_homefeed_versions_live ' | awk '{print $2}' >> "$skew" || true
    sleep 0.5
  done ) &
scraper=$!

# SIGKILL one user-tower replica as soon as the rollout starts (the retrainer's progress line).
progress=$(mktemp)
( until grep -q "rolling out\|published v" "$progress" 2>/dev/null; do
    [ -f "$traffic.stop" ] && exit 0; sleep 0.2
  done
  compose kill -s SIGKILL user-tower-1 >/dev/null 2>&1 && echo killed > "$progress.killed" ) &
killer=$!
record=$(run retrain --once --events nats://nats:4222 --config /etc/tandem/retrain.toml \
  --hosts http://ann-0:7101,http://ann-1:7101,http://ann-2:7101,http://ann-3:7101 \
  --user-tower http://user-tower-0:7201 --homefeed http://homefeed:7301 --json 2> >(tee "$progress" >&2))
touch "$traffic.stop"; wait "$driver" "$scraper" "$killer" || true
[ -f "$progress.killed" ] || { echo "user-tower-1 was never killed during the rollout"; exit 1; }
rm -f "$progress" "$progress.killed"
say "user-tower-1 SIGKILLed during the rollout"
echo "$record" | grep -q '"outcome": "deployed"' || { echo "retrain did not deploy: $record"; exit 1; }
say "retrain cycle deployed v2"

status=$(run status --hosts http://ann-0:7101,http://ann-1:7101,http://ann-2:7101,http://ann-3:7101 --user-tower http://user-tower-0:7201 --json)
echo "$status" | tr -d ' \n' | grep -q '"hosts_per_version":{"v2":4}' || { echo "fleet did not converge: $status"; exit 1; }
echo "$status" | tr -d ' \n' | grep -q '"replicas_per_shard":{"v2":\[2,2\]}' || { echo "expected v2 on 2 shards × 2 replicas: $status"; exit 1; }
say "v2 serves 2 shards × 2 replicas"
# The dashboard (published on 127.0.0.1 only) serves its page and sees the same fleet.
dash="http://127.0.0.1:$TANDEM_DASHBOARD_PORT"
page=$(curl -fsS "$dash/")
grep -q '<title>Tandem fleet</title>' <<<"$page" || { echo "dashboard page missing"; exit 1; }
deadline=$(( $(date +%s) + 30 )); state=""
until state=$(curl -fsS "$dash/api/state" 2>/dev/null) && grep -q '"hosts_per_version":{"v2":4}' <<<"$state"; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "dashboard state: ${state:0:600}"; compose logs --tail 20 dashboard; exit 1; }
  sleep 1
done
say "dashboard on $dash shows 4 hosts on v2"


answered=$(grep -c model_version "$traffic" || true)
failed=$(grep -c '^FAILED' "$traffic" || true)
first_failure=$(grep -m1 '^FAILED' "$traffic" || true)
mixed=$(awk '{m=""; e=""; for (i=1;i<=NF;i++) { if ($i ~ /model_version/) m=$i; if ($i ~ /embedding_version/) e=$i }
              if (m != "") { sub(/.*:/, "", m); sub(/.*:/, "", e); if (m != e) n++ } } END { print n+0 }' "$traffic")
v2=$(grep -c '"model_version":"v2"' "$traffic" || true)
probes_mixed=$(echo "$record" | tr -d ' \n' | grep -o '"mismatched":[0-9]*' | grep -vc '"mismatched":0$' || true)
rm -f "$traffic" "$traffic.stop"
scrapes=$(wc -l < "$skew"); skewed=$(grep -c '^2$' "$skew" || true); rm -f "$skew"
metrics=$(curl -fsS "http://127.0.0.1:$TANDEM_HOMEFEED_METRICS_PORT/metrics")
echo "$metrics" | grep -q '^tandem_homefeed_hosts_per_version{version="v2"} 4$' || { echo "skew gauge after rollout: $(echo "$metrics" | grep hosts_per_version)"; exit 1; }
say "metrics: $scrapes scrapes during the rollout, $skewed of them with 2 versions live; after it, 4 hosts on v2"
[ "$skewed" -gt 0 ] || { echo "the version-skew gauge never showed the partial rollout"; exit 1; }
say "client answers during the rollout: $answered ($v2 from v2), failed: $failed, mismatched: $mixed; canary probes with mismatches: $probes_mixed"
[ "$failed" -eq 0 ] || { echo "client requests failed: $first_failure"; exit 1; }
[ "$answered" -gt 0 ] && [ "$mixed" -eq 0 ] && [ "$probes_mixed" -eq 0 ] || { echo "mismatched answers"; exit 1; }

# The killed replica comes back and rebuilds its state from the stream before it reports SERVING.
compose start user-tower-1 >/dev/null
deadline=$(( $(date +%s) + 120 ))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q user-tower-1)")" = healthy ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { compose logs --tail 20 user-tower-1; exit 1; }
  sleep 1
done
say "user-tower-1 restarted and healthy again (state rebuilt from the stream)"
echo "compose smoke passed: image ${t_image}s, cluster up ${t_up}s, total $(( $(date +%s) - t0 ))s"
