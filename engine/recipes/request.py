"""`unlearn request add | list | process CONFIG`: deletion requests as a stream.

The versions live in ``output_dir``: ``v1``, ``v2``, ... each a completed `unlearn run` folder (model, report,
receipt), and the ledger (engine/requests/ledger.py) beside them in ``ledger.sqlite`` unless ``ledger.path`` says
elsewhere. ``process`` claims every pending request (pending -> running, naming the version they will make), runs
ONE job from the current version (``model.path`` for v1) with forget = this batch's ids and retain = the training
data minus every id ever forgotten (``forget.earlier_ids``), in ``output_dir/.jobs/vN`` (its own ``.partial``
staging and checkpoints), then publishes: the receipt gains its ``chain`` section (engine/requests/chain.py), the
job folder is renamed to ``vN``, and one ledger transaction records the version and marks its requests done. A
crash anywhere leaves the requests not done and no ``vN`` recorded; running ``process`` again finishes the job
(resuming from its checkpoints), publishes and records it. Every ``ledger.retrain_every``-th version is made by
retraining from scratch (method=retrain with the train section's recipe) on the same cumulative retain set.

Fault points (engine/faults.py, the version number as EPOCH): ``request_after_job`` (the job folder is complete,
nothing published), ``request_during_publish`` (``vN`` is in place, the ledger does not record it yet).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine import faults
from engine.checkpoint.receipt import sha256_file
from engine.config import RunConfig
from engine.data.selection import ids_sha256
from engine.errors import ConfigError
from engine.eval.report import write_text_atomic
from engine.requests.chain import chain_section
from engine.requests.ledger import Ledger, LedgerError, version_name


def ledger_path(cfg: RunConfig) -> Path:
    return Path(cfg.ledger.path) if cfg.ledger.path else Path(cfg.output_dir) / "ledger.sqlite"


def sorted_ids(ids) -> list:
    return sorted(ids, key=lambda v: (isinstance(v, str), v))


def add_request(cfg: RunConfig, ids_file: str, note: str | None = None, log=print) -> int:
    from engine.data.vision import _read_ids_file

    ids = _read_ids_file(ids_file, "--ids")
    ledger = Ledger(ledger_path(cfg))
    try:
        done = set(ledger.forgotten_ids())
        again = [i for i in ids if i in done]
        if again:
            raise LedgerError(f"{len(again)} ids are already forgotten by a published version, e.g. {again[:5]}; "
                              "drop them from the request")  # fmt: skip
        number = ledger.add(ids, note)
    finally:
        ledger.close()
    log(
        f"request {number}: {len(ids)} ids (sha256 {ids_sha256(ids)[:16]}), pending; `unlearn request process` serves it"
    )
    return number


def list_requests(cfg: RunConfig) -> str:
    ledger = Ledger(ledger_path(cfg))
    try:
        requests, versions = ledger.requests(), ledger.versions()
    finally:
        ledger.close()
    lines = [f"ledger {ledger_path(cfg)}", "requests:"]
    for r in requests:
        note = f"  {r['note']}" if r["note"] else ""
        lines.append(
            f"  {r['id']:>4}  {r['state']:<8} {r['version'] or '-':<5} {len(r['ids']):>6} ids  {r['created']}{note}"
        )
    if not requests:
        lines.append("  (none)")
    lines.append("versions:")
    for v in versions:
        lines.append(f"  {v['name']:<5} from {v['parent']:<8} {v['made_by']:<8} {v['created']}  "
                     f"cumulative {v['forget_hash_cumulative'][:16]}  {v['folder']}")  # fmt: skip
    if not versions:
        lines.append("  (none)")
    return "\n".join(lines)


def job_config(
    cfg: RunConfig, out: Path, input_model: str, batch: list, earlier: list, retrain: bool
) -> RunConfig:
    """The one job of a version: forget = this batch, retain = training data minus every id ever forgotten."""
    data = cfg.model_dump(mode="json")
    data.update(output_dir=str(out), overwrite=False)
    if input_model != cfg.model.path:
        data["model"] = {**data["model"], "path": input_model, "revision": None}
    data["forget"] = {**data["forget"], "kind": "ids", "ids": sorted_ids(batch), "ids_file": None,
                      "retain_ids": None, "retain_ids_file": None, "earlier_ids": sorted_ids(earlier) or None}  # fmt: skip
    if retrain:
        t = cfg.train
        data["method"] = {"name": "retrain", "epochs": t.epochs, "lr": t.lr, "lr_decay_epochs": t.lr_decay_epochs,
                          "batch_size": t.batch_size}  # fmt: skip
    return RunConfig.model_validate(data)


def run_job(job: RunConfig) -> None:
    """One `unlearn run` of the job config, on its backend (in this process, or as a Ray Train job)."""
    from engine.recipes import recipe_for

    recipe = recipe_for("run", job)
    if job.backend.name == "ray":
        from engine.launchers.ray_train import run_on_ray

        run_on_ray(job, recipe)
    else:
        recipe.run(job)


def process_requests(cfg: RunConfig, log=print) -> Path | None:
    """Serve every pending request with one new version; the published version folder (None: nothing pending)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`unlearn request process` runs as one process: it starts its job on backend.name "
                          "(ray for several workers), not under a multi-process launcher")  # fmt: skip
    if cfg.model.path is None:
        raise ConfigError(
            "`unlearn request process` needs model.path: the Original the first version unlearns"
        )
    folder = Path(cfg.output_dir)
    ledger = Ledger(ledger_path(cfg))
    try:
        claim = ledger.claim()
        if claim is None:
            log("no pending requests")
            return None
        name, batch_requests = claim
        number = int(name[1:])
        batch = list(dict.fromkeys(i for r in batch_requests for i in r["ids"]))
        earlier = ledger.forgotten_ids()
        cumulative = earlier + [i for i in batch if i not in set(earlier)]
        parent = version_name(number - 1) if number > 1 else "original"
        input_model = str(folder / parent / "model") if number > 1 else cfg.model.path
        retrain = bool(cfg.ledger.retrain_every) and number % cfg.ledger.retrain_every == 0
        made_by = "retrain" if retrain else "unlearn"
        job_out, final = folder / ".jobs" / name, folder / name
        log(f"{name}: {len(batch_requests)} requests, {len(batch)} ids ({len(cumulative)} forgotten in all), "
            f"{made_by} from {parent}")  # fmt: skip
        if not final.exists():
            if not job_out.exists():  # else: the job completed before a crash
                run_job(job_config(cfg, job_out, input_model, batch, earlier, retrain))
            faults.inject("request_after_job", number)
            receipt_path = job_out / "receipt.json"
            receipt = json.loads(receipt_path.read_text())
            previous = folder / parent / "receipt.json" if number > 1 else None
            receipt["chain"] = chain_section(name, parent, made_by, previous, batch, cumulative)
            write_text_atomic(receipt_path, json.dumps(receipt, indent=2))
            os.replace(job_out, final)
        faults.inject("request_during_publish", number)
        ledger.publish(name, parent=parent, made_by=made_by, forget_hash_batch=ids_sha256(batch),
                       forget_hash_cumulative=ids_sha256(cumulative),
                       receipt_sha256=sha256_file(final / "receipt.json"), folder=str(final))  # fmt: skip
    finally:
        ledger.close()
    log(f"published {final}: requests {', '.join(str(r['id']) for r in batch_requests)} done")
    return final
