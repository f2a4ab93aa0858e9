#!/usr/bin/env bash
# The prepared script for a lent GPU machine (one NVIDIA H100/H200, torch + transformers there, no package
# index): run it through the device tool as
#   bash benchmarks/gpu_session.sh          with carry: [".whl"]   (results under $OUT)
# .whl/ (git-ignored) holds cp312 / py3 manylinux x86_64 wheels of what the machine lacks: deepspeed (built
# here with `DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation deepspeed==0.19.8`), hjson, pydantic,
# pydantic-core, annotated-types, typing-inspection (benchmarks/README.md, gpu_scrub_throughput.py).
# 1. gpu_scrub_throughput.py at its default size: tokens/s and peak memory of SCRUB's steps, the engine's
#    own backend, losses and forward, ZeRO-3 at world size 1;
# 2. backend.sync_batchnorm on CUDA: the paper's PreAct-ResNet18 prepared by the DeepSpeed backend has its
#    BatchNorm layers as SyncBatchNorm, and a training step runs (CPU runs refuse the setting).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/gpu_scrub_throughput.py --out "$OUT/throughput" 2>&1 | tee "$OUT/throughput.log"
python3 - <<'PY' 2>&1 | tee "$OUT/sync_batchnorm.log"
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
PY
