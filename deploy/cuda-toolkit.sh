#!/usr/bin/env bash
# Assembles what `cargo build --features cuda` needs from the Python package registry, for
# machines with no CUDA toolkit installed (such as this project's build machines):
#
#   deploy/cuda-toolkit.sh PREFIX [CUDA_VERSION]      # e.g. /opt/cuda13 13.0
#
# then build with
#
#   PATH=PREFIX/bin:$PATH CUDA_ROOT=PREFIX CUDA_COMPUTE_CAP=90 \
#     cargo build --release -p tandem-cli --features cuda
#
# nvcc compiles candle's kernels; the headers, the libraries to link against and a stub of the
# driver library (libcuda.so, normally installed with the GPU driver) make the link work. The
# binary then runs where the driver and the CUDA runtime libraries are installed
# (LD_LIBRARY_PATH=/usr/local/cuda/lib64 on a standard toolkit install). Match CUDA_VERSION to
# the target machine's driver: PTX from a newer nvcc than the driver supports does not load.
set -euo pipefail
prefix=$1
version=${2:-13.0}
major=${version%%.*}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT

# The nvcc wheel ships without cicc (nvvm) and the crt headers since CUDA 13.
for p in nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl \
  nvidia-cuda-nvrtc nvidia-cublas; do
  python3 -m pip download -q --no-deps -d "$wheels" "$p==$version.*"
done
# curand has its own version line; its CUDA 13 wheels link the same soname.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" nvidia-curand

unpacked=$wheels/x
mkdir -p "$unpacked"
for w in "$wheels"/*.whl; do
  python3 -m zipfile -e "$w" "$unpacked"
done
root=$unpacked/nvidia/cu$major
mkdir -p "$prefix/bin" "$prefix/include" "$prefix/lib64/stubs"
cp -r "$root/bin/." "$prefix/bin/"
cp -r "$root/nvvm" "$prefix/"
cp -r "$root/include/." "$prefix/include/"
find "$unpacked" -name 'lib*.so*' -exec cp -f {} "$prefix/lib64/" \;
chmod +x "$prefix/bin/"* "$prefix/nvvm/bin/"*
(
  cd "$prefix/lib64"
  for l in cudart cublas cublasLt nvrtc curand; do
    so=$(ls "lib$l.so."* | grep -v alt | sort | head -1)
    ln -sf "$so" "lib$l.so"
  done
)

# The driver stub: every cu* entry point cudarc declares, each a function that fails.
sys=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-*/src/driver/sys/mod.rs' \
  | sort | tail -1)
if [ -z "$sys" ]; then
  echo "cudarc's sources are not in the cargo registry: run 'cargo fetch' first" >&2
  exit 1
fi
grep -oh 'fn cu[A-Za-z0-9_]*' "$sys" | sed 's/^fn //' | sort -u \
  | sed 's/.*/int &(void) { return 999; }/' >"$wheels/stub.c"
cc -shared -fPIC -o "$prefix/lib64/stubs/libcuda.so" "$wheels/stub.c" -Wl,-soname,libcuda.so.1
"$prefix/bin/nvcc" --version | tail -2
echo "CUDA $version toolkit for building in $prefix"
