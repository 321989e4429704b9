#!/usr/bin/env bash
# Build proxyvpn_<version>-1_<arch>.deb with dpkg-deb, from files staged by install.sh.
#
#   packaging/debian/build-deb.sh [OUT_DIR]      (default: build/deb; no root needed)
#
# The package installs /usr/bin/proxyvpn (the launcher) and /usr/lib/proxyvpn/venv, plus
# the systemd unit and an example configuration. Its postinst creates group proxyvpn,
# makes the launcher 0750 root:proxyvpn (dpkg-statoverride) and runs setcap; prerm stops
# the service; postrm removes leftovers and, on purge, the override and the group (if it
# has no members). The venv is tied to the Python it was built with: the package depends
# on exactly that python3.X; rebuild it for another release.
# Extra arguments for pip (e.g. a wheelhouse) go in PIP_ARGS, as for install.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/build/deb}
PYTHON=${PYTHON:-/usr/bin/python3}
REVISION=${REVISION:-1}
COMPRESSION=${COMPRESSION:-gzip}   # dpkg-deb -Z: gzip (fast), xz (smaller)

command -v dpkg-deb >/dev/null || { echo "build-deb.sh: dpkg-deb is missing (apt-get install dpkg-dev)" >&2; exit 1; }
VERSION=$("$PYTHON" -c 'import tomllib, sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
ARCH=$(dpkg --print-architecture)

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/proxyvpn-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
chmod 755 "$STAGE"

DESTDIR=$STAGE PREFIX=/usr/lib/proxyvpn INSTALL_DIR=/usr/bin GROUP=proxyvpn PYTHON="$PYTHON" \
  "$REPO/install.sh" install

install -D -m 0644 "$REPO/packaging/systemd/proxyvpn.service" "$STAGE/lib/systemd/system/proxyvpn.service"
install -D -m 0644 "$REPO/packaging/proxyvpn.toml" "$STAGE/usr/share/doc/proxyvpn/examples/proxyvpn.toml"
install -D -m 0644 "$REPO/README.md" "$STAGE/usr/share/doc/proxyvpn/README.md"
cat > "$STAGE/usr/share/doc/proxyvpn/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: proxyvpn
License: MIT
 The venv under /usr/lib/proxyvpn bundles the Python dependencies listed in
 /usr/lib/proxyvpn/venv/lib/python*/site-packages/*.dist-info, each under its own license.
COPYRIGHT

mkdir -p "$STAGE/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "$HERE/$script" "$STAGE/DEBIAN/$script"
done
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: proxyvpn
Version: $VERSION-$REVISION
Architecture: $ARCH
Maintainer: proxyvpn developers <proxyvpn@localhost>
Installed-Size: $SIZE
Depends: python$PYVER, libc6, libcap2, libcap2-bin, libnftables1, nftables, iproute2, passwd
Section: net
Priority: optional
Description: route every TCP connection through an HTTP CONNECT proxy
 proxyvpn creates a TUN device, policy routing and an nftables killswitch, and
 relays each captured TCP flow through an upstream HTTP CONNECT proxy. It runs
 without root: the launcher /usr/bin/proxyvpn holds only CAP_NET_ADMIN (file
 capability) and may be run by members of group proxyvpn.
CONTROL

mkdir -p "$OUT"
DEB="$OUT/proxyvpn_${VERSION}-${REVISION}_${ARCH}.deb"
dpkg-deb --root-owner-group "-Z$COMPRESSION" --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
