"""DeepSpeed ZeRO: the student's weights, gradients and optimizer state sharded over the ranks that a
launcher started (`deepspeed`, `torchrun`, `accelerate launch`, `srun`, Ray Train workers), gloo on CPU,
nccl on GPUs.

- Student: ``deepspeed.initialize`` with the method's own torch optimizer (the same one the single
  backend builds, so results match), or, with optimizer offload, DeepSpeed's optimizer built from the
  method's settings (offload needs DeepSpeed's CPU Adam).
- Teacher: frozen, eval mode, no gradients, never given an optimizer. Under ZeRO-3 it is sharded too
  (its own ``deepspeed.initialize`` with a ZeRO-3 config and no optimizer); otherwise a replicated
  copy in the compute dtype.
- Under ZeRO-3, models loaded inside ``init_context()`` are partitioned while they load
  (``HfDeepSpeedConfig`` makes ``from_pretrained`` use ``deepspeed.zero.Init``): no rank ever holds the
  whole model.
- Steps: ``backward`` per micro-batch, ``step`` once per global batch; DeepSpeed's accumulation
  boundary is every ``accum`` micro-batches, and every step has exactly that many on every rank
  (base.py), so a boundary never straddles a phase change.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch

from engine.backends.base import Backend
from engine.backends.memory import StateMeter
from engine.config.deepspeed import build_ds_config
from engine.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK as torch's env:// needs them: from the launcher (deepspeed, torchrun,
    accelerate launch, launchers/slurm_deepspeed.sbatch), from Open MPI's variables, or, started plainly, a
    world of one on loopback. A bare `srun` sets none of them: refused, or every task would run alone into
    one output; so is `accelerate launch --cpu` asked for several processes (it starts one)."""
    env = os.environ
    if "RANK" in env:
        return
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        if "MASTER_ADDR" not in env:
            raise ConfigError(
                "started by mpirun: export MASTER_ADDR (the first host) and MASTER_PORT to every rank"
            )
        env.update(
            RANK=env["OMPI_COMM_WORLD_RANK"],
            WORLD_SIZE=env["OMPI_COMM_WORLD_SIZE"],
            LOCAL_RANK=env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
        )
        env.setdefault("MASTER_PORT", "29500")
        return
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        # accelerate's plain launcher (`--cpu`, a CPU config, or no --multi_gpu on a machine without GPUs)
        # sets these two, and MASTER_ADDR only when asked for several processes or machines; it starts ONE
        # process itself (more only under mpirun, whose Open MPI variables are read above), so this would
        # silently be a world of one
        raise ConfigError(
            "started by `accelerate launch --cpu` (or without --multi_gpu on a machine without GPUs) for "
            "several processes: it starts one process (several only under mpirun); use `accelerate launch "
            "--multi_gpu --num_processes N`, which starts them through torchrun, on CPU too"
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        raise ConfigError(
            "started as one of several Slurm tasks without RANK/WORLD_SIZE: use launchers/slurm_deepspeed.sbatch "
            "(it sets them for each task) or torchrun/deepspeed inside the allocation"
        )
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))


def _accelerate_settings(cfg, ds: dict) -> None:
    """`accelerate launch` hands its DeepSpeed and precision options (flags or its config file) to an
    Accelerator through ACCELERATE_* variables; the engine has no Accelerator and reads backend.* instead.
    Refuse any that disagree with the run's rather than silently run another ZeRO stage or precision."""
    ours = {  # variable: (backend key, the run's value as accelerate writes it)
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("zero_stage", str(ds["zero_optimization"]["stage"])),
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("offload_optimizer", cfg.offload_optimizer),
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("offload_param", cfg.offload_param),
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (
            "gradient_accumulation_steps",
            str(cfg.gradient_accumulation_steps),
        ),
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": ("deepspeed_config", str(Path(cfg.deepspeed_config).resolve())),
        # accelerate writes "no" when not told otherwise: only a precision it was given can disagree
        "ACCELERATE_MIXED_PRECISION": ("dtype", {"fp32": "no"}.get(cfg.dtype, cfg.dtype)),
    }
    wrong = []
    for var, (key, value) in ours.items():
        theirs = os.environ.get(var, "none")
        if var == "ACCELERATE_DEEPSPEED_CONFIG_FILE" and theirs != "none":
            theirs = str(Path(theirs).resolve())
        if theirs not in ("none", "no", value):
            wrong.append(f"{var}={os.environ[var]} (backend.{key}={value})")
    if wrong:
        raise ConfigError(
            "accelerate launch's DeepSpeed and precision options are not read by the engine, and these "
            f"differ from the run's: {', '.join(wrong)}; set the backend.* keys instead (and drop accelerate's)"
        )


def ds_optimizer(settings) -> dict:
    """DeepSpeed's own optimizer for offload, from the method's settings (same update rule)."""
    if settings.optimizer == "sgd":
        raise ConfigError(
            "optimizer offload runs DeepSpeed's CPU Adam: use method.optimizer=adam or adamw, or turn offload off"
        )
    return {
        "type": "Adam",
        "params": {
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "adam_w_mode": settings.optimizer == "adamw",  # adam: coupled L2 as torch.optim.Adam
        },
    }


