"""SCRUB's calibrated schedule (docs/algorithm.md, "The calibrated schedule"): the target by hand, the
max phase's step budget (a small forget set cycled, a large one cut short, the same on every rank and after
a resume), the rule that closes the max phase, and a run stopped and resumed taking the same decisions."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import torch

from engine.backends.sampling import epoch_order
from engine.backends.single import SingleProcessBackend
from engine.config import load_config
from engine.data.vision import prepare_data
from engine.errors import ConfigError, PreemptedError
from engine.eval.metrics import evaluate, unseen_error
from engine.loop import LoopHooks, run_loop
from engine.methods.scrub import Scrub, ScrubConfig
from engine.recipes.unlearn import run_unlearning
from engine.testing import tiny_overrides
from tests.unit.test_sharding import Stream, ThreadRank

# --- the target ---------------------------------------------------------------------------------------


def test_a_class_the_retain_set_lacks_has_target_100():
    val_labels = np.array([0, 0, 1, 1])
    val_correct = np.array([True, True, True, False])  # the model still knows class 0's validation examples
    assert unseen_error(np.array([0, 0, 0]), val_labels, val_correct, unseen_classes=[0]) == 100.0


def test_a_class_the_retain_set_still_holds_has_its_validation_error():
    val_labels = np.array([1, 1, 1, 1, 2])
    val_correct = np.array([True, False, False, True, False])  # class 1: 2 wrong of 4; class 2 not asked
    assert unseen_error(np.array([1, 1]), val_labels, val_correct) == pytest.approx(50.0)


def test_a_mixed_forget_set_weights_each_class_by_its_count():
    # 3 examples of class 0 (forgotten whole: 100), 1 of class 1 (validation error 1 of 4 = 25%)
    val_labels = np.array([0, 1, 1, 1, 1])
    val_correct = np.array([True, True, True, True, False])
    got = unseen_error(np.array([0, 0, 0, 1]), val_labels, val_correct, unseen_classes=[0])
    assert got == pytest.approx(0.75 * 100 + 0.25 * 25)


def test_a_retained_class_without_validation_examples_has_no_target():
    assert np.isnan(unseen_error(np.array([3]), np.array([0, 1]), np.array([True, True])))


@pytest.fixture(scope="module")
def tiny_sets(tiny_cifar, tmp_path_factory):
    """prepare_data on the tiny real CIFAR-10 (3 classes, 40 train + 10 validation images each), twice:
    class 0 forgotten whole, and 10 of class 0's examples (selective)."""
    tmp = tmp_path_factory.mktemp("target")
    whole = load_config(None, tiny_overrides(tiny_cifar, tmp, **{"forget.label": "0"}))
    part = load_config(None, tiny_overrides(tiny_cifar, tmp, **{"forget.kind": "selective", "forget.label": "0",
                                                                "forget.count": "10"}))  # fmt: skip
    return prepare_data(whole.data, whole.forget), prepare_data(part.data, part.forget)


def predictions(data, wrong_val_rows: set[int]) -> dict:
    """``predict``'s output for every split, by hand: everything right but the listed validation rows."""
    out = {}
    for name in ("forget", "retain", "val", "forget_val", "test"):
        n = len(getattr(data, name))
        correct = np.array([not (name == "val" and i in wrong_val_rows) for i in range(n)])
        out[name] = {"loss": np.zeros(n), "correct": correct, "conf": np.ones(n), "margin": np.zeros(n)}
    return out


def test_evaluate_reports_the_target_of_a_whole_class_and_of_part_of_one(tiny_sets):
    whole, part = tiny_sets
    val_labels = part.val.labels.numpy()
    class0 = np.flatnonzero(val_labels == 0)
    wrong = {int(i) for i in class0[:3]} | {int(np.flatnonzero(val_labels == 1)[0])}  # 3 of class 0, 1 other
    # a whole class: 100 whatever the model does on its validation examples
    got = evaluate(None, whole, None, 128, "cpu", attacks=False, predictions=predictions(whole, wrong))
    assert got["forget_target_error"] == 100.0
    # part of a class: that class's validation error (the other class's mistake does not count)
    got = evaluate(None, part, None, 128, "cpu", attacks=False, predictions=predictions(part, wrong))
    assert (part.retain.labels == 0).any() and set(part.forget.labels.tolist()) == {0}
    assert got["forget_target_error"] == pytest.approx(100.0 * 3 / len(class0))


