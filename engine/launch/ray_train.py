"""Ray: Ray Train workers run the one recipe, with the DeepSpeed backend inside each; the forget and retain
sets are tokenized once (in Ray Data when larger than a block) into token stores every worker reads its
own rows from.

- Driver (``run_on_ray``): joins a cluster (``backend.ray_address`` or RAY_ADDRESS) or starts an
  embedded local Ray on 127.0.0.1; writes the forget and retain sets, tokenized (in Ray Data above
  one block of rows), from the same Hugging Face ``datasets`` rows as the other backends, into token stores beside the output
  (``OUTPUT.tokens``, engine/data/store.py; removed when the run ends); runs a ``TorchTrainer`` of
  ``backend.num_workers`` workers with ``FailureConfig(max_failures)``.
- Worker (``_worker``): the process group is Ray Train's; the recipe the CLI chose for the command
  (engine/recipes/__init__.py) runs as under ``deepspeed``/``torchrun``; this module imports no recipe. Every step each worker reads from the stores exactly the rows the seeded
  per-epoch order gives it (backends/base.py decides; the rows of other workers are never read), and
  after each epoch's DeepSpeed checkpoint reports it through ``ray.train.report``.
- Failure: a restarted worker group runs the recipe again; it finds the last complete checkpoint
  (the one Ray Train recorded as reported) in ``OUTPUT.partial/checkpoints``, says so, and goes on.
  The output folder must be on storage every worker sees (one machine, or a shared filesystem).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from pathlib import Path

from engine.artifacts.run_folder import RunFolder

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray Train's print patch sends a worker's print() both to stdout and through its logger: every line of
# the engine's log reached the driver twice
WORKERS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# an embedded Ray: on loopback, no usage reporting, and no Ray Train preemption watcher (an actor process
# polling for node drains, which a one-machine Ray never has: a second or two of start-up on 2 cores)
EMBEDDED = {**LOOPBACK, **WORKERS, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars would interleave with the engine's own log in every worker."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def init_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS); without either, start an embedded Ray bound to 127.0.0.1."""
    import ray

    quiet_ray_data()

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # the cluster's processes do not inherit this one's environment: fault injection (UNLEARN_FAULT, for
        # tests and benchmarks/faults.py) is handed to the job's workers explicitly
        env = {**WORKERS, **{k: v for k, v in os.environ.items() if k.startswith("UNLEARN_")}}
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
        return
    for key, value in EMBEDDED.items():
        os.environ.setdefault(key, value)
    # No dashboard (1.5 s more start-up and a busy process on 2 cores); without it the State API that Ray
    # Train's placement-group cleaner polls every second is absent, and the hook quiets its warning
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": _no_state_api_warning})  # fmt: skip


def _no_state_api_warning() -> None:
    """In every process of an embedded Ray: drop the placement-group cleaner's once-a-second "Failed to query
    Ray Train Controller actor state. State API may be temporarily unavailable" (a dashboard-less Ray has no
    State API; the cleaner only matters when a driver dies and the Ray it started goes with it)."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        lambda record: "State API may be temporarily unavailable" not in record.getMessage()
    )


ROWS_PER_BLOCK = 4096


def write_stores(
    rows: dict[str, list[dict]], formatter, out: Path, rows_per_block: int = ROWS_PER_BLOCK
) -> dict:
    """The token stores of a run's forget and retain rows (``{name: rows}``: prompt/answer pairs or document
    windows, encoded by ``formatter.encode_row``) in ``OUTPUT.tokens``: ``{name: folder}``.

    A set of at most one block is tokenized here, in the driver: a Ray Data pipeline of one block would run
    the same encoding in a task process that imports torch and transformers first (4-6 s of a 2-core
    machine, benchmarks/ray_overhead.py). Larger sets go through Ray Data, in blocks of ``rows_per_block``
    rows tokenized in parallel over the cluster's CPUs."""
    from engine.data.store import write_rows

    stores = {}
    for name, part in rows.items():
        folder = RunFolder(out).tokens / name
        if len(part) <= rows_per_block:
            write_rows(folder, part, formatter.encode_row)
        else:
            tokenize_to_store(part, formatter, folder, rows_per_block)
        stores[name] = str(folder)
    return stores