def init_process_group(cfg) -> None:
    """Join the launcher's process group (a world of one when started plainly) through DeepSpeed's comm layer,
    which adopts one that exists already (Ray Train's, or `unlearn request process`'s, made here before its job)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed 0.19 calls collectives torch 2.13 deprecated: one warning per call, every step, every rank
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings(
            "ignore", message=f".*torch.distributed.{name}.* is deprecated", category=FutureWarning
        )
    backend = (
        cfg.dist_backend if cfg.dist_backend != "auto" else "nccl" if torch.cuda.is_available() else "gloo"
    )
    _accelerate_settings(cfg, build_ds_config(cfg, world_size=1))  # before any rank waits for another
    if not dist.is_initialized():
        _launcher_env()
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=timedelta(seconds=cfg.timeout_s),
        verbose=False,
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg):
        import torch.distributed as dist

        init_process_group(cfg)
        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.accum = cfg.gradient_accumulation_steps
        self.config = build_ds_config(cfg, self.world_size)
        self.zero_stage = self.config["zero_optimization"]["stage"]
        self.dtype = DTYPES[cfg.dtype]
        self.keep_checkpoints = cfg.keep_checkpoints
        if cfg.sync_batchnorm and not torch.cuda.is_available():
            raise ConfigError(
                "backend.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm runs on CUDA); on CPU each rank "
                "keeps its own BatchNorm statistics: leave it false"
            )
        self.sync_batchnorm = cfg.sync_batchnorm
        self.engine = None
        self._hf_config = None
        self._micro = 0

    def init_context(self):
        """Under ZeRO-3, ``from_pretrained`` / ``from_config`` inside partition the weights as they load."""
        if self.zero_stage == 3 and self._hf_config is None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(self.config)  # kept alive: transformers holds a weak ref
        return nullcontext()

    def prepare(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        build_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    ):
        import deepspeed

        if self.sync_batchnorm:  # statistics over the global batch (NCCL); same state-dict keys, same export
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        params = [p for p in student.parameters() if p.requires_grad]
        config = dict(self.config)
        if "offload_optimizer" in config["zero_optimization"]:
            config["optimizer"] = ds_optimizer(build_optimizer.__self__)  # the method's OptimizerSettings
            optimizer = None
        else:
            optimizer = build_optimizer(params)
        self.engine, opt, _, _ = deepspeed.initialize(
            model=student,
            optimizer=optimizer,
            model_parameters=params if optimizer is None else None,
            config=config,
        )
        self.meter = StateMeter(self.engine.module, opt, partitioned=self.zero_stage == 3)
        if teacher is not None:
            teacher = self.prepare_frozen(teacher)
        return self.engine, teacher

    def prepare_frozen(self, model: torch.nn.Module):
        """A model that is only ever run forward: no gradients, no optimizer, eval mode; sharded under ZeRO-3."""
        model.requires_grad_(False)
        if self.zero_stage != 3:
            return model.to(self.device, dtype=self.dtype if self.dtype != torch.float32 else None).eval()
        import deepspeed

        config = copy.deepcopy(self.config)
        for key in ("offload_optimizer",):
            config["zero_optimization"].pop(key, None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None, unlike nn.Module.eval
        return engine

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loop's loss is already a part of the GLOBAL mean,
        # so scale by the world size to make the average a sum, and don't divide by accumulation steps.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self._micro += 1
        if self._micro % self.accum:
            self.engine.step()  # inside the accumulation window: DeepSpeed only counts the micro-step

    def step(self) -> None:
        self.engine.step()  # the accumulation boundary: reduce, update, zero the gradients

    def reset_optimizer(self) -> None:
        """Clear the optimizer's per-parameter state (Adam's moments), as the single backend does. Under ZeRO
        the torch optimizer (or DeepSpeed's CPU Adam) runs over this rank's fp32 partitions, one wrapper down;
        both build their state afresh at the next step when it is empty."""
        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO 1-3 wrap the base optimizer
        inner.state.clear()

    def sum_across_ranks(self, value: float | list[float]) -> float | list[float]:
        t = torch.tensor(
            value if isinstance(value, list) else [value], dtype=torch.float64, device=self.device
        )
        self.dist.all_reduce(t)
        return t.tolist() if isinstance(value, list) else float(t[0])

    # --- whole-model views and checkpoints ---------------------------------------------------------

    def unwrap(self, model):
        """The Hugging Face module inside an engine (with ZeRO-3's gathering hooks installed)."""
        return getattr(model, "module", model)

    def full_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """Under ZeRO-3 the weights gathered layer by layer onto the main rank (collective: every rank
        calls it); elsewhere None, meaning the module's own weights (every rank holds them whole)."""
        if self.zero_stage != 3:
            return None
        state = model._zero3_consolidated_16bit_state_dict()  # what engine.save_16bit_model writes
        return state if self.is_main else None

    def save_checkpoint(self, folder: Path, tag: str, student, client_state: dict) -> None:
        """A DeepSpeed checkpoint of every rank's shards into ``folder/tag`` (collective; the store adds
        the RNG states and, once every rank has written, the manifest)."""
        student.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)

    def load_checkpoint(self, folder: Path, tag: str, student, weights_only: bool = False) -> dict:
        """Load ``folder/tag`` (verified by the store first): every rank its shards; ``weights_only``:
        the module's weights, not the optimizer state (a fresh optimizer)."""
        _, client_state = student.load_checkpoint(
            str(folder),
            tag=tag,
            load_module_only=weights_only,
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
        )
        return client_state or {}

    def memory_report(self) -> list[dict]:
        return self.gather_object(self.meter.report(self.rank, self.device))

    def broadcast_object(self, obj):
        """The main rank's ``obj`` on every rank."""
        box = [obj if self.is_main else None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group (without it, exit waits seconds in native teardown)."""
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()

    def gather_object(self, obj) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()
