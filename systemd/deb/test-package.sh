#!/bin/sh
# The Debian package end to end on this box, as root: build it (unless --no-build), lintian,
# `dpkg -i`, then for every role what the unit would do (no systemd runs here): the config
# checks, `outpost init` as the outpost user, a first start that creates the identity
# itself, and at the end `dpkg --purge`. It leaves the box as it found it: it refuses to run
# where outpost is already installed or /var/lib/outpost exists, and removes the user and
# the state it created. Prints `package test: ok` at the end, or stops at the first failure.
#   systemd/deb/test-package.sh [--no-build]
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
[ "$(id -u)" = 0 ] || { echo "package test: needs root (dpkg -i)" >&2; exit 2; }
if dpkg -s outpost >/dev/null 2>&1 || [ -e /var/lib/outpost ] || [ -e /etc/outpost ]; then
    echo "package test: outpost is installed here or /var/lib/outpost or /etc/outpost exists; not touching it" >&2
    exit 2
fi
step() { echo "--- $*"; }
fail() { echo "package test: FAILED: $*" >&2; exit 1; }
tmp=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    dpkg --purge outpost >/dev/null 2>&1 || true
    rm -rf /var/lib/outpost "$tmp"
    if getent passwd outpost >/dev/null; then userdel outpost || true; fi
    if getent group outpost >/dev/null; then groupdel outpost 2>/dev/null || true; fi
}
trap cleanup EXIT

step "build"
"$root/systemd/deb/build-deb.sh" ${1:-} | tail -n 2
version=$(sed -n '1s/^outpost (\(.*\)).*/\1/p' "$root/systemd/deb/changelog")
deb="$target/debian/outpost_${version}_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || fail "no $deb (changelog version $version)"

step "lintian $deb"
if command -v lintian >/dev/null; then
    lintian "$deb" 2>&1 | grep -v 'running with root privileges' || true
    if lintian "$deb" 2>/dev/null | grep -q '^E:'; then fail "lintian reports errors"; fi
else
    echo "lintian not installed (apt-get install lintian); skipped"
fi

step "dpkg -i"
dpkg -i "$deb"
getent passwd outpost >/dev/null || fail "no outpost user"
for role in datacenter controller worker; do
    [ -f "/etc/outpost/$role.toml" ] || fail "no /etc/outpost/$role.toml"
    st=$(stat -c '%a %U:%G' "/var/lib/outpost/$role")
    [ "$st" = "750 outpost:outpost" ] || fail "/var/lib/outpost/$role is $st"
done
grep -c conffile /var/lib/dpkg/info/outpost.conffiles >/dev/null 2>&1 || true
echo "conffiles: $(tr '\n' ' ' < /var/lib/dpkg/info/outpost.conffiles)"
[ -f /usr/share/man/man1/outpost.1.gz ] || fail "no man page"
zcat /usr/share/man/man1/outpost.1.gz | grep -q '^\.TH outpost 1' || fail "man page has no .TH"
for f in /usr/share/bash-completion/completions/outpost /usr/share/zsh/vendor-completions/_outpost \
    /usr/share/fish/vendor_completions.d/outpost.fish; do
    [ -s "$f" ] || fail "no $f"
done
echo "man page and completions installed"

# setpriv execs the command itself (runuser stays its parent), so $! is the node's pid.
as_outpost() { setpriv --reuid=outpost --regid=outpost --init-groups "$@"; }

step "datacenter: config check, then a first start creates the identity"
outpost config check --role datacenter
# The shipped ports may be taken on a shared box: the same config on kernel-chosen ports.
sed -e 's/^listen = .*/listen = "127.0.0.1:0"/' -e 's/^api = .*/api = "127.0.0.1:0"/' \
    /etc/outpost/datacenter.toml > "$tmp/datacenter.toml"
chmod 644 "$tmp/datacenter.toml"; chmod 755 "$tmp"
# Not through the shell function: `func &` would fork a subshell, and $! would be its pid.
setpriv --reuid=outpost --regid=outpost --init-groups \
    outpost run --role datacenter --config "$tmp/datacenter.toml" 2> "$tmp/dc.log" &
pid=$!
i=0
until grep -q ' ready ' "$tmp/dc.log"; do
    i=$((i + 1)); [ $i -lt 600 ] || { cat "$tmp/dc.log"; fail "datacenter not ready"; }
    kill -0 $pid 2>/dev/null || { cat "$tmp/dc.log"; fail "datacenter exited"; }
    sleep 0.1
done
outpost status --role datacenter --api "http://$(sed -n 's/.* api=\([^ ]*\).*/\1/p' "$tmp/dc.log" | head -n1)" | head -n 3
kill -TERM $pid; st=0; wait $pid || st=$?; pid=
[ $st = 0 ] || { cat "$tmp/dc.log"; fail "datacenter did not stop cleanly (exit $st)"; }
ls -l /var/lib/outpost/datacenter

step "controller: init as the outpost user, config check"
as_outpost outpost init --role controller --data-dir /var/lib/outpost/controller | tee "$tmp/ctl"
outpost config check --role controller

step "worker: the shipped config is refused until the controller's fingerprint is in it"
if outpost config check --role worker; then fail "placeholder fingerprint accepted"; fi
fp=$(sed -n 's/^fingerprint: //p' "$tmp/ctl")
sed -i "s/^fingerprint = \"0\{64\}\"/fingerprint = \"$fp\"/" /etc/outpost/worker.toml
outpost config check --role worker
as_outpost outpost init --role worker --data-dir /var/lib/outpost/worker
for role in datacenter controller worker; do
    [ -f "/var/lib/outpost/$role/outpost.redb" ] || fail "no database for $role"
    st=$(stat -c '%a %G' "/var/lib/outpost/$role/token")
    [ "$st" = "640 outpost" ] || fail "$role token is $st"
done

step "dpkg --purge"
dpkg --purge outpost
[ ! -e /etc/outpost ] || fail "/etc/outpost left after purge: $(ls /etc/outpost)"
[ -e /var/lib/outpost/datacenter/outpost.redb ] || fail "purge removed a node identity"
echo "kept: $(ls /var/lib/outpost)"
echo "package test: ok"
