"""TOFU (Maini et al. 2024), the causal-LM preset: 200 fictitious authors of 20 question-answer pairs each, read
through `datasets` from a local copy laid out as the hub (one ``<split>.jsonl`` per split, e.g.
$UNLEARN_DATA_MIRROR/tofu) or the hub id ``locuslab/TOFU``. Every example keeps a stable id: its row index in the
``full`` split, so a forget request, a report or a receipt names examples, never their text. Rows are encoded as
any prompt/answer pair (engine/data/text.py: ``QAFormatter``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.data.selection import ids_sha256
from engine.data.text import earlier_keys, refuse_forgotten_again
from engine.errors import DataError, first_line

SPLIT_FRACTION = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
QA_PER_AUTHOR = 20  # TOFU: 200 fictitious authors, 20 question-answer pairs each
TOFU_AUTHORS = 200


def load_tofu_split(source: str, name: str) -> list[dict]:
    """One TOFU split as a list of rows: ``{source}/{name}.jsonl`` when ``source`` is a local folder,
    else ``datasets.load_dataset(source, name)`` (the hub's layout: one config per split); a hub id with a
    copy under ``UNLEARN_DATA_MIRROR`` reads the copy (engine/data/sources.py)."""
    from engine.data.sources import MIRROR, resolve

    source = resolve(source, "tofu.dataset")
    path = Path(source)
    try:
        if path.is_dir():
            file = path / f"{name}.jsonl"
            if not file.is_file():
                raise DataError(
                    f"TOFU split {name!r} not found: {file} does not exist (a local TOFU folder holds "
                    "full.jsonl, forget10.jsonl, retain90.jsonl, ...)"
                )
            # read directly, not through datasets.load_dataset: that would leave an Arrow copy of every
            # row (forget answers included) in the datasets cache after the run (forget-data hygiene)
            return _check_columns(_read_jsonl(file), name)
        elif path.exists():
            raise DataError(f"tofu.dataset {source!r} is a file; give the folder holding the split files")
        else:
            import datasets

            from engine.data.sources import hub_revision

            ds = datasets.load_dataset(source, name, split="train", revision=hub_revision(source))
    except DataError:
        raise
    except Exception as err:  # hub/network/format errors: say what was tried
        raise DataError(
            f"could not load TOFU split {name!r} from {source!r}: {first_line(err)}. "
            f"Offline, set {MIRROR} to a folder holding a copy ({MIRROR}/tofu, <split>.jsonl files)"
        ) from err
    return _check_columns(ds.to_list(), name)


def _read_jsonl(file: Path) -> list[dict]:
    rows = []
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{file}:{n} is not a JSON line ({err}); a TOFU split has one row per line"
                    ) from err
    return rows


IDK_FILE = "idontknow.jsonl"  # TOFU's "I don't know" answers, beside the splits: one plain-text answer a line


def read_answer_lines(file: str | Path) -> list[str]:
    """One answer a line (TOFU's ``idontknow.jsonl`` is plain text despite its suffix), blank lines skipped."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f'{file} does not exist: give a file of "I don\'t know" answers, one a line')
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_idk_answers(source: str) -> list[str]:
    """TOFU's "I don't know" answers: ``{source}/idontknow.jsonl`` when ``source`` (or its mirror copy) is a local
    folder, else that file of the hub dataset ``source``, at the revision the splits are read at."""
    from engine.data.sources import resolve

    source = resolve(source, "tofu.dataset")
    if Path(source).is_dir():
        return read_answer_lines(Path(source) / IDK_FILE)
    try:
        from huggingface_hub import hf_hub_download

        from engine.data.sources import hub_revision

        path = hf_hub_download(source, IDK_FILE, repo_type="dataset", revision=hub_revision(source))
    except Exception as err:
        raise DataError(
            f"could not read {IDK_FILE} of {source!r}: {first_line(err)}; set method.idk_file to a local copy"
        ) from err
    return read_answer_lines(path)


def _check_columns(rows: list[dict], name: str) -> list[dict]:
    if rows and not {"question", "answer"} <= set(rows[0]):
        raise DataError(f"TOFU split {name!r} lacks the question/answer columns (has {sorted(rows[0])})")
    return rows


@dataclass
class TofuData:
    """The TOFU sets of one run. ``forget``/``retain``/``full`` rows carry ``id`` (row in ``full``)."""

    forget_split: str
    num_authors: int
    forget_authors: int
    full: list[dict]
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    forget_eval: list[dict]  # forget rows + paraphrased/perturbed answers (truth ratio)
    retain_eval: list[dict]  # retain rows + paraphrased/perturbed answers (model utility)
    real_authors: list[dict]
    world_facts: list[dict]
    description: str = ""

    def forget_summary(self) -> dict:
        ids = [int(r["id"]) for r in self.forget]
        return {
            "kind": "tofu",
            "split": self.forget_split,
            "authors": self.forget_authors,
            "size": len(ids),
            "ids_sha256": ids_sha256(ids),
            "description": self.description,
        }


def prepare_tofu(cfg, fcfg=None) -> TofuData:
    """Resolve the forget/retain/holdout/utility sets of ``cfg`` (a ``TofuConfig``).

    ``num_authors`` = N keeps a CPU-sized slice with TOFU's own structure: the forget set is the
    first k = round(N * fraction) authors of the forget split (TOFU's last authors), the retain set the
    first N - k authors, the holdout (non-members) the first k authors of the matching holdout split.

    ``fcfg`` (a ``ForgetConfig``) with ``kind=ids``: the same N authors are the training data, and the forget
    set is the rows named by id (row indices of ``full``), the retain set every other row of them but those of
    ``forget.earlier_ids`` (forgotten by earlier versions: in neither set, nor in the model-utility rows). TOFU
    has perturbed answers (truth ratio, forget quality) for its first 20 authors and its forget-split
    authors only: the forget metrics are computed over the named rows that have them.
    """
    fraction = SPLIT_FRACTION[cfg.forget_split]
    n = cfg.num_authors or TOFU_AUTHORS
    if n > TOFU_AUTHORS:
        raise DataError(f"tofu.num_authors={n}: TOFU has {TOFU_AUTHORS} authors")
    k = max(1, round(n * fraction))
    if k >= n:
        raise DataError(
            f"tofu.num_authors={n} with {cfg.forget_split} leaves no retain author; use at least {k + 1}"
        )
    full = load_tofu_split(cfg.dataset, "full")
    if len(full) != TOFU_AUTHORS * QA_PER_AUTHOR:
        raise DataError(f"TOFU full has {len(full)} rows, expected {TOFU_AUTHORS * QA_PER_AUTHOR}")
    for i, row in enumerate(full):
        row["id"] = i
    total_forget = round(TOFU_AUTHORS * fraction) * QA_PER_AUTHOR
    forget = full[len(full) - total_forget :][: k * QA_PER_AUTHOR]  # forgetXX = full's last authors
    retain = full[: (n - k) * QA_PER_AUTHOR]
    suffix = cfg.forget_split.removeprefix("forget")
    holdout = load_tofu_split(cfg.dataset, f"holdout{suffix}")[: k * QA_PER_AUTHOR]
    forget_eval = load_tofu_split(cfg.dataset, f"{cfg.forget_split}_perturbed")[: k * QA_PER_AUTHOR]
    for row, ev in zip(forget, forget_eval, strict=True):
        if row["question"] != ev["question"]:
            raise DataError(f"{cfg.forget_split}_perturbed is not aligned with full (row id {row['id']})")
        ev["id"] = row["id"]
    # retain_perturbed is full's first 400 rows (first 20 authors): keep those of retain authors.
    retain_eval = load_tofu_split(cfg.dataset, "retain_perturbed")[: len(retain)]
    limit = cfg.utility_examples
    real_authors = load_tofu_split(cfg.dataset, "real_authors_perturbed")[:limit]
    world_facts = load_tofu_split(cfg.dataset, "world_facts_perturbed")[:limit]
    if limit is not None:
        retain_eval = retain_eval[:limit]
    description = (
        f"TOFU {cfg.forget_split}: {k} of {n} authors forgotten ({len(forget)} QA pairs), "
        f"{len(retain)} retain, {len(holdout)} holdout"
    )
    if fcfg is not None and fcfg.kind == "ids":
        from engine.data.selection import requested_ids

        training = retain + forget
        wanted = requested_ids(fcfg.ids, fcfg.ids_file, "forget")
        earlier = earlier_keys(fcfg)  # row indices of full, matched as the forget ids are
        refuse_forgotten_again(wanted, earlier)
        known = {r["id"] for r in training}
        missing = [i for i in wanted if not isinstance(i, int) or i not in known]
        if not wanted or missing:
            spans = f"{retain[0]['id']}..{retain[-1]['id']} and {forget[0]['id']}..{forget[-1]['id']}"
            raise DataError(
                f"forget.ids must name rows of TOFU full that tofu.num_authors={n} keeps (ids {spans}); "
                f"not there: {missing[:5] or 'no ids given'}"
            )
        keys = set(wanted)
        forget = [r for r in training if r["id"] in keys]
        retain = [r for r in training if r["id"] not in keys and r["id"] not in earlier]
        if not retain:
            raise DataError(
                "the retain set is empty: forget.ids and forget.earlier_ids cover every row tofu.num_authors keeps"
            )
        perturbed = {r["question"]: r for r in load_tofu_split(cfg.dataset, "retain_perturbed")}
        perturbed.update({r["question"]: r for r in forget_eval})
        forget_eval = [
            {**perturbed[r["question"]], "id": r["id"]} for r in forget if r["question"] in perturbed
        ]
        if not forget_eval:
            raise DataError(
                "none of forget.ids has TOFU's perturbed answers (its first 20 authors and the forget-split "
                "authors have them): name at least one such row, so that forgetting can be scored"
            )
        # model utility is scored on retain rows: neither this batch nor any row an earlier version forgot
        forgotten = {r["question"] for r in training if r["id"] in keys or r["id"] in earlier}
        retain_eval = [r for r in retain_eval if r["question"] not in forgotten]
        holdout = holdout[: max(1, len(forget))]
        description = (
            f"TOFU rows named by id: {len(forget)} forgotten ({len(forget_eval)} with perturbed answers, which the "
            f"forget metrics use), {len(retain)} retain of {n} authors, {len(holdout)} holdout"
        )
    return TofuData(
        cfg.forget_split if fcfg is None or fcfg.kind != "ids" else "ids",
        n,
        k,
        retain + forget,
        forget,
        retain,
        holdout,
        forget_eval,
        retain_eval,
        real_authors,
        world_facts,
        description,
    )
