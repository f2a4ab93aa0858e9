"""``output.push_to_hub``: upload a completed run's model (weights, config, processor or tokenizer, its model card
as README.md) with the run's receipt.json to a hub repository.

The upload comes after the run folder is in place and never touches it: a failed upload loses nothing, and the
error says where the results are and how to upload them by hand. What can be known before any work (a repository
id the hub would refuse, no token, the hub forbidden) is refused before any work (engine/config/rules.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from engine.artifacts.run_folder import RunFolder
from engine.errors import OutputError, first_line


def push_run(run_dir: str | Path, repo_id: str, private: bool, log=print) -> str:
    """Upload ``run_dir/model`` (its README.md is the model card) and ``run_dir/receipt.json`` to the root of the
    model repository ``repo_id`` (created if absent, ``private`` then), in one commit. Returns the repository URL;
    raises OutputError (one line: where the results are, how to upload them by hand) when the upload fails."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    upload = RunFolder.of(run_dir).upload
    try:
        _link_tree(run_dir / "model", run_dir / "receipt.json", upload)
        api = HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=upload,
            repo_type="model",
            commit_message=f"unlearned model and receipt ({run_dir.name})",
        )
    except Exception as exc:  # network, auth, quota, a repo of another type: the run itself is complete
        reason = first_line(exc)
        raise OutputError(
            f"the run completed and its results are in {run_dir}, but the upload to {repo_id} failed ({reason}); "
            f"upload by hand: `hf upload {repo_id} {run_dir / 'model'} . && hf upload {repo_id} "
            f"{run_dir / 'receipt.json'} receipt.json`"
        ) from exc
    finally:
        shutil.rmtree(upload, ignore_errors=True)
    log(f"pushed {run_dir / 'model'} and its receipt to {url}")
    return str(url)


def _link_tree(model: Path, receipt: Path, out: Path) -> None:
    """``out`` = the files of ``model`` plus ``receipt``, as hard links (weights can be gigabytes; copies where
    links are not possible): the folder the upload reads, so the run folder itself is never changed."""
    if out.exists():
        shutil.rmtree(out)
    for src in [*sorted(p for p in model.rglob("*") if p.is_file()), receipt]:
        dst = out / (src.relative_to(model) if src != receipt else receipt.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
