#!/usr/bin/env bash
# Runs every test: installs what is missing (Mosquitto, Tansu, …), then unit, integration and
# end-to-end tests (each end-to-end test starts its own stack on free loopback ports).
# Builds into $CARGO_TARGET_DIR (default ~/.cache/tributary/target) so later runs are warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/tributary/target}
deploy/local/install.sh
cargo test --workspace --locked "$@"
