#!/usr/bin/env bash
# Optional extra: NVIDIA's genai-perf and perf_analyzer, to measure a running `kvrelay serve` with the
# tools a Triton user already has (docs/triton-tools.md). Not part of the two README commands.
#
# Into .venv-perf, apart from .venv: genai-perf pins packages of its own. PyPI's `perf-analyzer` (which
# genai-perf requires) is a placeholder; the real binary ships inside the tritonclient 2.51 wheel (the version of the tritonserver kvrelay runs). It
# needs Debian's libb64-0d and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12, a library only: it runs
# on a CPU machine), so bin/perf_analyzer becomes a wrapper that puts those on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup-perf-tools: apt-get install libb64-0d" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
  else
    echo "setup-perf-tools: please install Debian's libb64-0d (perf_analyzer links it)" >&2
    exit 1
  fi
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv-perf/bin/python ] || "$PY" -m venv .venv-perf
pip=(.venv-perf/bin/python -m pip install -q --disable-pip-version-check)
if [ ! -e .venv-perf/.ready ]; then
  echo "setup-perf-tools: installing genai-perf 0.0.16 and perf_analyzer (tritonclient 2.51) into .venv-perf" >&2
  "${pip[@]}" torch==2.13.0                       # the CPU wheel on disk; genai-perf's transformers wants a torch
  # tritonclient 2.51 needs numpy < 2, and pandas 3 needs numpy >= 2
  "${pip[@]}" genai-perf==0.0.16 nvidia-cuda-runtime-cu12 "numpy<2" "pandas<3"
  "${pip[@]}" --force-reinstall --no-deps "tritonclient[all]==2.51.0"   # its data/bin holds perf_analyzer
  "${pip[@]}" "tritonclient[all]==2.51.0"
  mv .venv-perf/bin/perf_analyzer .venv-perf/bin/perf_analyzer.bin
  cudart=$(.venv-perf/bin/python -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))')
  cat > .venv-perf/bin/perf_analyzer <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$(pwd)/.venv-perf/bin/perf_analyzer.bin" "\$@"
EOF
  chmod +x .venv-perf/bin/perf_analyzer
  touch .venv-perf/.ready
fi
.venv-perf/bin/perf_analyzer --version >/dev/null 2>&1 || .venv-perf/bin/perf_analyzer --help >/dev/null
echo "setup-perf-tools: ready: PATH=\"$(pwd)/.venv-perf/bin:\$PATH\" genai-perf profile ... (docs/triton-tools.md)" >&2
