#!/usr/bin/env bash
# The main job on one machine: installs what is missing, starts the local stack, runs the whole
# pipeline fed by the device simulator (MQTT and HTTP) on the embedded defaults, then shows what
# landed in the lake with SQL. Stops the pipeline and the stack at the end; the lake stays in ./data.
#
#   deploy/local/demo.sh            (DEMO_SECONDS=20 DEMO_RATE=500 to change the load)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tributary/target}
DEMO_SECONDS=${DEMO_SECONDS:-20}
DEMO_RATE=${DEMO_RATE:-500}
export STACK_DIR=./data/local
# Durable broker storage: the raw log (the source of truth) outlives a run, as the lake does.
export KAFKA_STORAGE=${KAFKA_STORAGE:-sqlite://tansu.db}
# The defaults, plus a few detectors (deploy/local/demo.toml) so there are anomalies to show.
export TRIBUTARY_CONFIG=${TRIBUTARY_CONFIG:-deploy/local/demo.toml}

deploy/local/install.sh
cargo build --locked --bin tributary
bin="$CARGO_TARGET_DIR/debug/tributary"

mkdir -p "$STACK_DIR"
cleanup() {
  if [ -n "${pipeline:-}" ]; then
    kill -INT "$pipeline" 2>/dev/null || true   # SIGINT: the pipeline stops cleanly
    wait "$pipeline" 2>/dev/null || true
  fi
  deploy/local/stack.sh down
}
trap cleanup EXIT
# Kafka first: devices are recorded on its `registry` topic; the pipeline gives Mosquitto their tokens.
deploy/local/stack.sh up tansu
"$bin" topics create
"$bin" devices seed --count 50 --tenants 3
deploy/local/stack.sh up mosquitto victoria-metrics
eval "$(deploy/local/stack.sh env)"
# The admin API's token for this run (`tributary devices list` uses it).
export TRIBUTARY_REGISTRY__ADMIN_TOKEN=${TRIBUTARY_REGISTRY__ADMIN_TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
"$bin" run 2>"$STACK_DIR/pipeline.log" &
pipeline=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 0.2; done

# Rows already in the lake (it outlives runs), so the wait below knows what this run adds.
rows() {
  local n
  n=$("$bin" sql --format csv "SELECT count(*) AS n FROM $1" 2>/dev/null | grep -E '^[0-9]+$' | tail -n 1 || true)
  echo "${n:-0}"
}
before_readings=$(rows telemetry)
before_dead=$(rows deadletter)

echo "simulating 50 devices (25 over MQTT, 25 over HTTP) for ${DEMO_SECONDS}s at ${DEMO_RATE} msg/s each…"
"$bin" simulate --via mqtt --devices 25 --rate "$DEMO_RATE" --duration "${DEMO_SECONDS}s" >"$STACK_DIR/sim-mqtt.json" &
sim_mqtt=$!
"$bin" simulate --via http --first-device 25 --devices 25 --rate "$DEMO_RATE" --duration "${DEMO_SECONDS}s" >"$STACK_DIR/sim-http.json"
wait "$sim_mqtt"
echo "mqtt: $(cat "$STACK_DIR/sim-mqtt.json")"
echo "http: $(cat "$STACK_DIR/sim-http.json")"
# Wait until the lake holds what the simulator says it should (the sinks commit every 2 s; after a
# restart the consumer groups may first take a rebalance or two).
expected() {
  local total=0 n
  for n in $(grep -ho "\"$1\":[0-9]*" "$STACK_DIR"/sim-*.json | cut -d: -f2); do total=$((total + n)); done
  echo "$total"
}
want_readings=$((before_readings + $(expected expected_readings)))
want_dead=$((before_dead + $(expected expected_dead_letters)))
for _ in $(seq 1 120); do
  got_readings=$(rows telemetry); got_dead=$(rows deadletter)
  [ "$got_readings" -ge "$want_readings" ] && [ "$got_dead" -ge "$want_dead" ] && break
  sleep 1
done
echo "in the lake: $got_readings readings (expected $want_readings), $got_dead dead letters (expected $want_dead)"

echo
echo "What landed in the lake (./data/lake):"
"$bin" sql "SELECT tenant, metric, count(*) AS readings, round(avg(value), 2) AS avg, min(event_time) AS first, max(event_time) AS last FROM telemetry GROUP BY tenant, metric ORDER BY tenant, metric"
"$bin" sql "SELECT rule, count(*) AS dead_letters, min(reason) AS example FROM deadletter GROUP BY rule ORDER BY rule"
echo "The latest dead letters, each with its rule, field and reason (tributary deadletter list):"
"$bin" deadletter list --limit 5
echo "Anomalies the detectors of deploy/local/demo.toml found (topic and table \`anomalies\`):"
"$bin" sql "SELECT detector, kind, severity, count(DISTINCT anomaly_id) AS anomalies, count(DISTINCT device) AS devices, min(message) AS example FROM anomalies WHERE state = 'open' GROUP BY 1, 2, 3 ORDER BY 1" 2>/dev/null || echo "  (none yet)"
echo "Usage metered from the raw log, and the device registry as a table:"
"$bin" sql "SELECT u.tenant, count(DISTINCT u.device) AS devices, sum(u.events) AS events, sum(u.bytes) AS bytes FROM usage u GROUP BY u.tenant ORDER BY u.tenant"
"$bin" sql "SELECT tenant, model, count(*) AS devices FROM devices GROUP BY tenant, model ORDER BY tenant"
echo "The same readings in the time-series store (VictoriaMetrics on 127.0.0.1:8428; series per metric, readings):"
vm=http://127.0.0.1:${VM_PORT:-8428}
# latency_offset=0s: VictoriaMetrics hides the last 30 s by default, and the demo just wrote them.
curl -s "$vm/internal/force_flush" >/dev/null || true
curl -s "$vm/api/v1/query" --data-urlencode 'query=count by (__name__) (count_over_time({__name__=~"telemetry_.*"}[30d]) keep_metric_names)' \
  --data-urlencode 'latency_offset=0s' --data-urlencode 'nocache=1' >"$STACK_DIR/vm-series.json" || true
curl -s "$vm/api/v1/query" --data-urlencode 'query=sum by (__name__) (count_over_time({__name__=~"telemetry_.*"}[30d]) keep_metric_names)' \
  --data-urlencode 'latency_offset=0s' --data-urlencode 'nocache=1' >"$STACK_DIR/vm-points.json" || true
python3 - "$STACK_DIR/vm-series.json" "$STACK_DIR/vm-points.json" <<'PY' || true
import json, sys
series, points = ({r["metric"]["__name__"]: r["value"][1] for r in json.load(open(p))["data"]["result"]} for p in sys.argv[1:])
for name in sorted(points):
    print(f"  {name:<32} {series.get(name, '?'):>5} series {points[name]:>9} points")
PY
echo "Query it yourself: $bin sql \"SELECT * FROM telemetry LIMIT 10\""