# --- the step budget of the max phase -----------------------------------------------------------------


def plan(n: int, batch_size: int, steps: int | None, skip: int = 0, epoch: int = 2) -> list[list[int]]:
    backend = SingleProcessBackend("cpu")
    out = backend.batches(Stream(n), batch_size, seed=5, epoch=epoch, name="forget", skip=skip, steps=steps)
    return [micro[0]["rows"].tolist() for micro in out]


def test_a_small_forget_set_is_cycled_to_spend_exactly_the_budget_each_pass_freshly_shuffled():
    got = plan(5, 2, steps=7)  # 3 batches a pass (2, 2, 1): passes 0 and 1 whole, then pass 2's first batch
    assert len(got) == 7
    passes = [epoch_order(5, 5, 2, "forget", repeat=p).split(2) for p in range(3)]
    want = [b.tolist() for b in passes[0]] + [b.tolist() for b in passes[1]] + [passes[2][0].tolist()]
    assert got == want
    first, second = sum(got[:3], []), sum(got[3:6], [])
    assert sorted(first) == sorted(second) == list(range(5))  # each pass: every row once
    assert first != second  # in a fresh order
    assert plan(5, 2, steps=7, epoch=3) != got  # and another epoch, other orders


def test_a_large_forget_set_is_cut_at_the_budget():
    got = plan(100, 10, steps=3)
    assert got == [b.tolist() for b in epoch_order(100, 5, 2, "forget").split(10)[:3]]


def test_one_pass_is_the_paper_order_unchanged():
    assert plan(23, 4, steps=None) == [b.tolist() for b in epoch_order(23, 5, 2, "forget").split(4)]
    assert plan(23, 4, steps=None) == plan(23, 4, steps=6)  # a budget of exactly one pass: the same steps


def test_a_resumed_phase_goes_on_with_the_very_next_batch_across_passes():
    full = plan(5, 2, steps=11)
    for skip in (1, 3, 4, 10):
        assert plan(5, 2, steps=11, skip=skip) == full[skip:]


def test_every_rank_cycles_the_same_global_batches():
    world = 2
    shared = {"values": [0.0] * world, "barrier": threading.Barrier(world)}
    ranks = [ThreadRank(r, world, 1, shared) for r in range(world)]
    out: list = [None] * world

    def work(r):
        out[r] = list(ranks[r].batches(Stream(5), 2, seed=5, epoch=2, name="forget", steps=7))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [len(steps) for steps in out] == [7, 7]
    together = [
        sorted(int(i) for r in range(world) for b in out[r][k] if b["share"] > 0 for i in b["rows"])
        for k in range(7)
    ]
    assert together == [sorted(b) for b in plan(5, 2, steps=7)]


# --- the rule ------------------------------------------------------------------------------------------


def shape(scrub: Scrub, epochs: int) -> list[list[tuple]]:
    return [[(p.name, p.stream, p.steps) for p in scrub.phases(e)] for e in range(1, epochs + 1)]


def calibrated(**kw) -> ScrubConfig:
    base = dict(epochs=5, msteps=3, schedule="calibrated", max_steps_per_epoch=7, forget_batch_size=2,
                retain_batch_size=4, target_tolerance=1.0)  # fmt: skip
    return ScrubConfig(**{**base, **kw})


def test_the_paper_schedule_is_unchanged():
    scrub = Scrub(ScrubConfig(epochs=3, msteps=2, max_steps_per_epoch=7))  # the budget is not read
    max_then_min, min_only = [("max", "forget", None), ("min", "retain", None)], [("min", "retain", None)]
    assert shape(scrub, 3) == [max_then_min, max_then_min, min_only]
    with pytest.raises(ValueError, match="calibrated"):
        scrub.end_epoch(1, 50.0, 60.0)


