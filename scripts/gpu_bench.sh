#!/usr/bin/env bash
# Every GPU row of issue 17 in one run, written under $OUT: gpu_bench.md (the tables, a header with
# the device and JAX version, each stage's status and seconds) and gpu_bench.log (everything).
#
#   OUT=/some/folder bash scripts/gpu_bench.sh            # on a GPU (H100/H200): under 8 minutes
#   SMOKE=1 OUT=/tmp/x bash scripts/gpu_bench.sh          # the same stages, tiny config, on CPU
#
# Stages (each under `timeout`; a failed or timed-out stage is recorded and the next one runs):
#   streaming-bf16   bench/streaming.py --modes cfg8,arc4 --batch 1,8, bf16, the DiT alone and end
#                    to end with the random-weight Oobleck decode (the issue's goal rows)
#   serve            bench/serve.py --mode text, 8 steps + CFG 3, bf16, up to 256 sessions, one
#                    shared slot pool (its programs compile once, not once per count)
#   cmdbuf-*         the batch-1 bf16 cfg8 DiT row under XLA command-buffer variants: default
#                    flags (fori_loop and the unrolled step loop); off; +WHILE,+CONDITIONAL (the
#                    step loop and start_stream's cond captured; fori and unrolled); a minimum
#                    graph size of 1. XLA aborts on an unknown flag or value: each variant is its
#                    own process, and a rejected flag is reported as such
#   streaming-fp32   the same rows as streaming-bf16 in float32 (TF32 matmuls by default on GPU)
# The stages share a persistent compilation cache, fresh unless LMDM_COMPILE_CACHE names one (a
# program compiled once, e.g. the batch-1 bf16 DiT block, is loaded by later stages; XLA flags
# are part of its key). The whole run
# keeps to a budget (GPU_BENCH_BUDGET seconds; default 465, SMOKE 480): each stage's timeout is
# the smaller of its own cap and the time left, and a stage with under 15 s left is skipped.
#
# GPU_BENCH_STAGES picks stage groups (default "bf16 serve cmdbuf fp32"), e.g. to rerun the ones
# a run could not finish. No network is needed. The only package the GPU image lacks is
# ml_collections (pure Python): where `import ml_collections` fails, wheels in .whl/ (carried with
# the run) are installed to a temporary folder first; docs/STREAMING.md gives the exact device
# `run` call.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
if [ -z "${OUT:-}" ]; then
  echo "gpu_bench.sh: set OUT to the folder the tables go to" >&2
  exit 2
fi
mkdir -p "$OUT" || exit 2
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
MD=$OUT/gpu_bench.md
LOG=$OUT/gpu_bench.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
export LMDM_COMPILE_CACHE=${LMDM_COMPILE_CACHE:-$WORK/jaxcache}  # fresh unless one is named
unset LMDM_NO_COMPILE_CACHE
BASE_XLA_FLAGS=${XLA_FLAGS:-}
T0=$(date +%s)

if [ "$SMOKE" = 1 ]; then
  BUDGET=${GPU_BENCH_BUDGET:-480}
  # the variants in float32: XLA:CPU compiles bf16 programs about twice as slowly (the bf16
  # path is smoke-tested by the first stage)
  CONFIG=tiny; CODEC=oobleck-tiny; BATCH=1; REPS=2; WARM=1; PEAK=(--peak-n 256); VDTYPE=float32
  ATTN_VARIANT=jax  # cuDNN's attention needs a GPU: the smoke run checks the plumbing
  SERVE=(--max-sessions 2 --seconds 1)
  CAPS=(150 120 60 60 120)
else
  BUDGET=${GPU_BENCH_BUDGET:-465}
  CONFIG=saos; CODEC=oobleck-random; BATCH=1,8; REPS=30; WARM=3; PEAK=(); VDTYPE=bfloat16
  ATTN_VARIANT=cudnn
  SERVE=(--max-sessions 256 --seconds 10)
  CAPS=(140 150 40 75 120)
fi
# stage caps in seconds (GPU_BENCH_CAPS="bf16 serve variant variant-with-unroll fp32" overrides)
read -r -a CAPS <<<"${GPU_BENCH_CAPS:-${CAPS[*]}}"
CAP_BF16=${CAPS[0]}; CAP_SERVE=${CAPS[1]}; CAP_VARIANT=${CAPS[2]}; CAP_VARIANT_UNROLL=${CAPS[3]}
CAP_FP32=${CAPS[4]}
DEADLINE=$((T0 + BUDGET))
: >"$LOG"

