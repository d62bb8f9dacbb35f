#!/usr/bin/env bash
# "Serve your own models", end to end, as docs/byom.md describes: two directories a
# user brings (a PEFT LoRA adapter and a full fine-tune over a SmolLM2 base) -> registered -> profiled
# on the user's data -> served by tritonserver -> queried. Run after scripts/setup.sh; ~15 minutes on
# 2 CPU cores (making the models ~3, profiling 6 pairs ~9, serving ~2).
# Usage: scripts/byom_smol.sh [WORKDIR]   (default: $KVRELAY_HOME/byom-smol, outside git)
set -euo pipefail
cd "$(dirname "$0")/.."
KV=.venv/bin/kvrelay
W=${1:-${KVRELAY_HOME:-$HOME/.cache/kvrelay}/byom-smol}
PORT=${PORT:-8000}
say() { printf '\n+ %s\n' "$*" >&2; }

# 1. What the user has: made with transformers and PEFT alone (kept when already there).
[ -e "$W/data.jsonl" ] || { say python scripts/byom_smol_models.py "$W"; .venv/bin/python scripts/byom_smol_models.py "$W"; }

# 2. Register them once; every command then takes --family byom-smol.
say $KV models add byom-smol --base "$W/base" --variant code="$W/code-qv" --variant legal="$W/legal-full" --replace
$KV models add byom-smol --base "$W/base" --variant code="$W/code-qv" --variant legal="$W/legal-full" --replace
$KV models list

# 3. Which layers each pair recomputes, measured on the user's own contexts (the profile part of data.jsonl).
say $KV profile --family byom-smol --all-pairs --data "$W/data.jsonl" --samples 4 --ref-tokens 48 --profiles "$W/profiles"
$KV profile --family byom-smol --all-pairs --data "$W/data.jsonl" --samples 4 --ref-tokens 48 \
  --profiles "$W/profiles" --no-progress

# 4. A deployment file that alone says what is served: the same directories in a [family] table.
cat > "$W/byom.toml" <<EOF
profiles_dir = "$W/profiles"
max_tokens_limit = 256

[family]
name = "byom-smol"
base = "base"
[family.variants]
code = "code-qv"
legal = "legal-full"
EOF
say $KV serve --deployment "$W/byom.toml" --http-port $PORT
$KV serve --deployment "$W/byom.toml" --http-port "$PORT" --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
  > "$W/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "localhost:$PORT/v2/health/ready" >/dev/null && break
  kill -0 $SERVE 2>/dev/null || { cat "$W/serve.log" >&2; exit 1; }
  sleep 1
done

# 5. One held-out context, asked by the base first (its pages are published), then by each variant.
.venv/bin/python -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["context"])' "$W/data.jsonl" \
  > "$W/context.txt"
for m in base code legal; do
  say $KV query --model $m --context-file "$W/context.txt" "Continue the text above."
  $KV query --url "127.0.0.1:$PORT" --model $m --context-file "$W/context.txt" --max-tokens 32 "Continue the text above."
done
