#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + Gloo + MPI) into a Python environment.
#
# Usage:
#   PYTHON=/path/to/venv/bin/python bash launch/build_horovod.sh
#
# Why a script: Horovod's last release (0.28.1) hard-codes C++14, but torch >= 2.10's
# headers need C++20, and CMake >= 4 refuses Horovod's old cmake_minimum_required().
# Without patching Horovod's source we:
#   * install "cmake<4" into the target environment;
#   * point HOROVOD_CMAKE at a small wrapper that adds -DCMAKE_PROJECT_INCLUDE=cxx20.cmake
#     to configure calls; that file (run by CMake right after project()) makes CMake's
#     "C++14" flag expand to -std=c++20 / -std=gnu++20.
# Both helper files live in a temporary directory that is removed on exit.
#
# Environment (all optional):
#   PYTHON             interpreter of the target environment (default: `python` on PATH).
#                      It must already hold torch and an MPI (e.g. pip `mpich` + mpi4py);
#                      the environment's bin/ directory is put first on PATH so CMake
#                      finds that environment's mpicc/mpicxx and cmake.
#   FORCE=1            rebuild even if a working horovod 0.28.1 is already installed.
#   BUILD_JOBS=N       parallel compile jobs (default: nproc). Each C++20 torch
#                      translation unit needs ~1-2 GB of RAM: lower this on small nodes.
#   DEBUG_INFO=1       compile with -g, as Horovod's own build does (left out by default:
#                      it slows the build, and a wheel from PyPI carries none either).
#   CUDA_HOME          CUDA toolkit to build against (default: /usr/local/cuda if present).
#   HOROVOD_GPU_OPERATIONS, HOROVOD_NCCL_HOME, HOROVOD_NCCL_LINK, ...
#                      passed through untouched to Horovod's build (not set by this script).
#
# CUDA: torch here is a CUDA wheel. Horovod's CMake asks torch whether it is a CUDA
# build *and* a CUDA toolkit can be found (torch.utils.cpp_extension.CUDA_HOME).
#   - toolkit found  -> Horovod is built with CUDA support (required in that case, the
#                       build is then forced to enable CUDA); without HOROVOD_GPU_OPERATIONS
#                       GPU tensors are staged through host memory and reduced with the CPU
#                       backend (Gloo/MPI). CPU tensors behave exactly as in a CPU-only build,
#                       and the library runs on nodes without a GPU.
#   - no toolkit     -> a CPU-only Horovod is built automatically (passing CUDA tensors to
#                       it then fails). Nothing needs to be set for that.
#   For GPU clusters, NCCL (HOROVOD_GPU_OPERATIONS=NCCL plus HOROVOD_NCCL_HOME or
#   HOROVOD_NCCL_INCLUDE/HOROVOD_NCCL_LIB, HOROVOD_NCCL_LINK=SHARED) is the fast option;
#   that is not exercised by this script's default.
#
# Idempotent: exits early when `import horovod.torch` works, reports version 0.28.1 and
# was built with Gloo and MPI. On success `horovodrun --check-build` is run and must list
# PyTorch, Gloo and MPI.
set -euo pipefail

HOROVOD_VERSION=0.28.1
PYTHON=${PYTHON:-python}
start=$SECONDS

