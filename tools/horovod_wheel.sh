#!/usr/bin/env bash
# Install Horovod into a Python environment, building its wheel once and caching it.
#
#   tools/horovod_wheel.sh PYTHON
#
# Horovod 0.28.1 (its last release) pins C++14 in its CMake files, and torch >= 2.1's headers need C++17, so
# the sdist does not build as shipped. This script builds it with the standard raised to 17, the Gloo
# controller, PyTorch only, and no MPI (docs/ARCHITECTURE.md section 4), then caches the wheel under
#   ${DSQ_WHEEL_CACHE:-~/.cache/doublesqueeze/wheels}/horovod-<hvd>-torch<torch>-<python tag>/
# so later set-ups and CI install it in seconds. The cache key holds the Horovod, torch and Python versions:
# a wheel built against one torch ABI is never installed against another.
# Building takes about 4 minutes on 2 cores; HOROVOD_BUILD_JOBS sets the parallelism (default: all cores).
set -euo pipefail

PY=${1:?usage: tools/horovod_wheel.sh PYTHON}
HVD_VERSION=${HOROVOD_VERSION:-0.28.1}
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
CACHE_ROOT=${DSQ_WHEEL_CACHE:-$HOME/.cache/doublesqueeze/wheels}
CACHE="$CACHE_ROOT/horovod-$HVD_VERSION-torch$TORCH_VERSION-$PY_TAG"
RUNTIME_DEPS=(cloudpickle psutil pyyaml packaging cffi)
CONSTRAINTS="$(cd "$(dirname "$0")/.." && pwd)/constraints.txt"      # keeps torch pinned

installed() {
    "$PY" - "$HVD_VERSION" <<'EOF'
import sys
try:
    import horovod.torch as hvd
    from horovod.common.util import gloo_built
except Exception:
    sys.exit(1)
import horovod
sys.exit(0 if horovod.__version__ == sys.argv[1] and gloo_built() else 1)
EOF
}

if installed; then
    exit 0
fi

if ! ls "$CACHE"/horovod-*.whl >/dev/null 2>&1; then
    WORK=$(mktemp -d)
    LOG="$CACHE_ROOT/horovod-$HVD_VERSION-torch$TORCH_VERSION-$PY_TAG.build.log"
    mkdir -p "$CACHE_ROOT"
    echo "Building Horovod $HVD_VERSION against torch $TORCH_VERSION ($PY_TAG); about 4 minutes, log: $LOG"
    STEP=""
    step() {     # run one build step, logging it; `set -e` does not apply inside `... || handler`, so check here
        STEP=$1; shift
        echo "== $STEP: $*" >>"$LOG"
        "$@" >>"$LOG" 2>&1
    }
    src="$WORK/horovod-$HVD_VERSION"
    : >"$LOG"
    if ! { step "installing build requirements" "$PY" -m pip install -c "$CONSTRAINTS" "${RUNTIME_DEPS[@]}" \
               setuptools wheel &&
           step "downloading the sdist" "$PY" -m pip download --no-deps --no-binary :all: "horovod==$HVD_VERSION" \
               -d "$WORK" &&
           step "unpacking the sdist" tar -xzf "$WORK/horovod-$HVD_VERSION.tar.gz" -C "$WORK" &&
           step "raising CMAKE_CXX_STANDARD to 17" sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
               "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" &&
           step "checking the C++17 fix" grep -q 'set(CMAKE_CXX_STANDARD 17)' "$src/horovod/torch/CMakeLists.txt" &&
           step "compiling (cmake, g++)" env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
               HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo \
               MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-$(nproc)}" \
               "$PY" -m pip wheel -v --no-deps --no-build-isolation "$src" -w "$WORK/dist" &&
           step "caching the wheel" mkdir -p "$CACHE" &&
           step "caching the wheel" cp "$WORK"/dist/horovod-$HVD_VERSION-*.whl "$CACHE"/; }; then
        rm -rf "$CACHE"
        echo "ERROR: building Horovod $HVD_VERSION failed while $STEP. The last lines of $LOG:" >&2
        tail -n 30 "$LOG" >&2
        echo "It needs cmake >= 3.13, g++ with C++17 and network access to PyPI." >&2
        echo "Retry with: tools/horovod_wheel.sh $PY   (or: make setup).  Build dir kept: $WORK" >&2
        exit 1
    fi
    rm -rf "$WORK"
fi

"$PY" -m pip install -q -c "$CONSTRAINTS" "${RUNTIME_DEPS[@]}"
"$PY" -m pip install -q --no-deps --force-reinstall "$CACHE"/horovod-*.whl
if ! installed; then
    echo "ERROR: Horovod from $CACHE installed but does not import with Gloo. Delete that folder and retry." >&2
    exit 1
fi
echo "Horovod $HVD_VERSION installed from $CACHE"
