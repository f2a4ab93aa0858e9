#!/usr/bin/env bash
# The prepared script for a lent GPU machine (one NVIDIA H100/H200, torch + transformers there, no package
# index): run it through the device tool as
#   bash benchmarks/gpu_session.sh          with carry: [".whl"], timeout_s 560   (results under $OUT)
# .whl/ (git-ignored) holds the wheels the machine lacks (deepspeed and what it imports, peft, accelerate;
# how they were made: benchmarks/README.md, "gpu_session.sh").
# Parts, in this order: switches (gpu_scrub_throughput.py --config switches), lora_memory
# (gpu_lora_memory.py), sync_batchnorm (backend.sync_batchnorm on CUDA: SyncBatchNorm layers and a training
# step), zero3 (gpu_scrub_throughput.py --config zero3), switches_nockpt (switches without gradient
# checkpointing). Each runs under a wall-clock guard (`timeout`: SIGINT, then SIGKILL 15 s later) within one
# deadline for the whole session (SESSION_SECONDS, default 450 s; a part that cannot get 30 s is skipped) and
# writes its results as it goes; $OUT/parts.tsv says how each part ended (rc 124/137: cut by its guard),
# $OUT/summary.md gathers the tables. SESSION_QUICK=1 runs the same script on CPU with --quick (no wheels, no
# sync_batchnorm: CUDA only); PARTS="lora_memory zero3" (say) runs only those parts (a rerun of what a first
# run did not finish).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
DEADLINE=${SESSION_SECONDS:-450}
QUICK=()
[[ -n "${SESSION_QUICK:-}" ]] && QUICK=(--quick)
PY=${PYTHON:-python3}
PARTS=${PARTS:-switches lora_memory sync_batchnorm zero3 switches_nockpt}  # a rerun may name fewer
mkdir -p "$OUT"
T0=$(date +%s)
printf 'part\trc\tseconds\tguard\n' >"$OUT/parts.tsv"

# begin NAME WANT: GUARD = WANT seconds, capped by what is left of the deadline; false (the part recorded as
# skipped) when under 30 s are left
begin() {
    [[ " install $PARTS " == *" $1 "* ]] || return 1  # not asked for (PARTS)
    local left=$((DEADLINE - ($(date +%s) - T0)))
    GUARD=$2
    ((GUARD > left)) && GUARD=$left
    if ((left < 30)); then
        printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$OUT/parts.tsv"
        echo "=== $1: skipped ($left s left of the ${DEADLINE} s deadline)"
        return 1
    fi
    echo "=== $1 (guard ${GUARD} s, $left s left)"
}

# guarded NAME COMMAND...: COMMAND under `timeout $GUARD`, its output to $OUT/NAME.log, its end in parts.tsv
guarded() {
    local name=$1 start rc=0
    shift
    start=$(date +%s)
    # SIGINT first: Python unwinds (finally blocks run, e.g. torch's JIT-build lock is released), then KILL
    timeout -s INT -k 15 "$GUARD" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" "$GUARD" >>"$OUT/parts.tsv"
    echo "=== $name: rc $rc in $(($(date +%s) - start)) s"
}

if [[ -z "${SESSION_QUICK:-}" ]]; then
    begin install 90 && guarded install python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
export PYTHONUNBUFFERED=1
timeout -s INT -k 10 90 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"  # what the parts will import, versions
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "pydantic", "safetensors",
             "huggingface_hub", "tqdm", "yaml", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING:", type(exc).__name__, str(exc)[:200])
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
PYEOF

# each benchmark gets its guard minus a margin as --max-seconds: it starts no mode it could not finish
begin switches 120 && guarded switches "$PY" -m benchmarks.gpu_scrub_throughput --config switches \
    --out "$OUT/switches" --max-seconds $((GUARD - 25)) "${QUICK[@]}"
begin lora_memory 120 && guarded lora_memory "$PY" -m benchmarks.gpu_lora_memory --out "$OUT/lora_memory" \
    --max-seconds $((GUARD - 45)) "${QUICK[@]}"

cat >/tmp/sync_batchnorm_check.py <<'PYEOF'
import torch

from engine.backends.deepspeed import DeepSpeedBackend
from engine.config import BackendConfig
from engine.models.vision import build_vision_model

backend = DeepSpeedBackend(BackendConfig(name="deepspeed", zero_stage=2, sync_batchnorm=True,
                                         deepspeed_config="configs/deepspeed/zero2.json"))
model = build_vision_model("preact_resnet18", num_labels=10, width=0.25)
engine, _ = backend.prepare(model, None, lambda params: torch.optim.SGD(params, lr=0.1))
x = torch.randn(16, 3, 32, 32, device=backend.device)
loss = engine(pixel_values=x).logits.float().logsumexp(-1).mean()
backend.backward(loss)
backend.step()
sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in engine.module.modules())
plain = sum(type(m) is torch.nn.BatchNorm2d for m in engine.module.modules())
print(f"sync_batchnorm on {torch.cuda.get_device_name()}: {sync} SyncBatchNorm layers, {plain} plain BatchNorm2d; "
      f"step loss {float(loss):.4f} finite={bool(torch.isfinite(loss))}")
assert sync > 0 and plain == 0 and torch.isfinite(loss)
backend.close()
PYEOF
[[ -z "${SESSION_QUICK:-}" ]] && begin sync_batchnorm 90 && guarded sync_batchnorm env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" /tmp/sync_batchnorm_check.py

begin zero3 120 && guarded zero3 "$PY" -m benchmarks.gpu_scrub_throughput --config zero3 --out "$OUT/zero3" \
    --max-seconds $((GUARD - 30)) "${QUICK[@]}"
begin switches_nockpt 90 && guarded switches_nockpt "$PY" -m benchmarks.gpu_scrub_throughput --config switches \
    --gradient-checkpointing off --out "$OUT/switches_nockpt" --max-seconds $((GUARD - 25)) "${QUICK[@]}"

{
    echo "# GPU session $(date -u '+%Y-%m-%d %H:%M UTC'): $(cat "$OUT/gpu.txt" 2>/dev/null || echo no GPU)"
    echo
    echo '```'
    cat "$OUT/parts.tsv"
    echo '```'
    for d in switches lora_memory zero3 switches_nockpt; do
        if [[ -f "$OUT/$d/results.md" ]]; then
            echo
            cat "$OUT/$d/results.md"
        fi
    done
    echo
    tail -n 2 "$OUT/sync_batchnorm.log" 2>/dev/null
} >"$OUT/summary.md"
echo "=== done in $(($(date +%s) - T0)) s: $OUT/summary.md"
cat "$OUT/parts.tsv"