say() { printf '[build_horovod] %s\n' "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }
elapsed() { local s=$((SECONDS - start)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

PYTHON=$(command -v "$PYTHON") || die "python interpreter '$PYTHON' not found"
"$PYTHON" -c 'import torch' 2>/dev/null || die "$PYTHON cannot import torch"
SCRIPTS=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$SCRIPTS:$PATH"
say "python: $PYTHON ($("$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"

installed_ok() {
    # Quiet check: right version, torch bindings import, Gloo and MPI compiled in.
    "$PYTHON" - "$HOROVOD_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
import horovod
import horovod.torch as hvd
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert hvd.gloo_built() and hvd.mpi_built()
EOF
}

check_build() {
    local out
    out=$("$SCRIPTS/horovodrun" --check-build) || die "horovodrun --check-build failed"
    echo "$out"
    for want in PyTorch Gloo MPI; do
        grep -q "\[X\] $want" <<<"$out" || die "horovodrun --check-build does not list $want"
    done
}

if [[ "${FORCE:-0}" != 1 ]] && installed_ok; then
    say "horovod $HOROVOD_VERSION already installed and working; nothing to do (FORCE=1 rebuilds)"
    check_build
    say "done in $(elapsed)"
    exit 0
fi

command -v mpicxx >/dev/null || command -v mpicc >/dev/null \
    || die "no MPI compiler wrapper (mpicxx/mpicc) on PATH; install e.g. 'pip install mpich mpi4py' into the environment"

say "installing build requirements (cmake<4, wheel, setuptools, packaging)"
"$PYTHON" -m pip install --quiet "cmake<4" wheel setuptools packaging
CMAKE_BIN="$SCRIPTS/cmake"
[[ -x "$CMAKE_BIN" ]] || CMAKE_BIN=$(command -v cmake)
say "cmake: $CMAKE_BIN ($("$CMAKE_BIN" --version | head -n1))"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/build_horovod.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

cat >"$TMP/cxx20.cmake" <<'EOF'
# Included right after project() via CMAKE_PROJECT_INCLUDE: Horovod asks for C++14,
# torch's headers need C++20.
set(CMAKE_CXX14_STANDARD_COMPILE_OPTION "-std=c++20")
set(CMAKE_CXX14_EXTENSION_COMPILE_OPTION "-std=gnu++20")
EOF
if [[ "${DEBUG_INFO:-0}" != 1 ]]; then
    # Horovod builds RelWithDebInfo, -O2 -g (its CMakeLists then makes it -O3): the same
    # without -g, whose debug information of the torch translation units is slow to write.
    cat >>"$TMP/cxx20.cmake" <<'EOF'
set(CMAKE_C_FLAGS_RELWITHDEBINFO "-O2 -DNDEBUG")
set(CMAKE_CXX_FLAGS_RELWITHDEBINFO "-O2 -DNDEBUG")
EOF
fi

cat >"$TMP/cmake" <<EOF
#!/bin/bash
# HOROVOD_CMAKE wrapper: add the C++20 include to configure calls only.
for a in "\$@"; do case "\$a" in --build|--version|-E|--install) exec "$CMAKE_BIN" "\$@";; esac; done
exec "$CMAKE_BIN" -DCMAKE_PROJECT_INCLUDE="$TMP/cxx20.cmake" "\$@"
EOF
chmod +x "$TMP/cmake"

export HOROVOD_CMAKE="$TMP/cmake"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_CPU_OPERATIONS=gloo
export CMAKE_POLICY_VERSION_MINIMUM=3.5
export MAKEFLAGS="-j${BUILD_JOBS:-$(nproc)}"

cuda_root=""
if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    cuda_root=$CUDA_HOME
elif [[ -d /usr/local/cuda ]]; then
    cuda_root=/usr/local/cuda
fi
if [[ -n "$cuda_root" ]]; then
    export CUDAToolkit_ROOT="$cuda_root" CUDA_HOME="$cuda_root" HOROVOD_CUDA_HOME="$cuda_root"
    say "CUDA toolkit: $cuda_root (GPU operations: ${HOROVOD_GPU_OPERATIONS:-none, GPU tensors staged via host})"
else
    say "no CUDA toolkit found: building CPU-only Horovod"
fi

say "building horovod==$HOROVOD_VERSION with $MAKEFLAGS (several minutes)"
"$PYTHON" -m pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps --no-binary horovod \
    "horovod==$HOROVOD_VERSION"
# --no-deps above keeps pip from touching torch & co.; install Horovod's own light deps.
"$PYTHON" -m pip install --quiet "horovod==$HOROVOD_VERSION"

installed_ok || die "horovod installed but 'import horovod.torch' (with Gloo and MPI) fails"
check_build
say "horovod $HOROVOD_VERSION built and installed in $(elapsed)"