log() { echo "[gpu_bench $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

# ------------------------------------------------------------------ header: device and versions
{
  smoke=""
  [ "$SMOKE" = 1 ] && smoke=", SMOKE: tiny config on whatever device"
  echo "# GPU benchmark (scripts/gpu_bench.sh$smoke)"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC');" \
       "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    q=name,driver_version,memory.total,clocks.sm,clocks.max.sm
    echo "- nvidia-smi: $(timeout 20 nvidia-smi --query-gpu=$q --format=csv,noheader 2>&1 |
                          head -2 | tr '\n' ' ')"
  else
    echo "- nvidia-smi: not found"
  fi
  echo "- XLA_FLAGS (base): '${BASE_XLA_FLAGS}'; budget ${BUDGET} s"
} >"$MD"

if ! "$PY" -c "import ml_collections" >/dev/null 2>&1; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    log "ml_collections missing: installing the wheels in .whl/"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
      .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
ver=$(timeout 120 "$PY" -c "
import sys, jax, jaxlib, flax, ml_collections
d = jax.devices()[0]
print(f'python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, '
      f'flax {flax.__version__}; backend {jax.default_backend()}, {len(jax.devices())} device(s): '
      f'{d.device_kind}')
" 2>&1 | tail -1)
echo "- $ver" >>"$MD"
log "$ver"

# ----------------------------------------------------------------------------- running stages
STATUS=()   # "name|status|seconds" per stage
GROUPS_WANTED=" ${GPU_BENCH_STAGES:-bf16 serve cmdbuf fp32} "
want() { [[ "$GROUPS_WANTED" == *" $1 "* ]]; }

# run_stage NAME CAP ENV_XLA_FLAGS CMD...: runs CMD under timeout (min(CAP, time left)) with
# XLA_FLAGS set, its output in the log and in $WORK/NAME.out; sets STAGE_STATUS.
run_stage() {
  local name=$1 cap=$2 flags=$3
  shift 3
  local now left limit rc t1
  now=$(date +%s)
  left=$((DEADLINE - now))
  limit=$((cap < left ? cap : left))
  : >"$WORK/$name.out"
  if [ "$limit" -lt 15 ]; then
    STAGE_STATUS="skipped (no time left in the ${BUDGET} s budget)"
    STATUS+=("$name|$STAGE_STATUS|0")
    log "$name: $STAGE_STATUS"
    return
  fi
  log "$name: XLA_FLAGS='$flags' timeout ${limit}s: $*"
  echo "===== $name: XLA_FLAGS='$flags' $*" >>"$LOG"
  XLA_FLAGS=$flags timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" >"$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s)
  if [ "$rc" = 0 ]; then
    STAGE_STATUS=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    STAGE_STATUS="TIMED OUT after ${limit} s (rows measured before it are kept)"
  elif grep -q -E "Unknown flag in XLA_FLAGS|Illegal value for --xla" "$WORK/$name.out"; then
    STAGE_STATUS="FAILED: this XLA rejects the flag (rc $rc)"
  else
    STAGE_STATUS="FAILED (rc $rc): $(grep -v '^\s*$' "$WORK/$name.out" | tail -1 | cut -c1-200)"
  fi
  STATUS+=("$name|$STAGE_STATUS|$((t1 - now))")
  log "$name: $STAGE_STATUS ($((t1 - now)) s)"
}

# the markdown of one output: comment lines (# ...), [serve] lines, table lines, the result line
table_of() { grep -E '^(# |\[serve\] |\||real-time sessions:)' "$1" || true; }

section() {  # section TITLE NAME COMMAND-TEXT
  { echo; echo "## $1"; echo; echo "\`$3\`"; echo; echo "status: $STAGE_STATUS"; echo
    table_of "$WORK/$2.out"; } >>"$MD"
}

STREAM=("$PY" bench/streaming.py --config "$CONFIG" --reps "$REPS" --warmup "$WARM" "${PEAK[@]}")

# 1. the issue's rows in bf16 (the goal rows first)
if want bf16; then
  cmd=("${STREAM[@]}" --codec "$CODEC" --modes cfg8,arc4 --batch "$BATCH" --dtypes bfloat16)
  run_stage streaming-bf16 "$CAP_BF16" "$BASE_XLA_FLAGS" "${cmd[@]}"
  section "streaming, bf16: DiT alone and end to end (issue 17 rows)" streaming-bf16 "${cmd[*]}"
