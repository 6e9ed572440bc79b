#!/usr/bin/env bash
# Install tollgate as a systemd service, or remove it.
#
#   sudo systemd/install.sh              # build, install, enable (does not start)
#   sudo systemd/install.sh --uninstall  # stop, disable, remove binary and unit (keeps /etc/tollgate)
#   DESTDIR=/tmp/pkg systemd/install.sh  # stage into a directory (packaging, tests):
#                                        # no user, no systemctl
#   TOLLGATE_BIN=path systemd/install.sh # install that binary instead of building one
#
# Puts: /usr/local/bin/tollgate, /etc/tollgate/tollgate.yaml and an empty
# keys.yaml (only if not there yet: an existing config is never overwritten),
# /etc/systemd/system/tollgate.service, /usr/local/share/doc/tollgate/README.md,
# and a `tollgate` system user. No API key is installed: the repository's
# demo keys (conf/keys.yaml) are public; make the first key with
# `tollgate keys create` (printed at the end).
set -euo pipefail
# TOLLGATE_BIN may be relative to where the script was started from.
src_bin=${TOLLGATE_BIN:-}
case $src_bin in
  "" | /*) ;;
  *) src_bin=$PWD/$src_bin ;;
esac
cd "$(dirname "$0")/.."
root=${DESTDIR:-}
bin=$root/usr/local/bin/tollgate
etc=$root/etc/tollgate
unit=$root/etc/systemd/system/tollgate.service
doc=$root/usr/local/share/doc/tollgate

if [ "${1:-}" = "--uninstall" ]; then
  if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now tollgate.service 2>/dev/null || true
  fi
  rm -f "$bin" "$unit"
  rm -rf "$doc"
  [ -z "$root" ] && command -v systemctl >/dev/null 2>&1 && systemctl daemon-reload || true
  echo "removed the binary, the unit and the docs; kept $etc (remove it by hand if you want)"
  exit 0
fi

if [ -z "$src_bin" ]; then
  cargo build --release --locked
  src_bin=target/release/tollgate
fi
install -D -m 0755 "$src_bin" "$bin"
install -D -m 0644 systemd/tollgate.service "$unit"
install -D -m 0644 README.md "$doc/README.md"
mkdir -p "$etc"
if [ ! -e "$etc/tollgate.yaml" ]; then
  # The shipped config, with the service's paths.
  sed -e 's|pid_file: /tmp/tollgate.pid|pid_file: /run/tollgate/tollgate.pid|' \
      -e 's|upgrade_sock: /tmp/tollgate_upgrade.sock|upgrade_sock: /run/tollgate/upgrade.sock|' \
      -e 's|keys_file: conf/keys.yaml|keys_file: /etc/tollgate/keys.yaml|' \
      conf/tollgate.yaml > "$etc/tollgate.yaml"
  chmod 0640 "$etc/tollgate.yaml"
fi
if [ ! -e "$etc/keys.yaml" ]; then
  # Empty: every request gets 401 until the operator makes a key.
  cat > "$etc/keys.yaml" <<'KEYS'
# API keys of the embedded store (store.keys_file), loaded at start and on
# reload. None yet: make one with
#   sudo tollgate keys create --name NAME --credits N -c /etc/tollgate/tollgate.yaml
# (it prints the key once and appends only its SHA-256 here), then
#   sudo systemctl reload tollgate
# Entry format: see conf/keys.yaml in the repository (its demo keys are public:
# never copy them here).
keys:
KEYS
  chmod 0640 "$etc/keys.yaml"
fi
"$bin" check -c "$etc/tollgate.yaml" >/dev/null 2>&1 || [ -n "$root" ] || {
  echo "warning: $etc/tollgate.yaml does not pass 'tollgate check'" >&2
}

if [ -z "$root" ]; then
  id tollgate >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tollgate
  chgrp tollgate "$etc/tollgate.yaml" "$etc/keys.yaml"
  if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable tollgate.service
  fi
  echo "installed; edit $etc/tollgate.yaml, then: systemctl start tollgate"
else
  echo "staged under $root"
fi
if ! grep -qE '^[[:space:]]*-' "$etc/keys.yaml"; then
  echo "no API keys yet (every request gets 401); make the first one with:"
  echo "  sudo ${bin#"$root"} keys create --name NAME --credits N -c ${etc#"$root"}/tollgate.yaml"
  echo "  sudo systemctl reload tollgate"
fi
