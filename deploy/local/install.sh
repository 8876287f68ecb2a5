#!/usr/bin/env bash
# Installs what the local stack and the tests need, skipping whatever is already there:
# Debian's mosquitto, victoria-metrics, prometheus-alertmanager, postgresql-client and openssl, Tansu 0.6.0 (Kafka-compatible
# broker) from crates.io, and deltalake + polars + moto (PyPI, in a venv) for the interop and S3
# tests. Safe to run again.
set -euo pipefail

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || need_apt+=(mosquitto-clients mosquitto)
command -v victoria-metrics >/dev/null 2>&1 || need_apt+=(victoria-metrics)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)   # test key pairs (Ed25519)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)         # stack.sh creates the S3 bucket
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)  # incident delivery
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The Debian package starts a system-wide mosquitto on :1883; the local stack runs its own.
# Likewise prometheus-alertmanager on :9093.
for unit in mosquitto prometheus-alertmanager; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$unit" 2>/dev/null; then
    systemctl stop "$unit" || true
  fi
done

if ! command -v tansu >/dev/null 2>&1 || ! tansu --version 2>/dev/null | grep -q '0\.6\.0'; then
  echo "installing tansu 0.6.0 from crates.io (a ~20 minute release build on 2 cores, once)"
  cargo install tansu --version 0.6.0 --locked --no-default-features --features dynostore,libsql
fi
# From PyPI, in a venv beside the cargo target directory: the interop check reads the lake with
# other engines' readers (delta-rs's Python bindings, polars); moto's server is the S3-compatible
# store of the s3:// tests (it honours If-None-Match, which Delta commits on S3 rely on); DuckDB is
# the baseline of the query bench; confluent-kafka + fastavro are what an alerting consumer
# outside the process uses (docs/examples/alert_consumer.py, run by tests/anomalies.rs and tests/alerts.rs).
VENV=${TRIBUTARY_VENV:-$HOME/.cache/tributary/venv}
PY_PACKAGES=(deltalake==1.6.6 polars==2.1.0 pyarrow==26.0.1 "moto[server]==5.2.5" duckdb==2.0.1
  confluent-kafka==2.16.1 fastavro==1.13.1)
if ! "$VENV/bin/python" -c 'import deltalake, polars, pyarrow, moto.server, duckdb, confluent_kafka, fastavro' >/dev/null 2>&1; then
  echo "installing ${PY_PACKAGES[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
fi
echo "local stack prerequisites are installed"
