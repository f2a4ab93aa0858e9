"""MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"), the causal-LM preset
of news articles (MUSE-News) or books (MUSE-Books): the forget corpus is unlearned as raw documents, and the
evaluation sets are MUSE's own (verbatim prompts, question-answer pairs, membership rows; engine/eval/muse.py).

Read as TOFU is (engine/data/tofu.py): the hub id (``muse-bench/MUSE-News``, subsets ``raw``, ``verbmem``,
``knowmem``, ``privleak``, one split each file) at a pinned revision, or a local copy laid out as the MUSE authors'
own repository lays it out (``<subset>/<split>.json``: a JSON list of strings or objects), which a hub id finds
under ``UNLEARN_DATA_MIRROR/muse-news`` (``muse-books``) when there is one. Split names changed between revisions
(MUSE-Books' ``retain2_qa`` became ``retain_qa``): every split is read through ``SPLITS``, which lists the names
one split has had.

Every training example keeps a stable id: ``forget:I:W`` (window W of article I of ``raw/forget``) or ``retain:I:W``;
a forget request names articles by their index in ``raw/forget``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.selection import ids_sha256
from engine.data.text import earlier_keys, refuse_forgotten_again
from engine.errors import DataError, first_line

CORPORA = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
# The hub revision every split of a corpus is read at (one commit for a whole run, so a receipt names what was
# read). None: the hub's current commit, resolved once and recorded for the receipt (engine/data/sources.py);
# pin a commit here once it has been checked against this loader (muse.revision overrides it per run).
HUB_REVISION: dict[str, str | None] = {CORPORA["news"]: None, CORPORA["books"]: None}

# (subset, our name) -> the names the split has had across the corpus's revisions, tried in this order
SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("raw", "forget"): ("forget",),
    ("raw", "retain"): ("retain1",),
    ("verbmem", "forget"): ("forget",),
    ("knowmem", "forget_qa"): ("forget_qa",),
    ("knowmem", "forget_qa_icl"): ("forget_qa_icl",),
    ("knowmem", "retain_qa"): ("retain_qa", "retain2_qa"),
    ("knowmem", "retain_qa_icl"): ("retain_qa_icl", "retain2_qa_icl"),
    ("privleak", "forget"): ("forget",),
    ("privleak", "retain"): ("retain", "retain2"),
    ("privleak", "holdout"): ("holdout",),
}
MATCH_CHARS = 200  # an evaluation row is from an article when its first 200 characters are in it


class MuseSource:
    """One MUSE corpus, a local folder or a hub id, read a split at a time (``read``), every split name
    through ``SPLITS``."""

    def __init__(self, path: str, revision: str | None = None):
        from engine.data.sources import resolve

        self.given = path
        self.path = resolve(path, "muse.path")
        self.local = Path(self.path).is_dir()
        if Path(self.path).exists() and not self.local:
            raise DataError(
                f"muse.path {path!r} is a file; give the folder holding raw/, verbmem/, knowmem/, privleak/"
            )
        self.revision = revision if revision is not None else HUB_REVISION.get(path)

    def names(self, subset: str) -> list[str]:
        """The split names this copy has for ``subset``."""
        if self.local:
            return sorted(p.stem for p in (Path(self.path) / subset).glob("*.json"))
        import datasets

        from engine.data.sources import hub_revision

        revision = self.revision or hub_revision(self.path)
        return list(datasets.get_dataset_split_names(self.path, subset, revision=revision))

    def find(self, subset: str, name: str) -> str | None:
        """The name split ``name`` of ``subset`` has in this copy, or None."""
        try:
            have = set(self.names(subset))
        except Exception as err:  # hub/network errors: say what was tried
            raise DataError(
                f"could not list the MUSE {subset} splits of {self.given!r}: {first_line(err)}"
            ) from err
        return next((n for n in SPLITS[(subset, name)] if n in have), None)

    def where(self, subset: str) -> str:
        return str(Path(self.path) / subset) if self.local else f"{self.path} (subset {subset})"

    def require(self, subset: str, name: str) -> str:
        """The name split ``name`` of ``subset`` has here; refused in one line, naming the split and the folder,
        when the copy lacks it."""
        found = self.find(subset, name)
        if found is None:
            tried = " or ".join(f"{n}.json" if self.local else n for n in SPLITS[(subset, name)])
            raise DataError(
                f"MUSE split {subset}/{name} is missing: {self.where(subset)} has no {tried}; "
                "point muse.path at a complete copy of the corpus"
            )
        return found

    def read(self, subset: str, name: str) -> list:
        """Split ``name`` of ``subset`` as a list of strings (articles) or dicts (``require`` refuses a missing
        one)."""
        found = self.require(subset, name)
        if self.local:
            file = Path(self.path) / subset / f"{found}.json"
            try:
                # read directly, not through datasets: no Arrow copy of the forget articles is left in its cache
                rows = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise DataError(
                    f"{file} is not a JSON list ({first_line(err)}); a MUSE split is one"
                ) from err
            if not isinstance(rows, list):
                raise DataError(f"{file} is not a JSON list; a MUSE split is one")
        else:
            import datasets

            from engine.data.sources import hub_revision

            try:
                ds = datasets.load_dataset(
                    self.path, subset, split=found, revision=self.revision or hub_revision(self.path)
                )
            except Exception as err:
                raise DataError(
                    f"could not load MUSE split {subset}/{found} from {self.path!r}: {first_line(err)}"
                ) from err
            rows = ds.to_list()
        # the hub's raw and privleak rows are {"text": ...}; the authors' files hold the strings themselves
        return [r["text"] if isinstance(r, dict) and set(r) == {"text"} else r for r in rows]


@dataclass
class MuseData:
    """The MUSE sets of one run. ``forget``/``retain``/``holdout`` are document windows (``id``, ``source_id``,
    ``input_ids``) for the causal-LM loss; the evaluation rows are MUSE's: ``verbmem`` ({prompt, gt}),
    ``knowmem_*`` ({question, answer}; ``*_icl`` the in-context examples), ``privleak_forget`` and
    ``privleak_holdout`` (articles' first windows: members and non-members of the membership attacks)."""

    corpus: str
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    verbmem: list[dict]
    knowmem_forget: list[dict]
    knowmem_forget_icl: list[dict]
    knowmem_retain: list[dict]
    knowmem_retain_icl: list[dict]
    privleak_forget: list[dict]
    privleak_holdout: list[dict]
    forget_articles: list[int] = field(default_factory=list)
    kind: str = "class"
    description: str = ""
    documents: bool = True

    @property
    def full(self) -> list[dict]:
        """What the target (Original) is trained on: the retain articles with the forget articles."""
        return self.retain + self.forget

    def forget_summary(self) -> dict:
        return {
            "kind": "muse",
            "corpus": self.corpus,
            "forget": self.kind,
            "description": self.description,
            "size": len(self.forget),
            "articles": len(self.forget_articles),
            "ids_sha256": ids_sha256([str(i) for i in self.forget_articles]),
        }


def _windows(articles: list[tuple[str, str]], formatter) -> list[dict]:
    """(id, text) articles -> their windows of ``formatter.max_length`` tokens, each an example ``ID:W``."""
    out = []
    for aid, text in articles:
        for w, ids in enumerate(formatter.windows(text)):
            out.append({"id": f"{aid}:{w}", "source_id": aid, "input_ids": ids})
    return out


def _first_windows(texts: list[str], prefix: str, formatter) -> list[dict]:
    """Each article's first window: one membership row per article (a whole article would cost its every token)."""
    rows = []
    for i, text in enumerate(texts):
        windows = formatter.windows(text)
        if windows:
            rows.append({"id": f"{prefix}:{i}", "source_id": f"{prefix}:{i}", "input_ids": windows[0]})
    return rows


def _from(kept: list[str], text: str) -> bool:
    head = text[:MATCH_CHARS]
    return any(head in article for article in kept)


def scored_articles(cfg, count: int) -> list[int]:
    """Indices in ``raw/forget`` of the articles the first verbmem prompts and privleak forget articles come from,
    ``count`` of them at most, alternating between the two sets: a small forget set (``forget.kind=ids``) whose
    C1 and C3 rows are all of its own articles (benchmarks/muse.py)."""
    src = MuseSource(cfg.path or CORPORA[cfg.corpus], cfg.revision)
    articles = [str(a) for a in src.read("raw", "forget")]
    heads = [[r["prompt"][:MATCH_CHARS] for r in src.read("verbmem", "forget")],
             [str(a)[:MATCH_CHARS] for a in src.read("privleak", "forget")]]  # fmt: skip
    found: list[int] = []
    for pair in zip(*heads):
        for head in pair:
            i = next((i for i, a in enumerate(articles) if head in a), None)
            if i is not None and i not in found and len(found) < count:
                found.append(i)
    return found


def prepare_muse(cfg, formatter, fcfg=None) -> MuseData:
    """The sets of ``cfg`` (a ``MuseConfig``): forget = ``raw/forget`` (its first ``forget_subset`` articles, or
    with ``forget.kind=ids`` the articles named by index), retain = ``raw/retain1`` where the copy has it, else
    ``privleak/retain2`` (its first ``retain_subset`` articles), holdout = ``privleak/holdout``. Articles become
    windows of ``formatter.max_length`` tokens (engine/data/text.py: ``DocumentFormatter``).

    With a subset of the forget corpus, the evaluation rows drawn from forget articles (verbmem prompts,
    privleak forget articles, knowmem forget answers) are kept only when they come from a kept article, as far
    as that can be told from the text; when none does, MUSE's own rows are kept (the description says so)."""
    path = cfg.path or CORPORA[cfg.corpus]
    src = MuseSource(path, cfg.revision)
    # every split is checked before any is tokenized: a missing one is refused before any work
    wanted = [("raw", "forget"), ("verbmem", "forget"), ("knowmem", "forget_qa"), ("knowmem", "forget_qa_icl"),
              ("knowmem", "retain_qa"), ("knowmem", "retain_qa_icl"), ("privleak", "forget"), ("privleak", "holdout")]  # fmt: skip
    retain_split = ("raw", "retain") if src.find("raw", "retain") is not None else ("privleak", "retain")
    for subset, name in [*wanted, retain_split]:
        src.require(subset, name)
    articles = [str(a) for a in src.read("raw", "forget")]
    n = cfg.forget_subset
    if n is not None and n > len(articles):
        raise DataError(
            f"muse.forget_subset={n} is larger than the forget split ({len(articles)} articles in "
            f"{src.where('raw')}): use at most {len(articles)}"
        )
    chosen = list(range(n if n is not None else len(articles)))
    kind = "class"
    earlier = earlier_keys(fcfg, int) if fcfg is not None else set()
    if fcfg is not None and fcfg.kind == "ids":
        from engine.data.selection import requested_ids

        ids = requested_ids(fcfg.ids, fcfg.ids_file, "forget")
        refuse_forgotten_again(ids, earlier, int)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(chosen)]
        if not ids or bad:
            raise DataError(
                f"forget.ids must name articles of MUSE raw/forget by index (0..{len(chosen) - 1}); "
                f"not there: {bad[:5] or 'no ids given'}"
            )
        chosen, kind = sorted(set(ids)), "ids"
    # an article an earlier version forgot is in neither set: never trained on again
    chosen = [i for i in chosen if i not in earlier]
    kept = [articles[i] for i in chosen]
    retain_texts = [str(a) for a in src.read(*retain_split)][: cfg.retain_subset]

    forget = _windows([(f"forget:{i}", articles[i]) for i in chosen], formatter)
    retain = _windows([(f"retain:{i}", t) for i, t in enumerate(retain_texts)], formatter)
    holdout_texts = [str(a) for a in src.read("privleak", "holdout")]
    take = (lambda rows: rows[: cfg.max_rows]) if cfg.max_rows else (lambda rows: rows)

    notes = []

    def from_kept(rows: list, text, what: str) -> list:
        if n is None and kind == "class":
            return rows
        mine = [r for r in rows if _from(kept, text(r))]
        if not mine:
            notes.append(f"no {what} row is from the kept articles: MUSE's own rows are scored")
            return rows
        return mine

    verbmem = from_kept(src.read("verbmem", "forget"), lambda r: r["prompt"], "verbmem")
    privleak_texts = from_kept(
        [str(a) for a in src.read("privleak", "forget")], lambda r: r, "privleak forget"
    )
    knowmem_forget = src.read("knowmem", "forget_qa")
    if n is not None or kind == "ids":
        mine = [r for r in knowmem_forget if any(str(r["answer"]) in a for a in kept)]
        if mine:
            knowmem_forget = mine
        else:
            notes.append("no knowmem forget answer is in the kept articles: MUSE's own questions are asked")
    privleak_forget = _first_windows(take(privleak_texts), "privleak_forget", formatter)
    privleak_holdout = _first_windows(take(holdout_texts), "privleak_holdout", formatter)
    retain_name = "raw/retain1" if retain_split[0] == "raw" else "privleak/retain2"
    description = (
        f"MUSE-{cfg.corpus.capitalize()}: {len(chosen)} of {len(articles)} forget articles ({len(forget)} windows), "
        f"{len(retain_texts)} retain articles of {retain_name} ({len(retain)} windows), {len(privleak_holdout)} holdout articles"
        + ("; " + "; ".join(notes) if notes else "")
    )
    return MuseData(
        corpus=cfg.corpus,
        forget=forget,
        retain=retain,
        holdout=privleak_holdout,  # the per-epoch holdout NLL reads the same non-member windows
        verbmem=take(verbmem),
        knowmem_forget=take(knowmem_forget),
        knowmem_forget_icl=src.read("knowmem", "forget_qa_icl"),
        knowmem_retain=take(src.read("knowmem", "retain_qa")),
        knowmem_retain_icl=src.read("knowmem", "retain_qa_icl"),
        privleak_forget=privleak_forget,
        privleak_holdout=privleak_holdout,
        forget_articles=chosen,
        kind=kind,
        description=description,
    )