fi

# 2. concurrent real-time sessions at $CONFIG scale
if want serve; then
  cmd=("$PY" bench/serve.py --config "$CONFIG" --mode text --steps 8 --cfg-scale 3
       --dtype bfloat16 "${SERVE[@]}" --shared-pool)
  run_stage serve "$CAP_SERVE" "$BASE_XLA_FLAGS" "${cmd[@]}"
  section "serving: concurrent real-time text sessions" serve "${cmd[*]}"
  if ! grep -q -E '^real-time sessions:' "$WORK/serve.out"; then  # cut short: the largest
    n=$(grep -E '^\| [0-9]+ \|' "$WORK/serve.out" |               # count whose row is real time
        awk -F'|' '$11 ~ /yes/ {n=$2} END {print n+0}')
    echo "real-time sessions (rows so far): $n" >>"$MD"
  fi
fi

# 3. XLA command-buffer variants of the batch-1 cfg8 DiT row (bf16 on a GPU): the step loop as
# fori_loop (sampling.Stream) and, where command buffers can capture it, unrolled
VARIANTS=(  # label|loops|flag
  "default|fori,unroll|"
  "off|fori|--xla_gpu_enable_command_buffer="
  "while-cond|fori,unroll|--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
  "graph-min-1|fori|--xla_gpu_graph_min_graph_size=1"
  "attention-$ATTN_VARIANT|fori|"  # $LMDM_ATTENTION=cudnn: cuDNN's fused attention (nn/attention.py)
)
cmd=("${STREAM[@]}" --codec none --modes cfg8 --batch 1 --dtypes "$VDTYPE")
want cmdbuf || VARIANTS=()
[ "${#VARIANTS[@]}" = 0 ] || {
  echo; echo "## XLA command-buffer variants: cfg8, batch 1, $VDTYPE, DiT alone"; echo
  echo "\`XLA_FLAGS=<variant> ${cmd[*]} --loops <loops>\`"; echo
  echo "| variant | XLA_FLAGS | status | loop | DiT ms/block | DiT x RT | DiT % peak |"
  echo "|---|---|---|---|---|---|---|"; } >>"$MD"
for v in "${VARIANTS[@]}"; do
  IFS='|' read -r label loops flag <<<"$v"
  cap=$CAP_VARIANT
  [ "$loops" = fori ] || cap=$CAP_VARIANT_UNROLL
  attn=xla
  [ "$label" = "attention-$ATTN_VARIANT" ] && attn=$ATTN_VARIANT
  run_stage "cmdbuf-$label" "$cap" "$BASE_XLA_FLAGS${flag:+ $flag}" \
    env LMDM_ATTENTION="$attn" "${cmd[@]}" --loops "$loops"
  rows=$(grep -E '^\| cfg8 ' "$WORK/cmdbuf-$label.out" || true)
  if [ -z "$rows" ]; then
    echo "| $label | \`$flag\` | $STAGE_STATUS | - | - | - | - |" >>"$MD"
  else  # mode steps CFG batch dtype loop ms xRT %peak ...: keep loop, ms, x RT, % peak
    echo "$rows" | awk -F'|' -v l="$label" -v f="$flag" -v s="$STAGE_STATUS" \
      '{printf "| %s | `%s` | %s |%s|%s|%s|%s|\n", l, f, s, $7, $8, $9, $10}' >>"$MD"
  fi
done

# 4. the same rows in float32
if want fp32; then
  cmd=("${STREAM[@]}" --codec "$CODEC" --modes cfg8,arc4 --batch "$BATCH" --dtypes float32)
  run_stage streaming-fp32 "$CAP_FP32" "$BASE_XLA_FLAGS" "${cmd[@]}"
  section "streaming, fp32: DiT alone and end to end" streaming-fp32 "${cmd[*]}"
fi

# ------------------------------------------------------------------------------------ summary
{
  echo
  echo "## stages"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---|"
  for s in "${STATUS[@]}"; do
    IFS='|' read -r a b c <<<"$s"
    echo "| $a | $b | $c |"
  done
  echo
  echo "total: $(($(date +%s) - T0)) s"
} >>"$MD"
# what comes back from a device run is at most 16 MiB a file
if [ "$(wc -c <"$LOG")" -gt 15000000 ]; then
  tail -c 15000000 "$LOG" >"$WORK/log.tail" && mv "$WORK/log.tail" "$LOG"
fi
log "done in $(($(date +%s) - T0)) s: $MD"
cat "$MD"
