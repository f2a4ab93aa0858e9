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
from engine.artifacts.receipt import sha256_file
from engine.backends import build_backend
from engine.config import RunConfig, check
from engine.data.selection import ids_sha256, read_ids_file
from engine.io import write_text_atomic
from engine.recipes import launch
from engine.requests.chain import chain_section
from engine.requests.ledger import Ledger, LedgerError, version_name


def ledger_path(cfg: RunConfig) -> Path:
    return Path(cfg.ledger.path) if cfg.ledger.path else Path(cfg.output_dir) / "ledger.sqlite"


def sorted_ids(ids) -> list:
    return sorted(ids, key=lambda v: (isinstance(v, str), v))


def add_request(cfg: RunConfig, ids_file: str, note: str | None = None, log=print) -> int:
    ids = read_ids_file(ids_file, "--ids")
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
                      "retain_ids": None, "retain_ids_file": None, "earlier_ids": sorted_ids(earlier)}  # fmt: skip
    if retrain:
        t = cfg.train
        data["method"] = {"name": "retrain", "epochs": t.epochs, "lr": t.lr, "lr_decay_epochs": t.lr_decay_epochs,
                          "batch_size": t.batch_size}  # fmt: skip
    return RunConfig.model_validate(data)


def audit_drift(report_path: Path) -> dict:
    """How far an unlearned version's error on every example forgotten so far is from the error unseen examples
    of the same classes have (engine/eval/metrics.py ``forgotten_scores``), in points."""
    m = json.loads(report_path.read_text())["metrics"]
    error, reference = m.get("forgotten_error", m["forget_error"]), m.get("forgotten_val_error")
    if reference is None:
        raise LedgerError(
            f"{report_path} has no forgotten_val_error: ledger.retrain_bound needs task=image_classification"
        )
    return {"forgotten_error": error, "forgotten_val_error": reference, "drift": abs(error - reference)}


def make_version(cfg: RunConfig, name: str, input_model: str, batch: list, earlier: list, log=print) -> tuple:
    """Run the job(s) of version ``name`` on every rank (each skipped when its folder is complete: a rerun after a
    crash resumes); returns the finished job folder, how it was made and why (the ``policy`` of the chain)."""
    number, jobs = int(name[1:]), Path(cfg.output_dir) / ".jobs"
    every, bound = cfg.ledger.retrain_every, cfg.ledger.retrain_bound
    if every and number % every == 0:
        policy = {"reason": "retrain_every", "every": every}
        source = jobs / name
        if not source.exists():
            launch("run", job_config(cfg, source, input_model, batch, earlier, retrain=True))
        return source, "retrain", policy
    candidate = jobs / name
    if not candidate.exists():  # else: the job completed before a crash
        launch("run", job_config(cfg, candidate, input_model, batch, earlier, retrain=False))
    if bound is None:
        return candidate, "unlearn", None
    drift = audit_drift(candidate / "report.json")
    policy = {"reason": None, "bound": bound, "candidate": drift}
    if drift["drift"] <= bound:
        return candidate, "unlearn", policy
    log(f"{name}: the unlearned candidate's forgotten error {drift['forgotten_error']:.2f} is {drift['drift']:.2f} "
        f"points from unseen data's {drift['forgotten_val_error']:.2f} (bound {bound}): retraining instead")  # fmt: skip
    source = jobs / f"{name}-retrain"
    if not source.exists():
        launch("run", job_config(cfg, source, input_model, batch, earlier, retrain=True))
    return source, "retrain", {**policy, "reason": "retrain_bound"}


