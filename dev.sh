#!/usr/bin/env bash
# Developer entry point: the two commands in README.md call this.
#   sudo ./dev.sh demo    install what is needed, build, run `proxyvpn demo`
#   sudo ./dev.sh test    install what is needed, build, run the whole test suite
#   ./dev.sh setup        only install/build (apt needs root; skipped when all is present)
#   ./dev.sh lint         ruff
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(nftables libnftables1 iproute2 iptables libcap-dev libcap2-bin gcc python3-venv
              python3-dev tinyproxy squid redsocks conntrack curl util-linux procps tcpdump iputils-ping)
VENV=${PROXYVPN_VENV:-.venv}
PY=${PYTHON:-python3}

need_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev.sh: missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "dev.sh: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packaged proxies must not keep running in the host namespace: tests start their own.
  for svc in tinyproxy squid redsocks; do
    (service "$svc" stop || systemctl stop "$svc") >/dev/null 2>&1 || true
    pkill -x "$svc" >/dev/null 2>&1 || true
  done
}

setup() {
  need_apt
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # The editable install (dependencies, and a mypyc build in an isolated environment)
  # takes a minute: redo it only when what it depends on changed.
  local stamp="$VENV/.proxyvpn-install" want
  want=$(cat pyproject.toml setup.py proxyvpn/_compiled.py | sha256sum)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    echo "$want" >"$stamp"
  fi
  # Editable installs build the extension into the source tree; make sure it is current.
  PYTHONWARNINGS=ignore "$VENV/bin/python" setup.py -q build_ext --inplace >/dev/null
  "$VENV/bin/python" -c "import proxyvpn._fastpath" || { echo "dev.sh: C extension did not build" >&2; exit 1; }
  # The mypyc-compiled stack is optional at run time but expected here: say so if it is missing.
  PROXYVPN_INTERPRETED=0 "$VENV/bin/python" -c "
import proxyvpn._compiled as c
missing = [m for m, compiled in c.loaded().items() if not compiled]
assert not missing, missing" || { echo "dev.sh: the mypyc build of the stack did not load" >&2; exit 1; }
}

case "${1:-}" in
  setup) setup ;;
  test)
    setup
    shift
    "$VENV/bin/ruff" check proxyvpn tests bench
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  demo) setup; exec "$VENV/bin/proxyvpn" demo ;;
  lint) exec "$VENV/bin/ruff" check proxyvpn tests bench ;;
  *) echo "usage: ./dev.sh setup|test|demo|lint" >&2; exit 2 ;;
esac
