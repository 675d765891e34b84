#!/bin/sh
# Builds the Debian package: target/debian/outpost_VERSION-REVISION_ARCH.deb (and -dbgsym).
# The man page and the shell completions are rendered by the binary itself (`outpost man`,
# `outpost completions SHELL`) into target/release/deb-assets/, which node/Cargo.toml's
# [package.metadata.deb] assets name. Needs cargo-deb (`cargo install cargo-deb --locked`).
#   systemd/deb/build-deb.sh [--no-build]     (--no-build: use the existing release binary)
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
if [ "${1:-}" != "--no-build" ]; then
    cargo build --release -p outpost
fi
bin="$target/release/outpost"
assets="$target/release/deb-assets"
mkdir -p "$assets"
"$bin" man | gzip -9n > "$assets/outpost.1.gz"
"$bin" completions bash > "$assets/outpost.bash"
"$bin" completions zsh > "$assets/_outpost"
"$bin" completions fish > "$assets/outpost.fish"
cargo deb -p outpost --no-build