def test_max_steps_continue_below_the_target_stop_once_it_is_reached_and_reopen_below_it():
    scrub = Scrub(calibrated())
    max_then_min = [("max", "forget", 7), ("min", "retain", None)]
    assert shape(scrub, 5) == [max_then_min] * 3 + [[("min", "retain", None)]] * 2  # open: epochs 1..msteps
    row = scrub.end_epoch(1, forget_error=40.0, target_error=60.0)  # below: the next epoch spends max-steps
    assert row == {"target_error": 60.0, "max_steps": 7, "max_steps_spent": 7, "target_reached": False,
                   "max_open": True}  # fmt: skip
    assert shape(scrub, 5)[1] == max_then_min
    row = scrub.end_epoch(2, forget_error=59.5, target_error=99.0)  # within the tolerance of the frozen 60
    assert row == {"target_error": 60.0, "max_steps": 7, "max_steps_spent": 14, "target_reached": True,
                   "max_open": False}  # fmt: skip
    assert shape(scrub, 5) == [[("min", "retain", None)]] * 5  # no max phase follows while it holds
    row = scrub.end_epoch(3, forget_error=30.0, target_error=60.0)  # min-steps relearned: open again ...
    assert row == {"target_error": 60.0, "max_steps": 0, "max_steps_spent": 14, "target_reached": False,
                   "max_open": True}  # fmt: skip
    assert shape(scrub, 5)[2] == max_then_min  # ... for epochs up to msteps only: 4 and 5 stay min-only
    assert shape(scrub, 5)[3:] == [[("min", "retain", None)]] * 2
    assert scrub.schedule_state.reached_after == 2


def test_the_target_is_frozen_at_what_the_original_shows():
    scrub = Scrub(calibrated())
    assert scrub.end_epoch(0, forget_error=5.0, target_error=35.0)["max_open"]  # the original: 35 frozen
    # the student's validation error on the class rises with the max-steps (here to 90): the target does not
    row = scrub.end_epoch(1, forget_error=50.0, target_error=90.0)
    assert (row["target_error"], row["target_reached"], row["max_open"]) == (35.0, True, False)


def test_a_check_inside_the_max_phase_ends_it_and_a_resumed_epoch_skips_the_rest():
    scrub = Scrub(calibrated(check_every=2))
    scrub.end_epoch(0, forget_error=5.0, target_error=40.0)
    # checks after max-steps 2, 4, 6 of 7 (not after 7: the epoch's evaluation follows), not on other steps
    assert [s for s in range(1, 8) if scrub.check_due(1, s)] == [2, 4, 6]
    assert not scrub.check(1, 2, forget_error=30.0)  # below: the phase goes on
    assert scrub.check(1, 4, forget_error=39.0)  # within the tolerance: the phase ends after 4 steps
    assert shape(scrub, 5)[0] == [("max", "forget", 4), ("min", "retain", None)]  # as a resume sees epoch 1
    resumed = Scrub(calibrated(check_every=2))
    resumed.load_state_dict(json.loads(json.dumps(scrub.state_dict())))
    assert shape(resumed, 5) == shape(scrub, 5)
    row = scrub.end_epoch(1, forget_error=41.0, target_error=80.0)
    assert (row["max_steps"], row["max_steps_spent"], row["max_open"]) == (4, 4, False)
    assert scrub.schedule_state.ended_early is None  # the next epoch, if reopened, gets the whole budget
    scrub.end_epoch(2, forget_error=20.0, target_error=80.0)
    assert shape(scrub, 5)[2] == [("max", "forget", 7), ("min", "retain", None)]
    assert not Scrub(ScrubConfig(max_steps_per_epoch=7)).check_due(1, 2)  # the paper's schedule: never


