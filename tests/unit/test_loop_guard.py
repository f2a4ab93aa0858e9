"""The loop's divergence guard and its stop-at-a-step-boundary, in process on a linear model: a bad
step is never applied, and a run stopped mid-epoch and resumed from the position it handed over ends
with exactly the weights of the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from engine.backends.single import SingleProcessBackend
from engine.errors import DivergenceError, PreemptedError
from engine.loop import LoopHooks, run_loop
from engine.methods.erm import Erm, ErmConfig


class Rows:
    """40 rows of a fixed random regression-as-classification problem."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)

    def __len__(self) -> int:
        return 40

    def get(self, rows, seed: int = 0) -> dict:
        return {"x": self.x[rows], "labels": self.y[rows]}


def setup(lr: float = 0.1, dropout: float = 0.5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 3))
    method = Erm(ErmConfig(lr=lr, epochs=3, batch_size=8, lr_decay_epochs=[], optimizer="adam"))
    backend = SingleProcessBackend(device="cpu")
    model, _ = backend.prepare(model, None, method.config.build_optimizer)
    return model, method, backend


def loop(model, method, backend, **kwargs):
    return run_loop(method, backend, model, None, {"retain": Rows()}, lambda m, b: m(b["x"]), seed=0,
                    epochs=3, progress=False, **kwargs)  # fmt: skip


def state(model, backend) -> tuple[dict, dict]:
    return {k: v.clone() for k, v in model.state_dict().items()}, backend.optimizer.state_dict()


def test_an_exploding_loss_stops_the_run_before_its_step():
    model, method, backend = setup()
    before = []
    calls = {"n": 0}

    def forward(m, b):
        calls["n"] += 1
        before.append({k: v.clone() for k, v in m.state_dict().items()})
        scale = 1e6 if calls["n"] == 7 else 1.0  # step 7's loss explodes
        return m(b["x"]) * scale

    with pytest.raises(DivergenceError, match=r"exploding \(\|loss\| > 10000\).*epoch 2, step 2"):
        run_loop(method, backend, model, None, {"retain": Rows()}, forward, seed=0, epochs=3,
                 progress=False, max_abs_loss=1e4)  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(after[k], before[-1][k]) for k in after)  # the bad step was not applied


def test_a_non_finite_loss_stops_the_run_even_without_a_bound():
    model, method, backend = setup()
    with pytest.raises(DivergenceError, match="non-finite"):
        run_loop(method, backend, model, None, {"retain": Rows()}, lambda m, b: m(b["x"]) * float("nan"),
                 seed=0, epochs=3, progress=False, max_abs_loss=None)  # fmt: skip


def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_weights():
    model, method, backend = setup()
    loop(model, method, backend)
    expected = state(model, backend)[0]

    model, method, backend = setup()
    asked = {"n": 0}
    saved = {}

    def should_stop() -> bool:
        asked["n"] += 1
        return asked["n"] == 8  # epoch 2, step 3 of 5

    def on_stop(position: dict) -> None:
        saved.update(position=position, model=state(model, backend), rng=torch.get_rng_state())

    with pytest.raises(PreemptedError, match="epoch 2, min step 3"):
        loop(model, method, backend, hooks=LoopHooks(should_stop=should_stop, on_stop=on_stop))
    assert saved["position"]["epoch"] == 2 and saved["position"]["step"] == 3

    model, method, backend = setup()  # a new process: restore what the checkpoint holds
    model.load_state_dict(saved["model"][0])
    backend.optimizer.load_state_dict(saved["model"][1])
    torch.set_rng_state(saved["rng"])  # dropout draws go on as in the uninterrupted run
    loop(model, method, backend, start=saved["position"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


class RankOneOfTwo(SingleProcessBackend):
    """Rank 1 of a 2-rank world whose rank 0 is imagined: with one-row global batches, rank 1's share is always
    empty, so every micro-batch it runs is a zero-weight stand-in (backends/base.py)."""

    rank, world_size = 1, 2

    def sum_across_ranks(self, value):
        return value if isinstance(value, list) else value + 1.0  # rank 0's counted row


@pytest.mark.parametrize(
    "backend_class, batch, moves", [(RankOneOfTwo, 1, False), (SingleProcessBackend, 2, True)]
)
def test_a_stand_in_micro_batch_leaves_batchnorm_statistics_as_they_were(backend_class, batch, moves):
    """The BatchNorm policy: a stand-in row is not data, so its forward must not move the running statistics
    (nor its gradient the weights); real rows do move them. (A one-row stand-in in train mode would not even
    run through BatchNorm1d: "Expected more than 1 value per channel when training".)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    method = Erm(
        ErmConfig(lr=0.1, epochs=1, batch_size=batch, lr_decay_epochs=[], optimizer="sgd", weight_decay=0.0)
    )
    backend = backend_class(device="cpu")
    model, _ = backend.prepare(model, None, method.config.build_optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_loop(method, backend, model, None, {"retain": Rows()}, lambda m, b: m(b["x"]), seed=0, epochs=1,
             progress=False)  # fmt: skip
    after = model.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "0.weight"):
        assert (not torch.equal(before[key], after[key])) == moves, key
    assert model[1].training  # the loop's train mode is back after each stand-in
