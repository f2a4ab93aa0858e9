"""A Ray task pool: independent runs (the audit's K retrains and K unlearnings with different seeds) as
Ray tasks over a cluster's CPUs, or an embedded Ray's (engine/launch/ray_train.py starts or joins it)."""

from __future__ import annotations

from engine.launch.ray_train import init_ray


def fan_out(fn, items: list, num_cpus: float = 1.0, address: str | None = None) -> list:
    """Run ``fn(item)`` for every item as Ray tasks over the cluster's resources (the audit's K retrains
    or K unlearnings with different seeds) and return the results in the items' order. Each task
    reserves ``num_cpus``; an exception in one is raised here with its item's position."""
    import ray

    init_ray(address)
    task = ray.remote(num_cpus=num_cpus)(fn)
    refs = [task.remote(item) for item in items]
    results = []
    for i, ref in enumerate(refs):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            raise RuntimeError(f"fan_out: item {i} ({items[i]!r}) failed: {exc}") from exc
    return results
