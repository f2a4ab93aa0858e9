"""The chain of receipts of a request stream: each version's ``receipt.json`` carries a ``chain`` section
(``version``, ``parent``, ``made_by``, ``previous_receipt_sha256``: the sha256 of the parent version's receipt file,
null for v1 whose parent is the Original, ``forget_ids_sha256_batch`` and ``forget_ids_sha256_cumulative``).

``verify_chain`` walks v1 .. vN and checks each link: the receipt reads and names its version; its previous hash is
the parent receipt's file hash; its input model's weights are the parent's exported model (for v1: the Original's
as the v1 receipt recorded them); its ``model`` folder is the model the receipt names; and, when the ledger is
there, the receipt file is the one the ledger recorded and the hashes are those of the ledger's ids. The first link
that does not hold is named (VerifyError, exit status 1)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.artifacts.receipt import VerifyError, sha256_file, verify
from engine.data.selection import ids_sha256
from engine.errors import EngineError


def chain_section(
    version: str,
    parent: str,
    made_by: str,
    previous: Path | None,
    batch: list,
    cumulative: list,
    policy: dict | None = None,
) -> dict:
    """``policy``: why the version was made the way it was (ledger.retrain_every / retrain_bound, with the
    unlearned candidate's drift); null when no retraining policy is set."""
    return {
        "version": version,
        "parent": parent,
        "made_by": made_by,
        "policy": policy,
        "previous_receipt_sha256": sha256_file(previous) if previous is not None else None,
        "forget_ids_sha256_batch": ids_sha256(batch),
        "forget_ids_sha256_cumulative": ids_sha256(cumulative),
    }


def verify_chain(
    folder: str | Path, upto: str | None = None, ledger_path: str | Path | None = None
) -> list[str]:
    """Check the chain of ``folder``'s versions from v1 to ``upto`` (default: the last folder vN there); returns
    one line per link that holds, raises VerifyError naming the first that does not."""
    from engine.requests.ledger import Ledger

    folder = Path(folder)
    numbers = sorted(int(p.name[1:]) for p in folder.glob("v*") if p.is_dir() and p.name[1:].isdigit())
    last = int(upto.lstrip("v")) if upto else (numbers[-1] if numbers else 0)
    if last < 1:
        raise EngineError(f"{folder} holds no version folders (v1, v2, ...)")
    ledger_path = Path(ledger_path) if ledger_path else folder / "ledger.sqlite"
    recorded: dict[str, dict] = {}
    batches: dict[str, list] = {}
    if ledger_path.is_file():
        ledger = Ledger(ledger_path)
        recorded = {v["name"]: v for v in ledger.versions()}
        for v in recorded:
            batches[v] = [i for r in ledger.requests_of(v) for i in r["ids"]]
        ledger.close()
    lines, cumulative, previous = [], [], None
    for n in range(1, last + 1):
        name = f"v{n}"
        where = folder / name

        def broken(why: str, name: str = name, where: Path = where) -> VerifyError:
            return VerifyError(f"the chain breaks at {name} ({where}): {why}")

        receipt_path = where / "receipt.json"
        try:
            receipt = json.loads(receipt_path.read_text())
            chain = receipt["chain"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise broken(f"its receipt.json does not read as a chained receipt ({exc})") from None
        if chain.get("version") != name:
            raise broken(f"its receipt names version {chain.get('version')!r}")
        expected_previous = sha256_file(previous / "receipt.json") if previous is not None else None
        if chain.get("previous_receipt_sha256") != expected_previous:
            raise broken(f"previous_receipt_sha256 is {chain.get('previous_receipt_sha256')}, the parent's receipt "
                         f"hashes to {expected_previous}")  # fmt: skip
        if previous is not None:
            parent_weights = json.loads((previous / "receipt.json").read_text())["output_models"]["model"]
            if receipt["input_model"].get("weights_sha256") != parent_weights["weights_sha256"]:
                raise broken("its input model is not the parent version's exported model")
        try:
            verify(receipt_path, where / "model")
        except VerifyError as exc:
            raise broken(str(exc).splitlines()[0]) from None
        if name in recorded:
            if sha256_file(receipt_path) != recorded[name]["receipt_sha256"]:
                raise broken("its receipt.json is not the file the ledger recorded (sha256 differs)")
            cumulative += [i for i in batches[name] if i not in set(cumulative)]
            if chain.get("forget_ids_sha256_batch") != ids_sha256(batches[name]):
                raise broken("forget_ids_sha256_batch is not the hash of the ledger's ids of this version")
            if chain.get("forget_ids_sha256_cumulative") != ids_sha256(cumulative):
                raise broken("forget_ids_sha256_cumulative is not the hash of every id forgotten up to it")
        elif recorded:
            raise broken("the ledger records no such version")
        lines.append(
            f"{name}: holds ({chain.get('made_by')}, receipt sha256 {sha256_file(receipt_path)[:16]})"
        )
        previous = where
    return lines
