#!/usr/bin/env bash
# Builds the `tandem:local` image without pulling anything: the release binary, the shared
# libraries it links (as ldd resolves them on this machine) and a minimal /etc, imported as a
# filesystem tarball. glibc ≥ 2.34 has the `files` and `dns` NSS modules built in, so container
# names resolve through Docker's /etc/hosts and embedded DNS with no extra libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
# The workspace's own build (`cargo run --release` puts it in ./target): an image after the demo
# compiles nothing new. CI points CARGO_TARGET_DIR at its shared cache instead.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
IMAGE="${TANDEM_IMAGE:-tandem:local}"
# CI sets TANDEM_IMAGE_PROFILE=dev to reuse the test build instead of a second, release build.
PROFILE="${TANDEM_IMAGE_PROFILE:-release}"

started=$(date +%s)
cargo build --profile "$PROFILE" -p tandem-cli
if [ "$PROFILE" = dev ]; then dir=debug; else dir="$PROFILE"; fi
bin="$CARGO_TARGET_DIR/$dir/tandem"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/artifacts"
chmod 1777 "$root/tmp"
cp "$bin" "$root/bin/tandem"
# Debug info is for profiling on the build machine; the image does not need it.
strip "$root/bin/tandem" 2>/dev/null || true
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/bin/tandem\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"

tar -C "$root" -c . | docker import \
  --change 'ENTRYPOINT ["/bin/tandem"]' \
  --change 'ENV TANDEM_LOG=info TANDEM_ARTIFACTS=/artifacts' \
  --change 'WORKDIR /' \
  - "$IMAGE" >/dev/null
echo "built $IMAGE in $(( $(date +%s) - started ))s ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"

# The NATS JetStream server of the compose cluster, from Debian's nats-server package on this
# machine (.ci/run installs it), assembled the same way: binary, its libraries, a config.
NATS_IMAGE="${TANDEM_NATS_IMAGE:-tandem-nats:local}"
nats_bin=$(command -v nats-server || true)
[ -n "$nats_bin" ] || { echo "nats-server not found: apt-get install -y nats-server" >&2; exit 1; }
nroot=$(mktemp -d)
trap 'rm -rf "$root" "$nroot"' EXIT
mkdir -p "$nroot/bin" "$nroot/etc/nats" "$nroot/data" "$nroot/tmp"
chmod 1777 "$nroot/tmp"
cp -L "$nats_bin" "$nroot/bin/nats-server"
for lib in $(ldd "$nats_bin" 2>/dev/null | grep -o '/[^ ]*'); do
  mkdir -p "$nroot$(dirname "$lib")"
  cp -L "$lib" "$nroot$lib"
done
# One server, JetStream on a file store at /data (a volume), monitoring (/healthz) on 8222.
cat > "$nroot/etc/nats/nats.conf" <<'CONF'
port: 4222
http_port: 8222
jetstream {
  store_dir: /data
}
CONF
tar -C "$nroot" -c . | docker import \
  --change 'ENTRYPOINT ["/bin/nats-server", "--config", "/etc/nats/nats.conf"]' \
  --change 'WORKDIR /' \
  - "$NATS_IMAGE" >/dev/null
echo "built $NATS_IMAGE ($("$nats_bin" --version), $(docker image inspect -f '{{.Size}}' "$NATS_IMAGE") bytes)"
