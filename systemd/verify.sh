#!/usr/bin/env bash
# Checks the units with `systemd-analyze verify`. The unit names the
# installed path /usr/local/bin/tether, which does not exist on a build
# machine, so the check runs on a copy that points at the freshly built
# binary instead (build it first: `cargo build`). Usage, from the repo root:
#   bash systemd/verify.sh [path/to/tether]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="$(realpath "${1:-target/debug/tether}")"
[ -x "$bin" ] || { echo "no tether binary at $bin (run cargo build first)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp systemd/tether.service systemd/tether.socket "$tmp/"
sed -i "s#/usr/local/bin/tether#$bin#g" "$tmp/tether.service"
systemd-analyze verify "$tmp/tether.socket" "$tmp/tether.service"
echo "systemd units ok"
