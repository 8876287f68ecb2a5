#!/usr/bin/env bash
# Starts or stops the local stack on loopback only: Tansu (Kafka-compatible broker), Mosquitto (MQTT,
# password file + per-device ACL), VictoriaMetrics (InfluxDB line protocol) and, on request, an
# S3-compatible object store (moto's server, which honours conditional puts) for an `s3://` lake
# and Prometheus Alertmanager (incident delivery; clustering off).
#
#   deploy/local/stack.sh up | down | status [service...]   (services: tansu mosquitto victoria-metrics
#                                                            s3 alertmanager; default: all but s3
#                                                            and alertmanager)
#   deploy/local/stack.sh pause | resume <service...>      freeze / thaw a running service (SIGSTOP /
#                                                            SIGCONT), e.g. to test a broker outage
#
# Environment (defaults in brackets):
#   STACK_DIR [./data/local]   state, logs, pid files and generated configs
#   KAFKA_PORT [9092]  MQTT_PORT [1883]  VM_PORT [8428]  S3_PORT [9000]  S3_BUCKET [tributary-lake]
#   AM_PORT [9093]  AM_WEBHOOK_URL []  Alertmanager's port; a webhook its one route notifies (none:
#                                      alerts are kept and shown, not sent anywhere)
#   TRIBUTARY_VENV [~/.cache/tributary/venv]   where install.sh put moto
#   KAFKA_STORAGE [memory://tansu/]  or sqlite://tansu.db (durable; relative to STACK_DIR)
#   STACK_VM [1]               0 to skip VictoriaMetrics
#   MQTT_TOPIC_PATTERN [devices/%u/telemetry]   the ACL pattern devices may publish to
# MQTT users: the bridge (password generated into $STACK_DIR/mqtt-bridge.secret, mode 0600, exported
# by `eval "$(stack.sh env)"`) and optional extra `user:password` lines in $STACK_DIR/mqtt-users.plain
# make the static password file; a running pipeline adds every registered device (mqtt.password_file).
set -euo pipefail