def tokenize_to_store(
    rows: list[dict], formatter, folder: Path, rows_per_block: int = ROWS_PER_BLOCK
) -> Path:
    """Tokenize TOFU rows in Ray Data (prompt masked, as ``TextStream``) and write them into a token store
    (engine/data/store.py) in ``folder``, which every worker opens and reads its own rows from by index.

    The workers reading the store replace the per-epoch Ray Data ``filter`` they used to run, whose zero-CPU
    tasks started a fresh Python process per one-row block (40-60 of them per epoch on 2 cores, 60-115 s per
    epoch and stream: benchmarks/ray_overhead.py). Here blocks hold up to ``rows_per_block`` rows, and the
    tokenizing tasks take a CPU each, so at most one per CPU runs at once."""
    import ray.data

    from engine.data.store import encode_rows, write_token_store

    def encode(batch: dict) -> dict:
        return encode_rows(formatter.encode_row, batch["row"], [json.loads(r) for r in batch["row_json"]])

    # each row travels as JSON: a block's columns then need no common schema (pairs, windows of token ids)
    keep = ("question", "answer", "input_ids")
    items = [
        {"row": i, "row_json": json.dumps({k: r[k] for k in keep if k in r})} for i, r in enumerate(rows)
    ]
    blocks = max(1, -(-len(items) // rows_per_block))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(encode, batch_format="numpy")
    return write_token_store(folder, len(items), ds.iter_batches(batch_format="numpy"))


def run_on_ray(cfg, recipe, log=print, **kwargs) -> Path:
    """Run ``recipe`` (engine.recipes.Recipe: the command's one recipe, chosen by the CLI) in every worker of a
    Ray Train group, with the DeepSpeed backend inside each; ``kwargs`` go to the recipe."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from engine.artifacts.export import check_output_dir
    from engine.checkpoint.signals import StopRequest
    from engine.errors import PreemptedError
    from engine.tasks import task_class

    launched = time.time()
    check_output_dir(cfg.output_dir, cfg.overwrite)
    b = cfg.backend
    init_ray(b.ray_address)
    out = Path(cfg.output_dir).resolve()
    run = RunFolder(out)
    stores, pad_id = {}, None
    # a recipe that trains, on a task of text: its rows tokenized once, here, for every worker
    tokens = (
        task_class(cfg.task).token_rows(cfg)
        if "streams" in inspect.signature(recipe.run).parameters
        else None
    )
    if tokens is not None:
        formatter, rows = tokens
        stores, pad_id = write_stores(rows, formatter, out), formatter.tokenizer.pad_token_id
        log(f"{', '.join(f'{n} {len(part)} rows' for n, part in rows.items())}: tokenized into {run.tokens}")
    worker_cfg = cfg.model_copy(update={"backend": b.model_copy(update={"name": "deepspeed"})}, deep=True)
    storage = Path(b.storage_path).resolve() if b.storage_path else run.ray
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "cfg": worker_cfg.model_dump(mode="json"),
            "recipe": recipe,
            "kwargs": kwargs,
            "launched_at": launched,
            "stores": stores,
            "pad_id": pad_id,
            "cwd": os.getcwd(),
            "stop_file": str(run.stop_file),
        },  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if b.use_gpu else "gloo", timeout_s=b.timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=b.num_workers, use_gpu=b.use_gpu, resources_per_worker={"CPU": b.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=out.name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=b.max_failures),
        ),
    )
    run.stop_file.unlink(missing_ok=True)  # an earlier attempt's request
    # After ray.init (which may set a SIGTERM handler of its own): SIGTERM / `ray job stop` reaches the
    # workers through the stop file; they checkpoint at the next step and end without error
    try:
        with StopRequest(run.stop_file, write=True) as stop:
            result = trainer.fit()
    finally:  # tokenized forget rows are not left behind (forget-data hygiene); a rerun tokenizes again
        shutil.rmtree(run.tokens, ignore_errors=True)
    if result.error:
        raise result.error
    if stop() and not (out / "report.json").is_file():
        run.stop_file.unlink(missing_ok=True)
        raise PreemptedError(
            f"stopped by a signal; the workers wrote a checkpoint at their next step in "
            f"{run.checkpoints}: run the same command again to resume"
        )
    model = f"model in {out / 'model'}, " if (out / "model").is_dir() else ""
    log(f"done: {model}report in {out / 'report.md'}; Ray Train run in {storage / out.name}")
    return out


def _worker(config: dict) -> None:
    import ray.train

    from engine.backends.deepspeed import DeepSpeedBackend
    from engine.config import RunConfig
    from engine.data.store import TokenStore
    from engine.errors import PreemptedError

    quiet_ray_data()
    os.chdir(config["cwd"])  # relative paths of the config (configs/deepspeed/*.json, data) as on the driver
    cfg = RunConfig.model_validate(config["cfg"])
    backend = DeepSpeedBackend(cfg.backend)  # joins the process group Ray Train has set up
    streams = {name: TokenStore(folder, config["pad_id"]) for name, folder in config["stores"].items()}

    def report(epoch: int, folder: Path, row: dict) -> None:
        # every worker reports (Ray Train needs all of them); the main one names the checkpoint
        from ray.train import Checkpoint

        ckpt = None
        if backend.is_main:
            pointer = folder / f"ray_epoch_{epoch}"
            pointer.mkdir(exist_ok=True)
            (pointer / "deepspeed_checkpoint.txt").write_text(f"{folder}\nepoch_{epoch}\n")
            ckpt = Checkpoint.from_directory(str(pointer))
        metrics = {"epoch": epoch, **{k: v for k, v in row.items() if isinstance(v, (int, float))}}
        t = time.perf_counter()
        ray.train.report(metrics, checkpoint=ckpt)
        # this epoch's row of report.json's history (read by benchmarks/ray_overhead.py)
        if row.get("epoch") == epoch:
            row["ray_report_seconds"] = time.perf_counter() - t

    resumed = ray.train.get_checkpoint()
    hooks = {"backend": backend, "streams": streams or None, "on_checkpoint": report,
             "launched_at": config["launched_at"], "expect_resume": resumed is not None,
             "stop_file": Path(config["stop_file"])}  # fmt: skip
    run = config["recipe"].run
    accepted = inspect.signature(run).parameters  # an evaluation takes the backend only: it has no epochs
    try:
        run(cfg, **config["kwargs"], **{k: v for k, v in hooks.items() if k in accepted})
    except PreemptedError:
        # asked to stop, checkpoint written: end without error (an error would make Ray Train restart the
        # workers); the driver reports the stop
        backend.close()
