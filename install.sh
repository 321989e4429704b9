#!/usr/bin/env bash
# proxyvpn installer: a root-owned Python venv plus a small setcap'd launcher.
#
#   sudo ./install.sh [install]   build and install (what gets installed: see below)
#   ./install.sh build            build only, no root: launcher + wheel in BUILD_DIR
#   sudo ./install.sh uninstall   remove every file the install recorded in its manifest
#   ./install.sh check            check the prerequisites and print what is missing
#
# Settings (environment variables):
#   PREFIX=/usr/local/lib/proxyvpn  root-owned; holds venv/ (Python, the package and its
#                                   dependencies) and install-manifest.txt
#   INSTALL_DIR=/usr/local/bin      where the launcher `proxyvpn` goes
#   GROUP=proxyvpn                  only its members may run proxyvpn (created if missing)
#   PYTHON=/usr/bin/python3         base interpreter, >= 3.11, root-owned
#   DESTDIR=                        staging root for packages (packaging/): files only,
#                                   no group, no chown, no setcap, no manifest; no root needed
#   BUILD_DIR=build/install         output of `build` (install uses a temporary one)
#   PREBUILT=1                      install: use BUILD_DIR from an earlier `build`
#   CC, CFLAGS, LDFLAGS, PIP_ARGS   compiler, flags, extra `pip install` arguments
#
# Installed (and recorded in PREFIX/install-manifest.txt):
#   INSTALL_DIR/proxyvpn    launcher (native/launcher.c), mode 0750 root:GROUP,
#                           file capability cap_net_admin=eip
#   PREFIX/venv/            the venv; the launcher runs PREFIX/venv/bin/python3 -I -m proxyvpn
#   the group GROUP         only if this script created it
# `uninstall` removes exactly those; the group only if it has no members left (else it
# says so): removing a group that still has members would orphan their membership.
set -euo pipefail
umask 022

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${PREFIX:-/usr/local/lib/proxyvpn}
INSTALL_DIR=${INSTALL_DIR:-/usr/local/bin}
GROUP=${GROUP:-proxyvpn}
PYTHON=${PYTHON:-/usr/bin/python3}
DESTDIR=${DESTDIR:-}
CC=${CC:-cc}
CFLAGS=${CFLAGS:--O2 -g}
LDFLAGS=${LDFLAGS:-}
PIP_ARGS=${PIP_ARGS:-}
PREBUILT=${PREBUILT:-0}
CAPS="cap_net_admin=eip"
MANIFEST_NAME=install-manifest.txt

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# ------------------------------------------------------------------ checks

check_path_var() {  # name value: an absolute, plain path (compiled into the launcher)
  local name=$1 value=$2
  [[ $value =~ ^(/[A-Za-z0-9._+-]+)+$ ]] || die "$name=$value: use an absolute path of letters, digits and ._+- (no spaces, no trailing /)"
  [[ $value != */../* && $value != */.. && $value != */./* && $value != */. ]] || die "$name=$value: no . or .. components"
}

# Package names per distribution, for the message about what is missing.
declare -A APT=( [nft]=nftables [ip]=iproute2 [setcap]=libcap2-bin [cc]=gcc [python]=python3
                 [venv]=python3-venv [python-dev]=python3-dev [libnftables]=libnftables1
                 [libcap-dev]=libcap-dev )
declare -A PACMAN=( [nft]=nftables [ip]=iproute2 [setcap]=libcap [cc]=gcc [python]=python
                    [venv]=python [python-dev]=python [libnftables]=nftables [libcap-dev]=libcap )
declare -A DNF=( [nft]=nftables [ip]=iproute [setcap]=libcap [cc]=gcc [python]=python3
                 [venv]=python3 [python-dev]=python3-devel [libnftables]=nftables
                 [libcap-dev]=libcap-devel )