def release_requests(cfg: RunConfig, log=print) -> list[int]:
    """Put the running requests back to pending (after their job failed with an error a rerun would repeat) and
    delete the unpublished job folders of their version, so the next `process` starts them afresh with whatever
    else is pending. A version already published is never touched."""
    import shutil

    ledger = Ledger(ledger_path(cfg))
    try:
        running = ledger.requests("running")
        if running and (Path(cfg.output_dir) / running[0]["version"]).exists():
            raise LedgerError(f"{running[0]['version']} is published but not yet recorded: run `unlearn request "
                              "process` to record it")  # fmt: skip
        name, ids = ledger.release()
    finally:
        ledger.close()
    if name is None:
        log("no running requests")
        return []
    jobs = Path(cfg.output_dir) / ".jobs"
    for stale in sorted(jobs.glob(f"{name}*")) if jobs.is_dir() else []:
        if stale.name.split(".")[0] in (name, f"{name}-retrain"):
            shutil.rmtree(stale, ignore_errors=True)
    log(f"released requests {', '.join(map(str, ids))} (were {name}): pending again")
    return ids


def process_requests(cfg: RunConfig, log=print) -> Path | None:
    """Serve every pending request with one new version; the published version folder (None: nothing pending).

    Under a multi-process launcher (deepspeed, torchrun, Slurm) with backend.name=deepspeed every rank calls this:
    the main rank claims the batch and tells the others (one broadcast), all run the version's job together, and
    the main rank alone publishes it."""
    check(cfg, "request")  # the config's refusals (engine/config/rules.py), before any work
    # several ranks agree on the batch through a backend of their launcher's group (each job's adopts it)
    backend = build_backend(cfg.backend) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    main = backend is None or backend.is_main
    folder = Path(cfg.output_dir)
    ledger = Ledger(ledger_path(cfg)) if main else None
    try:
        plan = claim_batch(ledger) if main else None
        if backend is not None:
            plan = backend.broadcast_object(plan)
        if plan is None:
            log("no pending requests")
            if backend is not None:
                backend.close()
            return None
        name, request_ids, batch, earlier = plan
        number = int(name[1:])
        cumulative = earlier + [i for i in batch if i not in set(earlier)]
        parent = version_name(number - 1) if number > 1 else "original"
        input_model = str(folder / parent / "model") if number > 1 else cfg.model.path
        final = folder / name
        log(
            f"{name}: {len(request_ids)} requests, {len(batch)} ids ({len(cumulative)} forgotten in all), from {parent}"
        )
        if not final.exists():
            source, made_by, policy = make_version(cfg, name, input_model, batch, earlier, log)
            if not main:
                return final
            faults.inject("request_after_job", number)
            receipt_path = source / "receipt.json"
            receipt = json.loads(receipt_path.read_text())
            previous = folder / parent / "receipt.json" if number > 1 else None
            receipt["chain"] = chain_section(name, parent, made_by, previous, batch, cumulative, policy)
            write_text_atomic(receipt_path, json.dumps(receipt, indent=2))
            os.replace(source, final)
        if not main:
            return final
        faults.inject("request_during_publish", number)
        made_by = json.loads((final / "receipt.json").read_text())["chain"]["made_by"]
        ledger.publish(name, parent=parent, made_by=made_by, forget_hash_batch=ids_sha256(batch),
                       forget_hash_cumulative=ids_sha256(cumulative),
                       receipt_sha256=sha256_file(final / "receipt.json"), folder=str(final))  # fmt: skip
    finally:
        if ledger is not None:
            ledger.close()
    discard_jobs(folder / ".jobs", name)
    log(f"published {final} ({made_by}): requests {', '.join(map(str, request_ids))} done")
    return final


def claim_batch(ledger: Ledger) -> tuple | None:
    """(version name, request numbers, this batch's ids, every id forgotten before) of the next version."""
    claim = ledger.claim()
    if claim is None:
        return None
    name, batch_requests = claim
    batch = list(dict.fromkeys(i for r in batch_requests for i in r["ids"]))
    return name, [r["id"] for r in batch_requests], batch, ledger.forgotten_ids()


def discard_jobs(jobs: Path, name: str) -> None:
    """A published version's leftovers: an unlearned candidate the drift bound replaced."""
    import shutil

    for leftover in (jobs / name, jobs / f"{name}-retrain"):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
