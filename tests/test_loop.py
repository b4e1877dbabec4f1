"""The one training loop on its own: a fake mode with scripted losses, injected validation
scores and a fake clock, so early stopping, budgets, resume and the validation share are
checked exactly and in milliseconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from medunet.errors import InputError
from medunet.training.loop import Loop, Mode, ValidationSet, validate_patience


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeMode(Mode):
    """Each step costs ``step_cost`` seconds of the fake clock and moves one weight by the lr."""

    def __init__(self, clock: Clock, step_cost: float = 1.0, losses: list[float] | None = None,
                 die_at: int | None = None) -> None:
        self.net = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.net.weight)
        self.clock, self.step_cost, self.losses, self.die_at = clock, step_cost, losses, die_at
        self.steps = 0
        self.lrs: list[float] = []

    def draw(self) -> None:
        return None

    def step(self, batch: None, lr: float) -> dict[str, float]:
        if self.steps + 1 == self.die_at:
            raise KeyboardInterrupt  # the process is killed here
        self.clock.now += self.step_cost
        with torch.no_grad():
            self.net.weight += lr
        self.lrs.append(lr)
        self.steps += 1
        loss = self.losses[self.steps - 1] if self.losses else 1.0 / self.steps
        return {"loss": loss, "aux": 2.0}

    def checkpoint(self) -> dict:
        return {"model": self.net.state_dict(), "ema_model": None, "steps": self.steps}

    def restore(self, ckpt: dict, source: str) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.steps = ckpt["steps"]

    def reseed(self, seed: int) -> None:
        pass  # draws nothing at random


class ScriptedValidation(ValidationSet):
    """Validation whose Dice is scripted per pass (tp = s, fp = fn = 1 - s gives Dice s; a list
    scripts each case's); a new
    pass starts when the network scored or the loop's epoch changes. Each case costs
    ``case_cost`` seconds of the fake clock."""

    def __init__(self, n: int, scores: list[float], clock: Clock, case_cost: float = 0.0) -> None:
        super().__init__([None] * n, [None] * n)
        self.scores, self.clock, self.case_cost = scores, clock, case_cost
        self.loop: Loop | None = None
        self.passes: list[tuple] = []
        self.scored: list[int] = []

    def counts(self, net, i, plan, device, precision) -> np.ndarray:
        key = (id(net), self.loop.state.epoch if self.loop else 0)
        if not self.passes or self.passes[-1] != key:
            self.passes.append(key)
        self.clock.now += self.case_cost
        self.scored.append(i)
        s = self.scores[min(len(self.passes) - 1, len(self.scores) - 1)]
        s = s[i] if isinstance(s, (list, tuple)) else s  # one score per case, or one for all
        return np.array([[0, s], [0, 1 - s], [0, 1 - s]])


def _bind(loop: Loop) -> Loop:
    loop.val.loop = loop
    return loop


def _plan(**training) -> SimpleNamespace:
    t = {"iterations_per_epoch": 2, "lr": 1.0, "schedule": "poly", "epochs": 3, **training}
    return SimpleNamespace(training=t, num_classes=2, label_names=["background", "fg"])


def _loop(tmp_path: Path, clock: Clock, scores: list[float], n_val: int = 4, mode: FakeMode | None = None,
          **kw) -> Loop:
    plan = kw.pop("plan", None) or _plan()
    return _bind(Loop(mode or FakeMode(clock), plan, tmp_path, ScriptedValidation(n_val, scores, clock),
                      torch.device("cpu"), "fp32", clock=clock, **kw))


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader((path / "log.csv").open()))


def test_epochs_log_checkpoints_and_lr(tmp_path):
    clock = Clock()
    loop = _loop(tmp_path, clock, [0.2, 0.5, 0.4], epochs=3)
    loop.run("test", progress=False)
    rows = _rows(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and loop.state.iteration == 6
    assert [float(r["val_dice"]) for r in rows] == pytest.approx([0.2, 0.5, 0.4])
    assert rows[0]["aux"] == "2.0" and float(rows[0]["train_loss"]) == pytest.approx((1 + 1 / 2) / 2)
    assert loop.mode.lrs == pytest.approx([(1 - i / 6) ** 0.9 for i in range(6)])  # poly by iterations
    last = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert last["state"]["epoch"] == 3 and last["steps"] == 6
    assert (tmp_path / "curves.png").is_file()
    # epoch 2's 0.5 was one validation's luck: the full set scores its weights as the last ones
    # (0.4), so checkpoint_best.pt serves the last weights
    choice = json.loads((tmp_path / "selection.json").read_text())
    assert choice["best_epoch"] == 2 and choice["best_dice"] == pytest.approx(0.4) == choice["last_dice"]
    assert choice["chosen"] == "last" and choice["p_best_better"] == 1.0
    best = torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)
    assert best["state"]["epoch"] == 3 and best["state"]["best_dice"] == pytest.approx(0.4)


def test_early_stopping_counts_only_after_patience_after(tmp_path):
    clock = Clock()
    plan = _plan(patience=2, patience_after=0.5, epochs=10)
    # six validations, then the final full-set pass of epoch 1's weights (0.9 on every case)
    loop = _loop(tmp_path, clock, [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9], plan=plan)
    loop.run("test", progress=False)
    # epochs 2-5 are before half of 10 epochs (by iterations: 0.2 .. 0.5 at the check):
    # the patience counts from epoch 5 (progress 0.5) and ends the run after epoch 6
    assert loop.state.stopped_early and loop.state.epoch == 6
    assert loop.state.best_dice == pytest.approx(0.9)  # the best weights, kept: better on every case


@pytest.mark.parametrize("smoothing,stops_after", [(1.0, 5), (0.3, None)])
def test_early_stopping_watches_the_smoothed_score(tmp_path, smoothing, stops_after):
    """A lucky 0.9 at epoch 2 of a run that then climbs from 0.60 by 0.02 per validation: the
    raw scores stay below it for three validations (patience 3) and end the run after epoch 5;
    smoothed with weight 0.3 (0.5, 0.62, 0.614, 0.6158, 0.6231, 0.6342, ...) the bar is 0.62,
    passed at epoch 5, and the run trains all 8 epochs."""
    clock = Clock()
    plan = _plan(patience=3, patience_after=0.0, epochs=8, patience_smoothing=smoothing)
    scores = [0.5, 0.9, 0.6, 0.62, 0.64, 0.66, 0.68, 0.70]
    loop = _loop(tmp_path, clock, scores + [0.7], plan=plan)
    loop.run("test", progress=False)
    assert loop.state.stopped_early == (stops_after is not None)
    assert loop.state.epoch == (stops_after or 8)
    if stops_after is None:
        want = 0.5
        for s in scores[1:]:
            want = 0.7 * want + 0.3 * s
        assert loop.state.smoothed_dice == pytest.approx(want) == pytest.approx(loop.state.best_smoothed)
        assert loop.state.stale_epochs == 0


def test_patience_smoothing_out_of_range_is_refused():
    validate_patience({})  # plans written before the field: the raw scores
    validate_patience({"patience_smoothing": 1})
    for bad in (0, 1.5, True, "0.3"):
        with pytest.raises(InputError, match="training.patience_smoothing = .* is out of range"):
            validate_patience({"patience_smoothing": bad})


def test_budget_stops_before_overrunning(tmp_path):
    clock = Clock()
    mode = FakeMode(clock, step_cost=1.0)
    loop = _loop(tmp_path, clock, [0.5], mode=mode, budget=7.0)
    loop.run("test", progress=False)
    assert clock.now <= 7.0
    assert mode.steps == 6  # a 7th step (1 s) would reach the budget
    assert loop.state.epoch == 3


def test_resume_restores_the_identical_state(tmp_path):
    clock_a = Clock()
    whole = _loop(tmp_path / "a", clock_a, [0.1, 0.3, 0.2, 0.6], epochs=4)
    (tmp_path / "a").mkdir()
    whole.run("test", progress=False)

    (tmp_path / "b").mkdir()
    clock_b = Clock()
    first = _loop(tmp_path / "b", clock_b, [0.1, 0.3], epochs=4, mode=FakeMode(clock_b, die_at=6))
    with pytest.raises(KeyboardInterrupt):
        first.run("test", progress=False)
    clock_c = Clock()
    second = _loop(tmp_path / "b", clock_c, [0.2, 0.6], epochs=4)
    second.resume(tmp_path / "b" / "checkpoint_last.pt")
    assert second.state.epoch == 2 and second.mode.steps == 4
    second.run("test", progress=False)

    a = torch.load(tmp_path / "a" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint_last.pt", weights_only=True)
    assert torch.equal(a["model"]["weight"], b["model"]["weight"])
    for key in ("epoch", "iteration", "best_dice", "stale_epochs"):
        assert a["state"][key] == b["state"][key], key
    assert [r["val_dice"] for r in _rows(tmp_path / "a")] == [r["val_dice"] for r in _rows(tmp_path / "b")]


def test_a_killed_epochs_log_row_is_not_repeated_on_resume(tmp_path):
    clock = Clock()
    loop = _loop(tmp_path, clock, [0.1], epochs=1)
    loop.run("test", progress=False)
    with (tmp_path / "log.csv").open("a") as f:  # a row written by an epoch killed before its checkpoint
        f.write(f"2,{','.join(['0'] * (len(_rows(tmp_path)[0]) - 1))}\n")
    again = _loop(tmp_path, Clock(), [0.2], epochs=2)
    again.resume(tmp_path / "checkpoint_last.pt")
    again.run("test", progress=False)
    assert [int(r["epoch"]) for r in _rows(tmp_path)] == [1, 2]


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path):
    clock = Clock()
    mode = FakeMode(clock, losses=[1.0, 0.5, float("nan"), 0.1])
    loop = _loop(tmp_path, clock, [0.5], mode=mode, epochs=2)
    with pytest.raises(InputError, match=r"loss is nan at step 3; checkpoint_last.pt \(epoch 1\)"):
        loop.run("test", progress=False)
    assert torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["state"]["epoch"] == 1


def _share_loop(tmp_path: Path, n_cases: int, case_cost: float, share: float = 0.15, n_min: int = 5):
    """A loop whose epoch trains 100 x 0.1 s = 10 s and whose cases each cost ``case_cost``."""
    clock = Clock()
    plan = _plan(val_time_share=share, val_min_cases=n_min, iterations_per_epoch=100)
    val = ScriptedValidation(n_cases, [2 / 3], clock, case_cost=case_cost)
    loop = _bind(Loop(FakeMode(clock), plan, tmp_path, val, torch.device("cpu"), "fp32", epochs=1,
                      clock=clock))
    loop.step_seconds = 0.1
    return loop, val


def test_validation_subset_stays_within_its_share(tmp_path):
    # 15 % of a 10 s epoch is 1.5 s; a case costs 0.1 s
    loop, val = _share_loop(tmp_path, 200, 0.1)
    dice, n = loop.validate_share()
    assert dice == pytest.approx([2 / 3]) and n == loop.state.val_cases
    assert n == 15 and loop.state.val_every == 1  # stops once 1.5 s are spent
    first = list(val.scored)
    assert first == loop.val_order[:15]  # in the run's fixed (seeded) order
    val.scored.clear()
    loop.validate_share()  # later epochs: the same cases, so their scores compare
    assert val.scored == first


def test_validation_of_few_slow_cases_runs_every_few_epochs(tmp_path):
    # 5 cases (the minimum) cost 5 s against a 1.5 s share: validate every 4th epoch
    loop, _ = _share_loop(tmp_path, 40, 1.0)
    _, n = loop.validate_share()
    assert n == 5 and loop.state.val_every == 4


@pytest.mark.parametrize("best_cases, chosen", [
    ([0.9, 0.5, 0.65], "last"),  # better on average (0.683 against 0.6), not case by case: p = 0.27
    ([0.75, 0.7], "last"),  # better on both of two cases, by 0.15 and 0.1: t = 5, 1 d.o.f., p = 0.063
    ([0.7, 0.66, 0.72, 0.69], "best"),  # better on every one of four cases: p = 0.003
])
def test_final_choice_keeps_the_best_only_when_it_is_better_case_by_case(tmp_path, best_cases, chosen):
    clock = Clock()
    n = len(best_cases)
    # validations: epoch 1 (the best by score), epoch 2 (the last); then the full-set passes of
    # the last weights (epoch 2's pass again) and of the best weights
    val = ScriptedValidation(n, [0.9, [0.6] * n, list(best_cases)], clock)
    loop = _bind(Loop(FakeMode(clock), _plan(epochs=2), tmp_path, val, torch.device("cpu"), "fp32", epochs=2,
                      clock=clock))
    loop.run("test", progress=False)
    choice = json.loads((tmp_path / "selection.json").read_text())
    assert choice["best_epoch"] == 1 and choice["last_dice"] == pytest.approx(0.6)
    assert choice["best_dice"] == pytest.approx(float(np.mean(best_cases)))
    assert choice["chosen"] == chosen and (choice["p_best_better"] < 0.05) == (chosen == "best")
    served = torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)["state"]["epoch"]
    assert served == (1 if chosen == "best" else 2)
    assert loop.state.best_dice == pytest.approx(choice[f"{chosen}_dice"])


def test_small_validation_sets_are_scored_whole(tmp_path):
    # DRIVE-like: 4 validation images, cheap next to training -> every case, every epoch
    loop, val = _share_loop(tmp_path, 4, 0.2)
    _, n = loop.validate_share()
    assert n == 4 and loop.state.val_every == 1 and sorted(val.scored) == [0, 1, 2, 3]


def test_final_choice_scores_the_full_set_and_keeps_the_better(tmp_path):
    clock = Clock()
    plan = _plan(val_time_share=1e-9, val_min_cases=2, epochs=3)
    # validations: epoch 1 subset 0.3, epoch 2 and 3 skipped (val_every), then the full-set
    # passes: last weights 0.4, best-by-subset (epoch 1) 0.7 -> the best is kept
    val = ScriptedValidation(6, [0.3, 0.4, 0.7], clock, case_cost=1.0)
    loop = _bind(Loop(FakeMode(clock), plan, tmp_path, val, torch.device("cpu"), "fp32", epochs=3,
                      clock=clock))
    loop.run("test", progress=False)
    choice = json.loads((tmp_path / "selection.json").read_text())
    assert choice["subset_cases"] == 2 and choice["cases"] == 6
    assert choice["last_dice"] == pytest.approx(0.4) and choice["best_dice"] == pytest.approx(0.7)
    assert choice["chosen"] == "best" and loop.state.best_dice == pytest.approx(0.7)