python_ok() {
  [ -x "$PYTHON" ] && "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

check_prereqs() {  # mode: build | install
  local mode=$1 missing=() p
  if [ "$mode" = install ] && [ -z "$DESTDIR" ]; then
    command -v nft >/dev/null || [ -x /usr/sbin/nft ] || missing+=(nft)
    command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(ip)
    command -v setcap >/dev/null || [ -x /usr/sbin/setcap ] || [ -x /sbin/setcap ] || missing+=(setcap)
    if ! { ldconfig -p 2>/dev/null | grep -q 'libnftables\.so\.1 '; } \
       && ! ls /usr/lib/libnftables.so.1 /usr/lib/*/libnftables.so.1 /usr/lib64/libnftables.so.1 >/dev/null 2>&1; then
      missing+=(libnftables)
    fi
  fi
  if [ "$PREBUILT" != 1 ]; then
    command -v "$CC" >/dev/null || missing+=(cc)
    # python-prctl builds from source against libcap's header.
    [ -e /usr/include/sys/capability.h ] || missing+=(libcap-dev)
  fi
  if ! python_ok; then
    missing+=(python)
  else
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(venv)
    if [ "$PREBUILT" != 1 ]; then
      local inc
      inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
      [ -e "$inc/Python.h" ] || missing+=(python-dev)
    fi
  fi
  [ ${#missing[@]} -eq 0 ] && return 0

  local apt=() pacman=() dnf=()
  for p in "${missing[@]}"; do apt+=("${APT[$p]}"); pacman+=("${PACMAN[$p]}"); dnf+=("${DNF[$p]}"); done
  # Several checks map to one package on some systems: list each once.
  mapfile -t apt < <(printf '%s\n' "${apt[@]}" | awk '!seen[$0]++')
  mapfile -t pacman < <(printf '%s\n' "${pacman[@]}" | awk '!seen[$0]++')
  mapfile -t dnf < <(printf '%s\n' "${dnf[@]}" | awk '!seen[$0]++')
  {
    echo "install.sh: missing prerequisites: ${missing[*]}"
    python_ok || echo "  (Python >= 3.11 is needed at $PYTHON; set PYTHON=/path/to/python3 to use another)"
    local shown=0
    if command -v apt-get >/dev/null; then echo "  sudo apt-get install ${apt[*]}"; shown=1; fi
    if command -v pacman >/dev/null; then echo "  sudo pacman -S --needed ${pacman[*]}"; shown=1; fi
    if command -v dnf >/dev/null; then echo "  sudo dnf install ${dnf[*]}"; shown=1; fi
    if [ $shown = 0 ]; then
      echo "  Debian/Ubuntu: sudo apt-get install ${apt[*]}"
      echo "  Arch Linux:    sudo pacman -S --needed ${pacman[*]}"
      echo "  Fedora:        sudo dnf install ${dnf[*]}"
    fi
  } >&2
  exit 1
}

# An existing directory and its ancestors: root-owned and writable only by root (an
# ancestor may be a root-owned sticky directory like /tmp). The launcher refuses to run
# otherwise; say so now rather than after installing.
check_trusted_dir() {
  local dir=$1 d mode uid
  d=$dir
  while :; do
    if [ -e "$d" ]; then
      read -r mode uid < <(stat -L -c '%a %u' "$d")
      [ "$uid" = 0 ] || die "$d is owned by uid $uid, not root: the launcher would refuse to run from $dir"
      if (( 8#$mode & 8#022 )) && ! (( 8#$mode & 8#1000 )); then
        die "$d is writable by group or others (mode $mode): the launcher would refuse to run from $dir"
      fi
    fi
    [ "$d" = / ] && break
    d=$(dirname "$d")
  done
}

# Ordinary users open /dev/net/tun themselves (CAP_NET_ADMIN does not bypass file modes).
check_tun_device() {
  local mode
  [ -c /dev/net/tun ] || { say "warning: /dev/net/tun does not exist (modprobe tun)"; return 0; }
  mode=$(stat -c %a /dev/net/tun)
  if [ "$mode" != 666 ]; then
    say "warning: /dev/net/tun is mode $mode, so only root can open it and proxyvpn up needs sudo;" \
        "distributions make it 0666 (udev: KERNEL==\"tun\", MODE=\"0666\")"
  fi
}

# ------------------------------------------------------------------ build

py_info() {  # prints: version stdlib
  "$PYTHON" -c 'import sys, sysconfig; print(f"{sys.version_info[0]}.{sys.version_info[1]}", sysconfig.get_path("stdlib"))'
}

# A copy of the sources without caches, venvs or build output: pip builds in it, never
# in the working tree (which may belong to the user running `sudo ./install.sh`).
copy_sources() {
  local dest=$1
  mkdir -p "$dest"
  (cd "$REPO" && tar -c --exclude=./.git --exclude=./.venv --exclude=./build \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
      --exclude=.ruff_cache --exclude=.hypothesis --exclude='*.so' --exclude=./bench \
      --exclude=./tests --exclude=./packaging \
      -f - .) | tar -x -C "$dest"
}

build_launcher() {  # out_dir
  local out=$1 pyver stdlib venv
  read -r pyver stdlib < <(py_info)
  venv="$PREFIX/venv"
  mkdir -p "$out"
  # shellcheck disable=SC2086  # CFLAGS/LDFLAGS are word lists
  "$CC" $CFLAGS -Wall -Wextra -Wformat=2 -D_FORTIFY_SOURCE=2 -fstack-protector-strong \
    -fPIE -pie -Wl,-z,relro -Wl,-z,now $LDFLAGS \
    -DPROXYVPN_PREFIX="\"$PREFIX\"" \
    -DPROXYVPN_VENV="\"$venv\"" \
    -DPROXYVPN_PYTHON="\"$venv/bin/python3\"" \
    -DPROXYVPN_PACKAGE="\"$venv/lib/python$pyver/site-packages/proxyvpn\"" \
    -DPROXYVPN_STDLIB="\"$stdlib\"" \
    -DPROXYVPN_LAUNCHER="\"$INSTALL_DIR/proxyvpn\"" \
    -DPROXYVPN_GROUP="\"$GROUP\"" \
    -o "$out/proxyvpn" "$REPO/native/launcher.c"
  {
    echo "PREFIX=$PREFIX"; echo "INSTALL_DIR=$INSTALL_DIR"; echo "GROUP=$GROUP"
    echo "PYTHON=$PYTHON"; echo "PYVER=$pyver"
  } > "$out/build.env"
}

build_wheel() {  # out_dir pip...
  local out=$1; shift
  local src=$WORK/src  # removed with $WORK by the EXIT trap, also on failure
  rm -rf "$src"
  copy_sources "$src"
  rm -f "$out"/wheels/proxyvpn-*.whl
  # shellcheck disable=SC2086
  "$@" wheel -q --no-deps --disable-pip-version-check $PIP_ARGS -w "$out/wheels" "$src"
  rm -rf "$src"
}

cmd_build() {
  check_path_var PREFIX "$PREFIX"; check_path_var INSTALL_DIR "$INSTALL_DIR"
  PREBUILT=0 check_prereqs build
  local out=${BUILD_DIR:-$REPO/build/install}
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/proxyvpn-build.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  mkdir -p "$out"
  build_launcher "$out"
  # A build-only venv (python3-venv is all it needs; no system pip required).
  if [ ! -x "$out/buildenv/bin/python" ] || ! "$out/buildenv/bin/python" -c pass 2>/dev/null; then
    rm -rf "$out/buildenv"
    "$PYTHON" -m venv "$out/buildenv"
  fi
  build_wheel "$out" "$out/buildenv/bin/python" -m pip
  say "built $out/proxyvpn (launcher for $INSTALL_DIR/proxyvpn, venv $PREFIX/venv) and $(cd "$out/wheels" && ls proxyvpn-*.whl)"
}

# ------------------------------------------------------------------ install

manifest_path() { echo "$DESTDIR$PREFIX/$MANIFEST_NAME"; }

make_dirs() {  # dir: mkdir -p, remembering in CREATED_DIRS each directory it creates
  local d=$1 missing=()
  while [ ! -e "$d" ]; do missing+=("$d"); d=$(dirname "$d"); done
  mkdir -p "$1"
  CREATED_DIRS+=("${missing[@]}")
}

group_members() {  # group: supplementary members, and users whose primary group it is
  local gid
  gid=$(getent group "$1" | cut -d: -f3) || return 0
  {
    getent group "$1" | cut -d: -f4 | tr ',' '\n'
    getent passwd | awk -F: -v g="$gid" '$4 == g { print $1 }'
  } | sed '/^$/d' | sort -u
}

# On failure the previous install (if any) stays as it was: only the half-built venv and
# the directories this run created (when still empty) go.
install_cleanup() {
  local rc=$? d
  rm -rf "$WORK"
  [ -n "$VENV_NEW" ] && rm -rf "$VENV_NEW"
  if [ $rc != 0 ]; then
    for d in "${CREATED_DIRS[@]}"; do rmdir "$d" 2>/dev/null || true; done
  fi
}

cmd_install() {
  check_path_var PREFIX "$PREFIX"; check_path_var INSTALL_DIR "$INSTALL_DIR"
  [[ $GROUP =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "GROUP=$GROUP is not a valid group name"
  if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    die "installing needs root: sudo ./install.sh   (or ./install.sh build to only build)"
  fi
  [ -z "$DESTDIR" ] || check_path_var DESTDIR "$DESTDIR"
  check_prereqs install
  local pyver stdlib
  read -r pyver stdlib < <(py_info)
  if [ -z "$DESTDIR" ]; then
    check_trusted_dir "$(realpath "$PYTHON")"
    check_trusted_dir "$stdlib"
    local d=$PREFIX
    while [ ! -e "$d" ]; do d=$(dirname "$d"); done
    check_trusted_dir "$d"
    d=$INSTALL_DIR
    while [ ! -e "$d" ]; do d=$(dirname "$d"); done
    check_trusted_dir "$d"
    # The interpreter must be usable by the users who will run proxyvpn (a pyenv build
    # under /root is not).
    if command -v setpriv >/dev/null && ! setpriv --reuid=65534 --regid=65534 --clear-groups \
         "$PYTHON" -c pass 2>/dev/null; then
      die "$PYTHON cannot be run by ordinary users; set PYTHON= to a system interpreter (e.g. /usr/bin/python3)"
    fi
  fi

  local out
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/proxyvpn-install.XXXXXX")
  VENV_NEW=
  CREATED_DIRS=()
  trap install_cleanup EXIT
  if [ "$PREBUILT" = 1 ]; then
    out=${BUILD_DIR:-$REPO/build/install}
    [ -f "$out/build.env" ] && [ -x "$out/proxyvpn" ] || die "PREBUILT=1 but $out holds no build: run ./install.sh build"
    grep -qx "PREFIX=$PREFIX" "$out/build.env" && grep -qx "INSTALL_DIR=$INSTALL_DIR" "$out/build.env" \
      && grep -qx "PYVER=$pyver" "$out/build.env" \
      || die "the build in $out was made for other paths or Python (see $out/build.env): rebuild with the same PREFIX/INSTALL_DIR"
  else
    out=$WORK
    build_launcher "$out"
  fi

  # The venv: built next to its final place, then swapped in.
  local root=$DESTDIR$PREFIX venv_new venv_old
  if [ -f "$root/$MANIFEST_NAME" ]; then  # directories an earlier run created
    mapfile -t CREATED_DIRS < <(awk -F'\t' '$1 == "dir" { print $2 }' "$root/$MANIFEST_NAME")
  fi
  make_dirs "$root"
  chmod 755 "$root"
  venv_new=$root/venv.new
  VENV_NEW=$venv_new
  venv_old=$root/venv.old
  rm -rf "$venv_new" "$venv_old"
  say "creating the Python environment in $PREFIX/venv"
  # The versioned interpreter (python3.11, not python3): the venv must keep its Python
  # when the distribution switches its default python3.
  "$(realpath "$PYTHON")" -m venv "$venv_new"
  local wheel
  if [ "$PREBUILT" = 1 ]; then
    wheel=$(ls "$out"/wheels/proxyvpn-*.whl)
  else
    build_wheel "$out" "$venv_new/bin/python" -m pip
    wheel=$(ls "$out"/wheels/proxyvpn-*.whl)
  fi
  say "installing $(basename "$wheel") and its dependencies"
  # shellcheck disable=SC2086
  "$venv_new/bin/python" -m pip install -q --no-compile --disable-pip-version-check $PIP_ARGS "$wheel"
  # Installing is done: pip and setuptools (with its startup .pth hook) are not needed
  # at run time, and every file less is one less the launcher has to trust.
  "$venv_new/bin/python" -m pip uninstall -q -y setuptools >/dev/null 2>&1 || true
  "$venv_new/bin/python" -m pip uninstall -q -y pip >/dev/null
  # Only python itself is an entry point (the launcher runs python -I -m proxyvpn): the
  # generated scripts and activate files embed the staging path, so they go.
  find "$venv_new/bin" -mindepth 1 ! -name 'python' ! -name 'python3' ! -name "python$pyver" -exec rm -f {} +
  sed -i "s#^command = .*#command = $(realpath "$PYTHON") -m venv $PREFIX/venv#" "$venv_new/pyvenv.cfg"
  [ -d "$venv_new/lib/python$pyver/site-packages/proxyvpn" ] || die "the proxyvpn package did not land in the venv"
  if [ -d "$root/venv" ]; then mv "$root/venv" "$venv_old"; fi
  mv "$venv_new" "$root/venv"
  rm -rf "$venv_old"
  # Byte-code compiled as root now, with the final paths: the launcher runs python -B.
  if [ -n "$DESTDIR" ]; then
    "$root/venv/bin/python" -m compileall -q -f -j0 -s "$DESTDIR" -p / "$root/venv/lib" >/dev/null || true
  else
    "$root/venv/bin/python" -m compileall -q -f -j0 "$root/venv/lib" >/dev/null || true
  fi
  chmod -R go-w "$root/venv"

  local launcher=$DESTDIR$INSTALL_DIR/proxyvpn
  make_dirs "$DESTDIR$INSTALL_DIR"
  if [ -n "$DESTDIR" ]; then
    # Packages: root-only until the post-install script sets the group and capability.
    install -m 0750 "$out/proxyvpn" "$launcher"
    say "staged into $DESTDIR (group, mode and capability are set by the package's install script)"
    return 0
  fi

  chown -R root:root "$root/venv"
  local created_group=0 old_manifest
  old_manifest=$(manifest_path)
  if [ -f "$old_manifest" ] && grep -qx "group	$GROUP" "$old_manifest"; then
    created_group=1  # an earlier run created it: uninstall may still remove it
  fi
  if ! getent group "$GROUP" >/dev/null; then
    groupadd --system "$GROUP"
    created_group=1
    say "created group $GROUP"
  fi
  if [ -e "$launcher" ] && ! { [ -f "$old_manifest" ] && grep -q "^launcher	$launcher	" "$old_manifest"; }; then
    say "replacing $launcher, which this script did not install"
  fi
  # Install atomically: a running proxyvpn keeps its inode; nobody sees a half-set file.
  local tmp=$DESTDIR$INSTALL_DIR/.proxyvpn.new.$$
  install -m 0750 -o root -g "$GROUP" "$out/proxyvpn" "$tmp"
  if ! setcap "$CAPS" "$tmp" 2>"$WORK/setcap.err"; then
    rm -f "$tmp"
    die "setcap $CAPS failed ($(tr '\n' ' ' < "$WORK/setcap.err")): the filesystem of $INSTALL_DIR may not support file capabilities (extended attributes); choose INSTALL_DIR on another filesystem, or run proxyvpn with sudo"
  fi
  mv -f "$tmp" "$launcher"
  local caps
  caps=$(getcap "$launcher")
  [[ $caps == *"cap_net_admin=eip"* ]] || die "getcap $launcher shows '$caps', expected $CAPS"

  {
    echo "# proxyvpn install manifest: what \`install.sh uninstall\` removes"
    printf 'launcher\t%s\t%s\n' "$launcher" "$(sha256sum "$launcher" | cut -d' ' -f1)"
    printf 'venv\t%s\n' "$root/venv"
    # Deepest first, so that uninstall can rmdir them in order (only when empty).
    printf '%s\n' "${CREATED_DIRS[@]}" | awk 'NF && !seen[$0]++ { print length($0) "\t" $0 }' \
      | sort -rn | cut -f2- | sed 's/^/dir\t/'
    [ $created_group = 1 ] && printf 'group\t%s\n' "$GROUP"
  } > "$root/$MANIFEST_NAME.new"
  mv -f "$root/$MANIFEST_NAME.new" "$root/$MANIFEST_NAME"

  say "installed $launcher ($caps, mode 0750 root:$GROUP) and $PREFIX/venv"
  check_tun_device
  local user=${SUDO_USER:-}
  if [ -n "$user" ] && [ "$user" != root ] && ! id -nG "$user" 2>/dev/null | tr ' ' '\n' | grep -qx "$GROUP"; then
    say "only members of group $GROUP may run proxyvpn: sudo usermod -aG $GROUP $user, then log in again"
  else
    say "only members of group $GROUP may run proxyvpn (sudo usermod -aG $GROUP USER, then log in again)"
  fi
}

# ------------------------------------------------------------------ uninstall

cmd_uninstall() {
  check_path_var PREFIX "$PREFIX"
  [ "$(id -u)" = 0 ] || die "uninstalling needs root: sudo ./install.sh uninstall"
  local manifest
  manifest=$(manifest_path)
  if [ ! -f "$manifest" ]; then
    say "nothing to uninstall: no $manifest (PREFIX=$PREFIX)"
    return 0
  fi
  local kind path sum group="" dirs=()
  while IFS=$'\t' read -r kind path sum; do
    case $kind in
      launcher)
        if [ -e "$path" ]; then
          if [ "$(sha256sum "$path" | cut -d' ' -f1)" = "$sum" ]; then
            rm -f "$path"; say "removed $path"
          else
            say "left $path in place: it changed since it was installed"
          fi
        fi ;;
      venv)
        # Only a venv directory inside PREFIX is ever removed recursively.
        if [ "$path" = "$PREFIX/venv" ] && [ -d "$path" ]; then
          rm -rf "$path"; say "removed $path"
        fi ;;
      group) group=$path ;;
      dir) dirs+=("$path") ;;
    esac
  done < <(grep -v '^#' "$manifest")
  rm -f "$manifest"
  for path in "${dirs[@]}"; do  # directories install created, deepest first
    if [ -d "$path" ]; then
      rmdir "$path" 2>/dev/null && say "removed $path" || say "kept $path: not empty"
    fi
  done
  if [ -n "$group" ] && getent group "$group" >/dev/null; then
    local members
    members=$(group_members "$group" | paste -sd, -)
    if [ -z "$members" ]; then
      groupdel "$group"; say "removed group $group"
    else
      say "kept group $group: it still has members ($members); remove it with: sudo groupdel $group"
    fi
  fi
}

case "${1:-install}" in
  install) cmd_install ;;
  build) cmd_build ;;
  uninstall) cmd_uninstall ;;
  check) check_prereqs install; say "all prerequisites are present"; check_tun_device ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
