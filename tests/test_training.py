"""Training: losses against hand-computed values, sampler, schedule, a short run, resume."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import kill_in_epoch_two
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError
from medunet.training import DiceCELoss, parse_duration, soft_dice_loss, train
from medunet.training.optim import (
    ModelEMA,
    backward_and_step,
    build_optimizer,
    clip_gradients,
    load_optimizer_state,
    optimizer_state,
)
from medunet.training.sampler import PatchSampler
from medunet.training.schedule import cosine_with_warmup, learning_rate, poly, step_decay
from medunet.training.trainer import train_folds


def test_parse_duration():
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h") == 3600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    for bad in ["", "abc", "10 minutes", "0s"]:
        with pytest.raises(InputError):
            parse_duration(bad)


def test_soft_dice_hand_computed():
    # two pixels, two classes; logits so large that softmax is exactly one-hot
    logits = torch.tensor([[[[50.0, -50.0]], [[-50.0, 50.0]]]])  # pred: class 0 then class 1
    target = torch.tensor([[[1, 1]]])  # both pixels are class 1
    # class 1: inter 1, |p| 1, |g| 2 -> Dice 2/3 -> loss 1/3 (background excluded)
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 / 3, abs=1e-4)
    # CE: pixel 1 has -log(softmax) ~ 100, pixel 2 ~ 0 -> mean 50
    loss = DiceCELoss()(logits, target)
    assert loss.item() == pytest.approx(1 / 3 + 50.0, rel=1e-3)


def test_dice_ce_gradient_points_to_the_target():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    target = torch.ones(1, 4, 4, dtype=torch.long)
    DiceCELoss()(logits, target).backward()
    # raising the target class logit lowers the loss: its gradient is negative
    assert (logits.grad[:, 1] < 0).all() and (logits.grad[:, 0] > 0).all()


def test_sampler_foreground_oversampling():
    lab = np.zeros((64, 64), np.uint8)
    lab[60:63, 2:5] = 1  # one tiny object in a corner
    img = lab[None].astype(np.float32)
    s = PatchSampler([img], [lab], (16, 16), batch_size=32, fg_oversample=1.0,
                     rng=np.random.default_rng(0))
    x, y = s.sample()
    assert x.shape == (32, 1, 16, 16) and y.shape == (32, 16, 16)
    assert all(y[i].any() for i in range(32))
    np.testing.assert_array_equal(x[:, 0], y)  # image and label crops are aligned


def test_sampler_pads_small_cases():
    lab = np.ones((5, 7), np.uint8)
    s = PatchSampler([lab[None].astype(np.float32)], [lab], (8, 8), 2, rng=np.random.default_rng(0))
    x, y = s.sample()
    assert x.shape == (2, 1, 8, 8) and y.sum() == 2 * 35


def test_cosine_schedule():
    assert cosine_with_warmup(0.0, 1.0, 0.0, 0.1) == pytest.approx(0.01)
    assert cosine_with_warmup(0.05, 1.0, 0.0, 0.1) == pytest.approx(0.5)
    assert cosine_with_warmup(0.1, 1.0, 0.0, 0.1) == pytest.approx(1.0)
    assert cosine_with_warmup(0.55, 1.0, 0.0, 0.1) == pytest.approx(0.5)
    assert cosine_with_warmup(1.0, 1.0, 1e-6, 0.1) == pytest.approx(1e-6)
    assert cosine_with_warmup(2.0, 1.0, 1e-6, 0.1) == pytest.approx(1e-6)


def test_poly_and_step_schedules():
    # nnU-Net's poly: lr * (1 - p) ** 0.9
    assert poly(0.0, 0.01) == pytest.approx(0.01)
    assert poly(0.5, 0.01) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly(1.0, 0.01) == 0.0
    assert step_decay(0.49, 1.0) == 1.0
    assert step_decay(0.5, 1.0) == pytest.approx(0.1)
    assert step_decay(0.8, 1.0) == pytest.approx(0.01)
    t = {"lr": 0.01, "schedule": "poly"}
    assert learning_rate(t, 0.5) == pytest.approx(poly(0.5, 0.01))
    with pytest.raises(InputError, match="unknown schedule"):
        learning_rate({"lr": 1.0, "schedule": "linear"}, 0.5)


def test_optimizers_from_the_plan():
    net = torch.nn.Linear(2, 2)
    sgd = build_optimizer(net, {"optimizer": "sgd", "lr": 0.01, "weight_decay": 3e-5})
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    assert isinstance(build_optimizer(net, {"lr": 1e-3}), torch.optim.AdamW)
    with pytest.raises(InputError, match="unknown optimizer"):
        build_optimizer(net, {"optimizer": "lamb", "lr": 1e-3})


def test_ema_hand_computed():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = ModelEMA(net, decay=0.99)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # first update: decay ramps to min(0.99, 2/11)
    d = 2 / 11
    assert ema.module.weight.item() == pytest.approx((1 - d) * 1.0)
    with torch.no_grad():
        net.weight.fill_(2.0)
    ema.update(net)  # second: min(0.99, 3/12) = 0.25
    assert ema.module.weight.item() == pytest.approx(0.25 * (1 - d) + 0.75 * 2.0)
    with pytest.raises(InputError):
        ModelEMA(net, decay=1.5)
    with pytest.raises(InputError, match="ema_every"):
        ModelEMA(net, decay=0.99, every=0)
    with pytest.raises(InputError, match="ema_every"):
        ModelEMA(net, decay=0.99, every="four")
    with pytest.raises(InputError, match="training.ema "):
        ModelEMA(net, decay="high")


def test_ema_every_k_steps_folds_in_with_the_decay_to_the_kth_power():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = ModelEMA(net, decay=0.5, every=2)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # step 1: skipped
    assert ema.module.weight.item() == 0.0
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net)  # step 2: min(0.5, 3/12) = 0.25, squared
    d = 0.25 ** 2
    assert ema.module.weight.item() == pytest.approx((1 - d) * 3.0)


def _small_unet(seed: int = 0) -> torch.nn.Module:
    from medunet.nets import build_network
    torch.manual_seed(seed)
    return build_network(2, 3, 2, "default", features=[8, 16, 32], strides=[[2, 2]] * 2, norm="batch",
                         down="maxpool", up="transpose", act="leakyrelu")


def test_channels_last_weights_step_like_plain_adamw():
    """The optimiser works on contiguous views of channels_last weights (for the fused kernels):
    the weights after a few steps equal those of stock AdamW on the same network."""
    import copy
    net = _small_unet().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(net)
    opt = build_optimizer(net, {"lr": 1e-2, "weight_decay": 1e-4})
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=1e-4)
    views = [p for g in opt.param_groups for p in g["params"]]
    pairs = zip(views, net.parameters(), strict=True)
    assert any(v.data_ptr() == p.data_ptr() and v.shape != p.shape for v, p in pairs)
    assert all(v.is_contiguous() for v in views)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        backward_and_step(net(x).square().mean(), net, opt, scaler, clip=12.0)
        ref_opt.zero_grad(set_to_none=True)
        ref(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 12.0)
        ref_opt.step()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a checkpoint of this optimiser loads back, and so does stock AdamW's (moments in the weights'
    # own dimension order): both continue exactly like the uninterrupted reference
    ref_state = copy.deepcopy(ref_opt.state_dict())  # state dicts alias the live moments
    for state in (copy.deepcopy(optimizer_state(opt)), copy.deepcopy(ref_state)):
        ref_opt.zero_grad(set_to_none=True)  # deep copies below must not carry old gradients
        net2 = copy.deepcopy(ref).to(memory_format=torch.channels_last)
        opt2 = build_optimizer(net2, {"lr": 1e-2, "weight_decay": 1e-4})
        load_optimizer_state(opt2, state, "last.pt")
        backward_and_step(net2(x).square().mean(), net2, opt2, scaler, clip=None)
        ref2 = copy.deepcopy(ref)
        ref2_opt = torch.optim.AdamW(ref2.parameters(), lr=1e-2, weight_decay=1e-4)
        ref2_opt.load_state_dict(copy.deepcopy(ref_state))
        ref2(x).square().mean().backward()
        ref2_opt.step()
        for a, b in zip(net2.parameters(), ref2.parameters(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # moments that do not fit this network are refused
    other_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(5)) for _ in net.parameters()])
    for p in other_opt.param_groups[0]["params"]:
        p.grad = torch.ones(5)
    other_opt.step()
    with pytest.raises(InputError, match="last.pt.*without --resume"):
        load_optimizer_state(build_optimizer(net, {"lr": 1e-2}), other_opt.state_dict(), "last.pt")


def test_clip_gradients_rescales_only_above_the_limit():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # global norm 5
    clip_gradients([a, b], 10.0)
    assert a.grad.tolist() == [3.0, 0.0] and b.grad.tolist() == [4.0]
    clip_gradients([a, b], 1.0)
    assert a.grad[0].item() == pytest.approx(0.6, rel=1e-5) and b.grad.item() == pytest.approx(0.8, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "d", n_train=5, n_test=2,
                                  shape=(32, 32), seed=3)


FAST = {"training.iterations_per_epoch": 3}


def test_train_writes_model_dir_and_resumes(tiny_data, tmp_path):
    model = tmp_path / "m"
    res = train(tiny_data, model, epochs=2, overrides=FAST, progress=False)
    assert res.epochs == 2 and res.iterations == 6
    for name in ("plan.json", "splits.json", "checkpoint_last.pt", "checkpoint_best.pt", "log.csv",
                 "curves.png", "validation/report.html", "validation/scores.json"):
        assert (model / name).is_file(), name
    # the validation report scores exactly the validation case, predicted by the best checkpoint
    scores = json.loads((model / "validation" / "scores.json").read_text())
    split = json.loads((model / "splits.json").read_text())
    assert [c["case"] for c in scores["cases"]] == split["val"]
    # test-time mirroring was tried on the validation cases and kept only for a real gain
    inference = json.loads((model / "plan.json").read_text())["inference"]
    choice = inference["tta_choice"]
    assert choice["cases"] == 1 and choice["min_gain"] == 0.005
    assert inference["tta"] == ("flip" if choice["flip"] - choice["none"] >= 0.005 else "none")
    assert not [p for p in (model / "validation").iterdir() if p.name.startswith(".tta")]
    split = json.loads((model / "splits.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 4
    rows = list(csv.DictReader((model / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_dice", "val_dice_lesion", "lr", "data_wait_share"} <= set(rows[0])
    assert all(0.0 <= float(r["val_dice"]) <= 1.0 for r in rows)
    # no temporary checkpoint files are left behind
    assert not [p for p in model.iterdir() if p.name.startswith(".")]

    with pytest.raises(InputError, match="already holds a run"):
        train(tiny_data, model, epochs=2, overrides=FAST, progress=False)
    # extend the finished run: the epoch counter continues from 2
    res = train(tiny_data, model, epochs=3, resume=True, progress=False, report=False)
    assert res.epochs == 3 and res.iterations == 9
    rows = list(csv.DictReader((model / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_resume_without_checkpoint_is_an_input_error(tiny_data, tmp_path):
    with pytest.raises(InputError, match="nothing to resume"):
        train(tiny_data, tmp_path / "none", epochs=1, resume=True, progress=False, report=False)


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_data, tmp_path):
    """Kill a run (SIGKILL) during epoch 2, resume with the same command: the weights after
    epoch 2 equal those of a run that was never interrupted."""
    ov = {"training.iterations_per_epoch": 40, "training.augment": {"flip": 0.5, "rot90": 0.5},
          "training.ema": 0.9}
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_data, a, epochs=2, overrides=ov, progress=False, precision="fp32", report=False)
    code = (
        "import sys; from medunet.training import train; "
        f"train({str(tiny_data)!r}, {str(b)!r}, epochs=2, overrides={ov!r}, progress=False, "
        "precision='fp32', report=False)"
    )
    kill_in_epoch_two(code, b)
    train(tiny_data, b, epochs=2, resume=True, progress=False, precision="fp32", report=False)
    sa = torch.load(a / "checkpoint_last.pt", weights_only=True)
    sb = torch.load(b / "checkpoint_last.pt", weights_only=True)
    assert sb["state"]["epoch"] == 2 and sb["state"]["iteration"] == sa["state"]["iteration"]
    for k in sa["model"]:
        assert torch.allclose(sa["model"][k].float(), sb["model"][k].float(), atol=1e-6), k
    for k in sa["ema_model"]:  # the EMA (used for validation and saved) resumes too
        assert torch.allclose(sa["ema_model"][k].float(), sb["ema_model"][k].float(), atol=1e-6), k
    assert sb["ema"]["updates"] == sa["ema"]["updates"] == sa["state"]["iteration"]
    rows = list(csv.DictReader((b / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_time_budget_stops(tiny_data, tmp_path):
    res = train(tiny_data, tmp_path / "m", time_budget="4s", overrides=FAST, progress=False,
                report=False)
    assert res.epochs >= 1
    # the run stops once the next step and a validation would pass the budget; the first
    # epoch has no estimate yet, so allow one epoch of overrun (machines under load are slow)
    assert res.seconds < 4 + res.history[0]["epoch_seconds"] + 1
    assert math.isfinite(res.best_dice)


def test_early_stopping_stops(tiny_data, tmp_path):
    # min_delta 2.0: no Dice can beat the start (-1) by 2, so patience 2 stops after epoch 2
    ov = {**FAST, "training.patience": 2, "training.min_delta": 2.0, "training.patience_after": 0.0}
    res = train(tiny_data, tmp_path / "m", epochs=10, overrides=ov, progress=False, report=False)
    assert res.epochs == 2
    state = torch.load(tmp_path / "m" / "checkpoint_last.pt", weights_only=True)["state"]
    assert state["stopped_early"] and state["stale_epochs"] == 2
    assert len(list(csv.DictReader((tmp_path / "m" / "log.csv").open()))) == res.epochs
    # by default the patience counts only in the second half of the run: epochs 5 and 6 of 10
    del ov["training.patience_after"]
    res = train(tiny_data, tmp_path / "d", epochs=10, overrides=ov, progress=False, report=False)
    assert res.epochs == 6


def test_ema_is_validated_and_served(tiny_data, tmp_path):
    from medunet.inference.predictor import load_network

    model = tmp_path / "m"
    train(tiny_data, model, epochs=1, overrides={**FAST, "training.ema": 0.5}, progress=False,
          report=False, precision="fp32")
    ckpt = torch.load(model / "checkpoint_best.pt", weights_only=True)
    assert ckpt["ema_model"] is not None
    _, net, _ = load_network(model)
    key = next(k for k in ckpt["model"] if k.endswith("weight"))
    assert torch.equal(net.state_dict()[key], ckpt["ema_model"][key])
    assert not torch.equal(ckpt["model"][key], ckpt["ema_model"][key])


def test_folds_share_plan_and_partition(tiny_data, tmp_path):
    from medunet.inference import Predictor

    model = tmp_path / "cv"
    results = train_folds(tiny_data, model, n_folds=2, epochs=1, overrides=FAST, progress=False)
    assert [r.model_dir.name for r in results] == ["fold_0", "fold_1"]
    folds = json.loads((model / "splits.json").read_text())["folds"]
    vals = [set(f["val"]) for f in folds]
    assert not vals[0] & vals[1] and len(vals[0] | vals[1]) == 5  # a partition of the 5 cases
    for k, f in enumerate(folds):
        own = json.loads((model / f"fold_{k}" / "splits.json").read_text())
        assert own["val"] == f["val"] and not set(own["train"]) & set(own["val"])
    # the choice on the pooled out-of-fold predictions is stored in the parent's plan
    assert "postprocessing" in json.loads((model / "plan.json").read_text())["inference"]
    assert len(Predictor.load(model).members) == 2
    with pytest.raises(InputError, match="already holds folds"):
        train_folds(tiny_data, model, n_folds=2, epochs=1, overrides=FAST, progress=False)
    res = train(tiny_data, model, fold="all", epochs=1, overrides=FAST, progress=False, report=False)
    split = json.loads((res.model_dir / "splits.json").read_text())
    assert res.model_dir.name == "fold_all" and split["train"] == split["val"] and len(split["val"]) == 5
    with pytest.raises(InputError, match="fold 7 does not exist"):
        train(tiny_data, model, fold=7, epochs=1, overrides=FAST, progress=False)


def test_tensorboard_events(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_data, tmp_path / "m", epochs=2, overrides=FAST, progress=False, report=False,
          tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "m" / "tensorboard"))
    acc.Reload()
    assert {"train/train_loss", "val/val_dice", "train/lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("val/val_dice")] == [1, 2]


def test_multi_channel_3d_trains_and_predicts(tmp_dataset, tmp_path):
    """Four MRI-like sequences per case (CASE_0000..CASE_0003, NIfTI, anisotropic spacing):
    plan, train, and predict through the same path as one channel."""
    from medunet.inference import Predictor
    from medunet.io import read_image

    root = tmp_dataset(n_train=3, n_test=1, shape=(16, 16, 8), channel_files=4, spacing=(1.0, 1.0, 2.0))
    res = train(root, tmp_path / "m", epochs=1, overrides={"training.iterations_per_epoch": 2},
                progress=False, report=False)
    plan = json.loads((res.model_dir / "plan.json").read_text())
    assert plan["in_channels"] == 4 and plan["dim"] == 3 and len(plan["normalization"]) == 4
    written = Predictor.load(res.model_dir).predict(root / "imagesTs", tmp_path / "p", progress=False)
    assert len(written) == 1 and written[0].name.endswith(".nii.gz")
    image, geom = read_image(sorted((root / "imagesTs").iterdir())[0])
    label, lgeom = read_image(written[0])
    assert label.shape[1:] == image.shape[1:]
    np.testing.assert_allclose(lgeom.spacing, geom.spacing)


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(tiny_data, tmp_path):
    """--compile: the compiled network trains; checkpoints hold the plain network's keys, so
    they load without torch.compile. Run in a fresh process: inductor's code cache must not
    see state other tests left in this one."""
    import os

    from medunet.inference.predictor import load_network

    code = (f"from medunet.training import train; r = train({str(tiny_data)!r}, {str(tmp_path / 'm')!r}, "
            "epochs=1, overrides={'training.iterations_per_epoch': 2}, progress=False, report=False, "
            "compile=True, precision='fp32'); assert r.iterations == 2")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600,
                   env={**os.environ, "PYTHONUTF8": "1"})
    ckpt = torch.load(tmp_path / "m" / "checkpoint_last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    load_network(tmp_path / "m")


def test_training_on_cpu_flushes_denormals(tiny_data, tmp_path, monkeypatch):
    """Denormal floats (late-training gradients and moments) are ~20 % of a CPU step's time
    unless flushed; train() flushes them during its steps and gives the caller its mode back."""
    from medunet.runtime import denormals_flushed
    from medunet.training.loop import SupervisedMode

    torch.set_flush_denormal(False)
    seen: list[bool] = []
    step = SupervisedMode.step
    monkeypatch.setattr(SupervisedMode, "step", lambda self, *a: (seen.append(denormals_flushed()),
                                                                  step(self, *a))[1])
    train(tiny_data, tmp_path / "m", epochs=1, device="cpu", progress=False, report=False,
          overrides={"training.iterations_per_epoch": 1, "patch_size": [16, 16]})
    assert seen == [True]
    assert not denormals_flushed()  # restored: numpy and torch arithmetic after train() as before
    assert torch.tensor([1e-40], dtype=torch.float32).item() != 0.0


def test_subset_validation_logs_share_and_chooses_on_the_full_set(tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", n_train=30, n_test=0, shape=(32, 32), seed=4)
    model = tmp_path / "m"
    ov = {**FAST, "training.val_time_share": 1e-9, "training.val_min_cases": 2}
    res = train(data, model, epochs=2, overrides=ov, progress=False, report=False)
    rows = list(csv.DictReader((model / "log.csv").open()))
    assert int(rows[0]["val_cases"]) == 2 and 0 < float(rows[0]["val_share"]) < 1
    # two cases cost more than a nearly zero share: the second epoch is not validated
    assert rows[1]["val_dice"] == "nan" and int(rows[1]["val_cases"]) == 0
    choice = json.loads((model / "selection.json").read_text())
    assert choice["cases"] == 6 and choice["subset_cases"] == 2 and choice["chosen"] in ("best", "last")
    assert choice["last_epoch"] == 2 == res.epochs
    best = torch.load(model / "checkpoint_best.pt", weights_only=True)
    expected = max(choice["last_dice"], choice.get("best_dice", -1.0))
    assert res.best_dice == pytest.approx(expected)  # the full-set score of what checkpoint_best holds
    if choice["chosen"] == "last":
        assert best["state"]["epoch"] == 2 and best["state"]["best_dice"] == pytest.approx(expected)
    else:
        assert best["state"]["epoch"] == choice["best_epoch"] == 1


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    from medunet.training import trainer

    real = trainer._loss

    def nan_from_step_3(plan, net):
        fn, calls = real(plan, net), [0]

        def loss(out, y):
            calls[0] += 1
            value = fn(out, y)
            return value * float("nan") if calls[0] >= 3 else value

        return loss

    monkeypatch.setattr(trainer, "_loss", nan_from_step_3)
    real_pp = trainer.preprocess_dataset  # in this process: a worker pool costs more than 5 tiny cases
    monkeypatch.setattr(trainer, "preprocess_dataset", lambda *a, **k: real_pp(*a, **{**k, "workers": 1}))
    model = tmp_path / "m"
    with pytest.raises(InputError, match=r"training loss is nan at step 3; checkpoint_last.pt \(epoch 1\)"):
        train(tiny_data, model, epochs=3, overrides={"training.iterations_per_epoch": 2}, progress=False,
              report=False)
    state = torch.load(model / "checkpoint_last.pt", weights_only=True)
    assert state["state"]["epoch"] == 1 and state["state"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [int(r["epoch"]) for r in csv.DictReader((model / "log.csv").open())] == [1]
    assert not (model / ".train.lock").exists()  # the run's lock goes with it, even on an error


def test_a_second_run_into_the_same_directory_is_refused(tiny_data, tmp_path):
    from medunet.files import exclusive_lock

    model = tmp_path / "m"
    with (exclusive_lock(model / ".train.lock", "busy", "wait"),  # as a running train() holds it
          pytest.raises(InputError, match="another training run is writing to this directory")):
        train(tiny_data, model, epochs=1, overrides=FAST, progress=False, report=False)
    assert not model.exists()  # refused before writing anything; the holder's folder is cleaned up
    with (exclusive_lock(model / "fold_1" / ".train.lock", "busy", "wait"),
          pytest.raises(InputError, match="another training run")):
        train(tiny_data, model, fold=1, epochs=1, overrides=FAST, progress=False, report=False)
    assert not (model / "plan.json").exists()