def test_an_original_already_at_its_target_gets_no_max_step_at_all():
    scrub = Scrub(calibrated())
    row = scrub.end_epoch(0, forget_error=45.0, target_error=40.0)  # e.g. a hard forget set, a random target
    assert row == {"target_error": 40.0, "max_steps": 0, "max_steps_spent": 0, "target_reached": True,
                   "max_open": False}  # fmt: skip
    assert shape(scrub, 5) == [[("min", "retain", None)]] * 5
    assert scrub.streams() == {"forget", "retain"}  # a later epoch may still reopen it: its teacher is cached
    below = Scrub(calibrated())
    assert below.end_epoch(0, forget_error=5.0, target_error=40.0)["max_open"]
    assert shape(below, 5) == shape(Scrub(calibrated()), 5)  # as if nothing had been measured


def test_the_budget_ends_with_epoch_msteps_when_the_target_is_never_reached():
    scrub = Scrub(calibrated())
    spent = [scrub.end_epoch(e, 10.0, 100.0)["max_steps_spent"] for e in range(1, 6)]
    assert spent == [7, 14, 21, 21, 21]  # msteps x max_steps_per_epoch, then min-only epochs


def test_a_restored_state_gives_the_same_phases():
    scrub = Scrub(calibrated())
    scrub.end_epoch(1, 40.0, 60.0)
    resumed = Scrub(calibrated())
    resumed.load_state_dict(json.loads(json.dumps(scrub.state_dict())))  # as the checkpoint stores it
    assert shape(resumed, 5) == shape(scrub, 5)
    scrub.end_epoch(2, 70.0, 60.0)
    resumed.load_state_dict(json.loads(json.dumps(scrub.state_dict())))
    assert shape(resumed, 5) == shape(scrub, 5) == [[("min", "retain", None)]] * 5


def test_a_target_that_is_not_a_number_is_refused():
    with pytest.raises(ValueError, match="val_fraction"):
        Scrub(calibrated()).end_epoch(1, 10.0, float("nan"))


