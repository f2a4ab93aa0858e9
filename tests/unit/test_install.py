"""Installs that fit the user: the single-process engine needs none of the extras, a config that asks for a
missing one is refused in one line naming it, and the shipped configs travel with the package."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from engine.cli import main
from engine.config import load_config, shipped_configs
from engine.testing import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
JSONS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))

# A Python without the extras: a module whose sys.modules entry is None is one that cannot be imported and that
# importlib.util.find_spec (which transformers and the engine ask) reports absent, as after `pip install -e .`.
WITHOUT_EXTRAS = """
import json, sys
for name in ("deepspeed", "ray", "wandb"):
    sys.modules[name] = None
from engine.cli import main
over = json.loads(sys.argv[1])
codes = {
    "train": main(["train", "configs/demo.yaml", *over["train"]]),
    "run": main(["run", "configs/demo.yaml", *over["run"]]),
}
for extra, argv in over["refused"].items():
    codes[extra] = main(argv)
print("CODES " + json.dumps(codes))
print("LOADED " + json.dumps(sorted(m for m in ("deepspeed", "ray", "wandb") if sys.modules.get(m) is not None)))
"""


def test_the_single_process_engine_runs_without_extras_and_a_missing_extra_is_named(tiny_cifar, tmp_path):
    models = tmp_path / "models"
    train = tiny_overrides(tiny_cifar, tmp_path, output_dir=str(models))
    run = tiny_overrides(
        tiny_cifar,
        tmp_path,
        **{
            "model.path": str(models / "original"),
            "eval.reference": str(models / "retrain"),
            "output_dir": str(tmp_path / "run"),
        },
    )
    refused_out = tmp_path / "refused"
    refuse = tiny_overrides(
        tiny_cifar, tmp_path, **{"model.path": str(models / "original"), "output_dir": str(refused_out)}
    )
    refused = {
        "deepspeed": ["run", "configs/demo.yaml", *refuse, "backend.name=deepspeed"],
        "ray": ["run", "configs/demo.yaml", *refuse, "backend.name=ray"],
        "wandb": ["run", "configs/demo.yaml", *refuse, "logging.wandb=true"],
        "audit": ["audit", "configs/demo.yaml", *refuse],
    }
    argv = json.dumps({"train": train, "run": run, "refused": refused})
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS, argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.split("CODES ", 1)[1].splitlines()[0])
    assert codes == {"train": 0, "run": 0, "deepspeed": 2, "ray": 2, "wandb": 2, "audit": 2}, proc.stderr[
        -3000:
    ]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: backend.name=deepspeed needs deepspeed, which is not installed: pip install 'engine[deepspeed]' "
        "(after torch: DS_BUILD_OPS=0 pip install --no-build-isolation ...)",
        "error: backend.name=ray needs ray and deepspeed, which are not installed: pip install 'engine[ray]' "
        "(after torch: DS_BUILD_OPS=0 pip install --no-build-isolation ...)",
        "error: logging.wandb=true needs wandb, which is not installed: pip install 'engine[wandb]'",
        "error: `unlearn audit` needs ray, which is not installed: pip install 'engine[ray]'",
    ]
    assert not refused_out.exists() and not refused_out.with_name("refused.partial").exists()
    assert json.loads(proc.stdout.split("LOADED ", 1)[1].splitlines()[0]) == []


def test_unlearn_configs_lists_and_copies_the_shipped_files(tmp_path, capsys):
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    for path in [*CONFIGS, *JSONS]:
        assert f"  {path.stem}" in listing, path.stem
    dest = tmp_path / "mine.yaml"
    assert main(["configs", "cp", "demo", str(dest)]) == 0
    assert dest.read_bytes() == (ROOT / "configs" / "demo.yaml").read_bytes()
    assert main(["configs", "cp", "zero3", str(tmp_path)]) == 0
    assert (tmp_path / "zero3.json").read_bytes() == (
        ROOT / "configs" / "deepspeed" / "zero3.json"
    ).read_bytes()
    capsys.readouterr()
    assert main(["configs", "cp", "demo", str(dest)]) == 2  # never overwrites an edited copy silently
    assert capsys.readouterr().err.strip() == f"error: {dest} exists; choose another DEST or pass --overwrite"
    assert main(["configs", "cp", "nope"]) == 2
    assert "no shipped config named 'nope'" in capsys.readouterr().err


def test_a_shipped_config_name_works_wherever_a_path_does(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here, as for a pip user
    by_path = load_config(ROOT / "configs" / "tofu.yaml").model_dump()
    for name in ("tofu", "tofu.yaml", "configs/tofu.yaml"):
        cfg = load_config(name)
        # the default DeepSpeed JSON names configs/deepspeed/zero2.json: here that is the shipped file
        assert Path(cfg.backend.deepspeed_config).read_bytes() == (JSONS[2]).read_bytes()
        assert {**cfg.model_dump(), "backend": None} == {**by_path, "backend": None}
    cfg = load_config("demo", ["backend.deepspeed_config=zero3"])
    assert (
        Path(cfg.backend.deepspeed_config).read_bytes()
        == (ROOT / "configs/deepspeed/zero3.json").read_bytes()
    )
    mine = tmp_path / "configs" / "deepspeed" / "zero3.json"  # a file of the user's own wins over the shipped
    mine.parent.mkdir(parents=True)
    mine.write_text("{}")
    assert load_config(
        "demo", ["backend.deepspeed_config=configs/deepspeed/zero3.json"]
    ).backend.deepspeed_config == ("configs/deepspeed/zero3.json")


def test_the_wheel_carries_the_configs_and_no_extra_is_required(tmp_path):
    """A pip install has what `unlearn configs` lists: the wheel built from this tree holds every shipped file;
    DeepSpeed, Ray and wandb are only in extras."""
    assert [p.name for p in shipped_configs().values()] == [p.name for p in CONFIGS]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with zipfile.ZipFile(next(tmp_path.glob("engine-*.whl"))) as wheel:
        names = set(wheel.namelist())
        metadata = next(wheel.read(n).decode() for n in names if n.endswith("METADATA"))
    for path in CONFIGS:
        assert f"engine/configs/{path.name}" in names
    for path in JSONS:
        assert f"engine/configs/deepspeed/{path.name}" in names
    requires = [
        line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")
    ]
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.split("[")[0].split(">")[0] in ("deepspeed", "ray", "wandb")]
    extras = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Provides-Extra: ")}
    assert extras == {"deepspeed", "ray", "wandb", "all", "dev"}


def test_unlearn_train_demo_then_unlearn_run_demo_line_up():
    """The two commands a new user types: `run` reads the Original and Retrain that `train` writes."""
    train, run = load_config("demo", command="train"), load_config("demo", command="run")
    assert run.model.path == str(Path(train.output_dir) / "original")
    assert run.eval.reference == str(Path(train.output_dir) / "retrain")
    assert run.output_dir != train.output_dir and "{command}" not in run.output_dir