STACK_DIR=${STACK_DIR:-./data/local}
KAFKA_PORT=${KAFKA_PORT:-9092}
MQTT_PORT=${MQTT_PORT:-1883}
VM_PORT=${VM_PORT:-8428}
S3_PORT=${S3_PORT:-9000}
S3_BUCKET=${S3_BUCKET:-tributary-lake}
AM_PORT=${AM_PORT:-9093}
AM_WEBHOOK_URL=${AM_WEBHOOK_URL:-}
VENV=${TRIBUTARY_VENV:-$HOME/.cache/tributary/venv}
KAFKA_STORAGE=${KAFKA_STORAGE:-memory://tansu/}
STACK_VM=${STACK_VM:-1}
MQTT_TOPIC_PATTERN=${MQTT_TOPIC_PATTERN:-devices/%u/telemetry}
mkdir -p "$STACK_DIR"
STACK_DIR=$(cd "$STACK_DIR" && pwd)
ACTION=${1:-}
[ $# -gt 0 ] && shift
SERVICES=("$@")
if [ ${#SERVICES[@]} -eq 0 ]; then
  SERVICES=(tansu mosquitto)
  # `down` and `status` cover every service, whatever STACK_VM says.
  if [ "$STACK_VM" = 1 ] || [ "$ACTION" != up ]; then SERVICES+=(victoria-metrics); fi
  if [ "$ACTION" != up ]; then SERVICES+=(s3 alertmanager); fi
fi
for s in "${SERVICES[@]}"; do
  case "$s" in tansu|mosquitto|victoria-metrics|s3|alertmanager) ;; *) echo "unknown service: $s" >&2; exit 2 ;; esac
done
want() { local s; for s in "${SERVICES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

wait_port() { # port name
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "$2 did not open 127.0.0.1:$1; see $STACK_DIR/$2.log" >&2
  tail -n 20 "$STACK_DIR/$2.log" >&2 || true
  return 1
}

start() { # name command...
  local name=$1; shift
  if [ -f "$STACK_DIR/$name.pid" ] && kill -0 "$(cat "$STACK_DIR/$name.pid")" 2>/dev/null; then
    echo "$name already running (pid $(cat "$STACK_DIR/$name.pid"))"
    return 0
  fi
  (cd "$STACK_DIR" && exec setsid "$@" >"$STACK_DIR/$name.log" 2>&1 </dev/null) &
  echo $! >"$STACK_DIR/$name.pid"
}

mqtt_config() {
  local secret="$STACK_DIR/mqtt-bridge.secret"
  umask 077
  [ -s "$secret" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret"
  # Static users (the bridge, and any `user:password` lines of mqtt-users.plain); the pipeline adds
  # every registered device to the live file (mqtt.password_file) and signals Mosquitto.
  {
    echo "tributary-bridge:$(cat "$secret")"
    if [ -f "$STACK_DIR/mqtt-users.plain" ]; then cat "$STACK_DIR/mqtt-users.plain"; fi
  } >"$STACK_DIR/mosquitto.static.passwd"
  mosquitto_passwd -U "$STACK_DIR/mosquitto.static.passwd"
  cp "$STACK_DIR/mosquitto.static.passwd" "$STACK_DIR/mosquitto.passwd"
  cat >"$STACK_DIR/mosquitto.acl" <<ACL
user tributary-bridge
topic read ${MQTT_TOPIC_PATTERN//%u/+}
topic read devices/+/shadow/#
topic write devices/+/shadow/#

# A device (user name = device id) sends its telemetry and its shadow requests, and reads only
# its own shadow topics (accepted, rejected, delta).
pattern write ${MQTT_TOPIC_PATTERN}
pattern write devices/%u/shadow/update
pattern write devices/%u/shadow/get
pattern write devices/%u/shadow/name/+/update
pattern write devices/%u/shadow/name/+/get
pattern read devices/%u/shadow/#
ACL
  mkdir -p "$STACK_DIR/mosquitto"
  cat >"$STACK_DIR/mosquitto.conf" <<CONF
user $(id -un)
listener $MQTT_PORT 127.0.0.1
allow_anonymous false
password_file $STACK_DIR/mosquitto.passwd
acl_file $STACK_DIR/mosquitto.acl
persistence true
persistence_location $STACK_DIR/mosquitto/
autosave_interval 1
max_queued_messages 1000000
# One device message is at most 256 KiB (payload::MAX_MESSAGE_BYTES) plus topic and properties.
max_packet_size 266240
CONF
}

case "$ACTION" in
  up)
    if want tansu; then
      command -v tansu >/dev/null || { echo "tansu is not installed: run deploy/local/install.sh" >&2; exit 1; }
      start tansu tansu broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine "$KAFKA_STORAGE"
    fi
    if want mosquitto; then
      mqtt_config
      start mosquitto /usr/sbin/mosquitto -c "$STACK_DIR/mosquitto.conf"
    fi
    if want victoria-metrics; then
      # Dedup at 1 ms: a point written again (same series and timestamp) is one point, as in InfluxDB.
      start victoria-metrics victoria-metrics -httpListenAddr "127.0.0.1:$VM_PORT" -storageDataPath "$STACK_DIR/victoria-metrics" \
        -dedup.minScrapeInterval=1ms
    fi
    if want alertmanager; then
      command -v prometheus-alertmanager >/dev/null || { echo "prometheus-alertmanager is not installed: run deploy/local/install.sh" >&2; exit 1; }
      {
        echo "route:"
        echo "  receiver: default"
        echo "  group_by: [incident_id]"
        echo "  group_wait: 1s"
        echo "  group_interval: 5s"
        echo "  repeat_interval: 1m"
        echo "receivers:"
        echo "  - name: default"
        if [ -n "$AM_WEBHOOK_URL" ]; then
          echo "    webhook_configs:"
          echo "      - url: '$AM_WEBHOOK_URL'"
          echo "        send_resolved: true"
        fi
      } >"$STACK_DIR/alertmanager.yml"
      mkdir -p "$STACK_DIR/alertmanager"
      start alertmanager prometheus-alertmanager --config.file="$STACK_DIR/alertmanager.yml" \
        --storage.path="$STACK_DIR/alertmanager" --web.listen-address="127.0.0.1:$AM_PORT" \
        --cluster.listen-address=
    fi
    if want s3; then
      [ -x "$VENV/bin/moto_server" ] || { echo "moto is not installed: run deploy/local/install.sh" >&2; exit 1; }
      start s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    fi
    ! want tansu || wait_port "$KAFKA_PORT" tansu
    ! want mosquitto || wait_port "$MQTT_PORT" mosquitto
    ! want victoria-metrics || wait_port "$VM_PORT" victoria-metrics
    ! want alertmanager || wait_port "$AM_PORT" alertmanager
    if want s3; then
      wait_port "$S3_PORT" s3
      # The lake's bucket (moto keeps objects in memory: a new server starts empty).
      curl -sf -X PUT "http://127.0.0.1:$S3_PORT/$S3_BUCKET" -o /dev/null
    fi
    echo "stack up (${SERVICES[*]}): kafka 127.0.0.1:$KAFKA_PORT, mqtt 127.0.0.1:$MQTT_PORT, victoria-metrics 127.0.0.1:$VM_PORT (state in $STACK_DIR)"
    ;;
  down)
    for name in alertmanager s3 victoria-metrics mosquitto tansu; do
      if want "$name" && [ -f "$STACK_DIR/$name.pid" ]; then
        pid=$(cat "$STACK_DIR/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$STACK_DIR/$name.pid"
      fi
    done
    echo "stack down (${SERVICES[*]})"
    ;;
  pause|resume)
    [ $# -gt 0 ] || { echo "usage: $0 $ACTION <service...>" >&2; exit 2; }
    signal=STOP; [ "$ACTION" = resume ] && signal=CONT
    for name in "${SERVICES[@]}"; do
      [ -f "$STACK_DIR/$name.pid" ] || { echo "$name is not running" >&2; exit 1; }
      kill -s "$signal" "$(cat "$STACK_DIR/$name.pid")"
    done
    echo "stack ${ACTION}d (${SERVICES[*]})"
    ;;
  status)
    for name in "${SERVICES[@]}"; do
      if [ -f "$STACK_DIR/$name.pid" ] && kill -0 "$(cat "$STACK_DIR/$name.pid")" 2>/dev/null; then
        echo "$name: running (pid $(cat "$STACK_DIR/$name.pid"))"
      else
        echo "$name: stopped"
      fi
    done
    ;;
  env)
    echo "export TRIBUTARY_KAFKA__BROKERS=127.0.0.1:$KAFKA_PORT"
    echo "export TRIBUTARY_MQTT__PORT=$MQTT_PORT"
    echo "export TRIBUTARY_MQTT__PASSWORD=$(cat "$STACK_DIR/mqtt-bridge.secret")"
    # The pipeline keeps Mosquitto's password file in step with the device registry.
    echo "export TRIBUTARY_MQTT__PASSWORD_FILE=$STACK_DIR/mosquitto.passwd"
    echo "export TRIBUTARY_MQTT__STATIC_PASSWORD_FILE=$STACK_DIR/mosquitto.static.passwd"
    echo "export TRIBUTARY_MQTT__BROKER_PID_FILE=$STACK_DIR/mosquitto.pid"
    ;;
  *)
    echo "usage: $0 up|down|status|pause|resume|env [service...]" >&2
    exit 2
    ;;
esac
