#!/usr/bin/env bash
# One-step set-up. `bash setup.sh` installs what the app needs; `bash setup.sh --test` adds the
# test tools and the browser (Debian's chromium; Playwright never downloads its own).
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install -q --disable-pip-version-check"
# torch first, pinned: a looser pin pulls a multi-GB CUDA build.
$PIP torch==2.13.0
# llama-cpp-python (in requirements.txt) compiles llama.cpp (4 min on 2 busy cores): every core, only
# the libraries the bindings load (no LLaVA helper, no common utils), no OpenMP, and portable x86
# kernels (AVX2): a native build crashes on machines that advertise instructions they cannot run; no
# llamafile GEMM, whose batched products round differently from one-row ones (an answer decoded in a
# batch must equal the same answer decoded alone).
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_INCLUDE=$PWD/scripts/llama_cpp_no_common.cmake}"
$PIP -r requirements.txt
$PIP --no-deps -r requirements-lite.txt
# The package itself, editable: the `minigpt4` command, from any directory (its deps are the pins above).
$PIP --no-deps --no-build-isolation -e .
if [[ "${1:-}" == "--test" ]]; then
    $PIP -r requirements-test.txt
    if ! command -v chromium >/dev/null 2>&1; then
        if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
    fi
fi
