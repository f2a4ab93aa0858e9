"""Where a run's models and datasets came from, for its receipt: a local path (no revision), a hub id with the
commit it was read at, or a hub id read from a local copy (``UNLEARN_DATA_MIRROR``: no revision).

A hub id is resolved to a commit once (``HfApi.resolve_revision``: the hub, or offline the ``refs/`` mapping of the
local cache) and the files are then loaded at that commit, so what the receipt names is exactly what was read, even
if the repository changes during the run. The loaders (engine/models/loading.py, engine/data/sources.py) record
what they read here; ``unlearn run`` starts from an empty record (``reset``) and writes it into receipt.json.
"""

from __future__ import annotations

from pathlib import Path

_MODELS: dict[tuple[str, str | None], dict] = {}
_DATASETS: dict[str, dict] = {}


def reset() -> None:
    """Forget what earlier runs in this process loaded (one record per run)."""
    _MODELS.clear()
    _DATASETS.clear()


def is_local(source: str | None) -> bool:
    return source is not None and Path(source).exists()


def hub_ids(*sources: str | None) -> list[str]:
    """The sources that name the hub (read from the hub or from a mirror of it), in order, once each."""
    return list(dict.fromkeys(s for s in sources if s and not is_local(s)))


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds (asked once per process).
    Hand-written because `datasets` retries an unreachable hub with back-off for about 30 s, printing each retry,
    before it gives up: a machine without the hub should hear so at once, in one line."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def resolve_hub_revision(repo_id: str, revision: str | None, repo_type: str) -> str:
    """The commit ``revision`` (None: the default branch) of a hub repository points to: asked of the hub, or read
    from the local cache when the hub cannot be reached. Raises huggingface_hub's errors (the callers word them)."""
    from huggingface_hub import HfApi

    return HfApi().resolve_revision(repo_id, revision=revision, repo_type=repo_type).resolved


def model_revision(source: str, requested: str | None) -> str | None:
    """The commit a model was recorded at by ``record_model`` (None: local, or not recorded)."""
    entry = _MODELS.get((source, requested))
    return entry.get("revision") if entry else None


def record_model(source: str, requested: str | None, revision: str | None) -> None:
    entry = {"source": source, "local": revision is None and is_local(source), "revision": revision}
    if requested is not None and requested != revision:
        entry["requested_revision"] = requested
    _MODELS[(source, requested)] = entry


def dataset_revision(source: str) -> str | None:
    """The commit a hub dataset was recorded at by ``record_dataset`` (None: not from the hub, or not recorded)."""
    entry = _DATASETS.get(source)
    return entry.get("revision") if entry else None


def record_dataset(source: str, *, revision: str | None = None, mirror: str | None = None) -> None:
    """``source`` as the config names it; ``mirror``: the local copy a hub id was read from."""
    entry: dict = {"source": source, "local": mirror is None and is_local(source), "revision": revision}
    if mirror is not None:
        entry["mirror"] = mirror
    _DATASETS[source] = entry


def loaded() -> dict[str, list[dict]]:
    """What this run loaded: ``{"models": [...], "datasets": [...]}``, each entry ``source``, ``local``,
    ``revision`` (the commit, for what came from the hub) and, for a mirrored dataset, ``mirror``."""
    return {"models": [dict(e) for e in _MODELS.values()], "datasets": [dict(e) for e in _DATASETS.values()]}