def test_the_config_refuses_what_the_schedule_cannot_steer(tmp_path):
    for over, match in (
        (["task=causal_lm", "data.text_column=text", "data.dataset=corpus.jsonl"], "holdout.dataset"),
        (["data.val_fraction=0"], "val_fraction"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["method.schedule=calibrated", *over])
    # `unlearn run` refuses it without per-epoch errors, before any work (the audit's reference trainings,
    # which run no SCRUB, may turn eval.every_epoch off under the same config)
    cfg = load_config(None, ["method.schedule=calibrated", "eval.every_epoch=false", "model.path=never/read",
                             f"output_dir={tmp_path / 'out'}"])  # fmt: skip
    with pytest.raises(ConfigError, match="every_epoch"):
        run_unlearning(cfg, log=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(ConfigError, match="max_steps_per_epoch"):
        load_config(None, ["method.schedule=calibrated", "method.max_steps_per_epoch=0"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(None, ["method.schedule=adaptive"])
    cfg = load_config(None, ["method.schedule=calibrated"])
    assert (cfg.method.max_steps_per_epoch, cfg.method.target_tolerance, cfg.method.check_every) == (
        16,
        1.0,
        2,
    )
    assert load_config(None, []).method.schedule == "paper"
    # a causal LM steers by the holdout rows' NLL (TOFU's holdout authors): its tolerance is in nats
    tofu = load_config(None, ["method.schedule=calibrated", "task=causal_lm", "data.preset=tofu"])
    assert tofu.method.target_tolerance == 0.05
    assert (
        load_config(
            None, ["task=causal_lm", "data.preset=tofu", "method.target_tolerance=0.2"]
        ).method.target_tolerance
        == 0.2
    )
    with pytest.raises(ValueError, match="target_tolerance"):  # a method built without a validated config
        Scrub(ScrubConfig(schedule="calibrated")).end_epoch(0, 1.0, 2.0)


# --- the loop: budgets spent, decisions taken, and the same after a resume ---------------------------


class Rows:
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def get(self, rows, seed: int = 0) -> dict:
        return {"x": self.x[rows], "labels": self.y[rows]}


# what the recipe would measure after each epoch: below the target after epoch 1, reached after epoch 2
MEASURED = {1: (20.0, 60.0), 2: (65.0, 60.0), 3: (40.0, 60.0), 4: (40.0, 60.0)}


def setup(**kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    settings = dict(epochs=4, msteps=3, lr=0.05, lr_decay_epochs=[], optimizer="adam", reset_after_max=False)
    method = Scrub(calibrated(**{**settings, **kw}))
    backend = SingleProcessBackend(device="cpu")
    model, teacher = backend.prepare(model, teacher, method.config.build_optimizer)
    return model, teacher, method, backend


def loop(model, teacher, method, backend, decisions: list, steps: dict, **kwargs):
    def on_step(epoch, phase, step, value):
        steps[(epoch, phase)] = step

    def on_epoch_end(epoch, losses):
        decisions.append(method.end_epoch(epoch, *MEASURED[epoch]))

    hooks = LoopHooks(on_step=on_step, on_epoch_end=on_epoch_end, **kwargs.pop("hooks", {}))
    streams = {"forget": Rows(5, 1), "retain": Rows(12, 2)}
    return run_loop(method, backend, model, teacher, streams, lambda m, b: m(b["x"]), seed=0, epochs=4,
                    progress=False, hooks=hooks, **kwargs)  # fmt: skip


def snapshot(saved: dict, position: dict, model, method, backend) -> None:
    """What a checkpoint holds at a stop: weights, optimizer, RNG, loop position and the schedule's state."""
    saved.update(position=position, schedule=json.dumps(method.state_dict()), rng=torch.get_rng_state(),
                 model={k: v.clone() for k, v in model.state_dict().items()},
                 optimizer=copy.deepcopy(backend.optimizer.state_dict()))  # fmt: skip


def restored(saved: dict, model, method, backend) -> None:
    """A new process's run put back where ``snapshot`` left it."""
    model.load_state_dict(saved["model"])
    backend.optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    method.load_state_dict(json.loads(saved["schedule"]))


def test_the_loop_spends_the_budget_until_the_target_and_a_resumed_run_decides_the_same():
    model, teacher, method, backend = setup()
    decisions, steps = [], {}
    loop(model, teacher, method, backend, decisions, steps)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    # 5 forget rows in batches of 2: 7 max-steps cycle them (2 passes + 1 batch) in epochs 1 and 2; the target
    # is reached after epoch 2, so epochs 3 and 4 (3 <= msteps) are min-only; 12 retain rows: 3 min-steps
    assert steps == {(1, "max"): 7, (1, "min"): 3, (2, "max"): 7, (2, "min"): 3, (3, "min"): 3, (4, "min"): 3}
    assert [d["max_steps"] for d in decisions] == [7, 7, 0, 0]
    assert [d["max_open"] for d in decisions] == [True, False, True, True]  # epoch 4 > msteps: min-only

    # the same run stopped in epoch 2 inside the max phase's second pass (step 5 of 7), then resumed in a new
    # process from what a checkpoint holds: weights, optimizer, RNG, loop position and the schedule's state
    model, teacher, method, backend = setup()
    asked, saved, first = {"n": 0}, {}, []

    def should_stop() -> bool:
        asked["n"] += 1
        return asked["n"] == 7 + 3 + 5  # epoch 1: 7 max + 3 min; epoch 2: max step 5

    def on_stop(position: dict) -> None:
        snapshot(saved, position, model, method, backend)

    stop = {"should_stop": should_stop, "on_stop": on_stop}
    with pytest.raises(PreemptedError, match="epoch 2, max step 5"):
        loop(model, teacher, method, backend, first, {}, hooks=stop)
    assert first == decisions[:1]

    model, teacher, method, backend = setup()
    restored(saved, model, method, backend)
    rest, resumed_steps = [], {}
    loop(model, teacher, method, backend, rest, resumed_steps, start=saved["position"])
    assert first + rest == decisions
    assert resumed_steps == {(2, "max"): 7, (2, "min"): 3, (3, "min"): 3, (4, "min"): 3}
    for k, v in expected.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_fresh_optimizer_after_each_max_phase_starts_the_min_steps_at_adams_first_step():
    def adam_steps(reset: bool) -> tuple[dict, dict]:
        model, teacher, method, backend = setup(reset_after_max=reset)
        counts = {}

        def end_phase(epoch, phase, step):  # asked after each step: Adam's own step count, every param
            counts[(epoch, phase, step)] = {int(s["step"]) for s in backend.optimizer.state.values()}
            return False

        loop(model, teacher, method, backend, [], {}, hooks={"end_phase": end_phase})
        return counts, model.state_dict()

    shared, kept = adam_steps(False)
    fresh, moved = adam_steps(True)
    # one optimizer state through both phases: epoch 1's first min-step is Adam's 8th (after 7 max-steps)
    assert shared[(1, "min", 1)] == {8} and shared[(2, "max", 1)] == {11}
    # cleared when each max phase ends: the min phase starts from zero moments; the max phase does not
    assert fresh[(1, "max", 7)] == {7} and fresh[(1, "min", 1)] == {1} and fresh[(1, "min", 3)] == {3}
    assert fresh[(2, "max", 1)] == {4} and fresh[(2, "min", 1)] == {1}
    assert fresh[(3, "min", 1)] == {4}  # epoch 3 has no max phase (target reached): nothing is cleared
    assert any(not torch.equal(kept[k], moved[k]) for k in kept)
    paper = Scrub(ScrubConfig(epochs=3, msteps=2, reset_after_max=True))  # the paper's schedule: ignored
    assert not any(p.fresh_optimizer for e in (1, 2, 3) for p in paper.phases(e))


@pytest.mark.parametrize("reset", [False, True], ids=["one-optimizer-state", "reset-after-max"])
def test_a_check_ends_the_max_phase_and_a_run_stopped_at_or_after_it_resumes_the_same(reset):
    def end_phase_for(method):  # what the recipe's check would measure: reached at max-step 4 of epoch 1 only
        def end_phase(epoch: int, phase: str, step: int) -> bool:
            if phase != "max" or not method.check_due(epoch, step):
                return False
            return method.check(epoch, step, 60.0 if (epoch, step) == (1, 4) else 10.0)

        return end_phase

    def fresh():
        model, teacher, method, backend = setup(reset_after_max=reset)
        method.end_epoch(0, 0.0, 60.0)  # the original: far below the target, which is frozen at 60
        return model, teacher, method, backend

    model, teacher, method, backend = fresh()
    decisions, steps = [], {}
    loop(model, teacher, method, backend, decisions, steps, hooks={"end_phase": end_phase_for(method)})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    # epoch 1's max phase ends at the check after step 4 of 7; epoch 2 (below the target again) spends all 7
    assert steps == {(1, "max"): 4, (1, "min"): 3, (2, "max"): 7, (2, "min"): 3, (3, "min"): 3, (4, "min"): 3}
    assert [d["max_steps"] for d in decisions] == [4, 7, 0, 0]

    def stopped_then_resumed(stop_at: int, where: str) -> None:
        model, teacher, method, backend = fresh()
        asked, saved, first = {"n": 0}, {}, []

        def should_stop() -> bool:
            asked["n"] += 1
            return asked["n"] == stop_at

        def on_stop(position: dict) -> None:
            snapshot(saved, position, model, method, backend)

        hooks = {"should_stop": should_stop, "on_stop": on_stop, "end_phase": end_phase_for(method)}
        with pytest.raises(PreemptedError, match=where):
            loop(model, teacher, method, backend, first, {}, hooks=hooks)

        model, teacher, method, backend = fresh()
        restored(saved, model, method, backend)
        rest, resumed_steps = [], {}
        loop(model, teacher, method, backend, rest, resumed_steps, start=saved["position"],
             hooks={"end_phase": end_phase_for(method)})  # fmt: skip
        assert first + rest == decisions, where
        assert (1, "max") not in resumed_steps, where  # the ended max phase is not taken up again
        for k, v in expected.items():
            assert torch.equal(model.state_dict()[k], v), (where, k)

    stopped_then_resumed(4, "epoch 1, max step 4")  # at the very check that ends the phase
    stopped_then_resumed(4 + 2, "epoch 1, min step 2")  # after it, in the same epoch
