"""Distillation and pruning: exact pruning at full width, the KD loss, a short distillation run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import kill_in_epoch_two
from medunet.datasets.synthetic import make_synthetic_dataset
from medunet.errors import InputError
from medunet.nets import build_network
from medunet.training import train
from medunet.training.distill import (
    PruneError,
    count_parameters,
    distill,
    distillation_loss,
    kd_loss,
    prune_unet,
    scale_features,
    student_plan,
)
from medunet.training.losses import DiceCELoss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


VARIANTS = {
    "default": dict(preset="default"),
    "large": dict(preset="large"),  # instance norm, strided-conv down-sampling
    "residual_ds": dict(preset="default", residual=True, deep_supervision=True),
    "interp_group": dict(preset="default", up="interp", norm="group", n_convs=1),
    "classic": dict(preset="classic"),  # no norm: biased convs
}


def _pair(dims: int, features: list[int], width: float, **kw):
    torch.manual_seed(0)
    strides = [2] * (len(features) - 1)
    teacher = build_network(dims, 2, 3, features=features, strides=strides, **kw)
    student = build_network(dims, 2, 3, features=scale_features(features, width), strides=strides, **kw)
    # non-trivial BatchNorm statistics, so a mis-sliced running mean would show
    for m in teacher.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return teacher, student


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prune_at_full_width_reproduces_the_teacher(name):
    teacher, student = _pair(2, [8, 16, 24], 1.0, **VARIANTS[name])
    prune_unet(teacher, student)
    x = torch.randn(2, 2, 20, 28)
    teacher.eval(), student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)
    # training mode too (batch statistics, deep-supervision outputs)
    teacher.train(), student.train()
    with torch.no_grad():
        a, b = teacher(x), student(x)
    for ta, sb in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
        torch.testing.assert_close(sb, ta, rtol=0, atol=0)


def _silence(net, gen: torch.Generator) -> None:
    """Make a random half of every hidden channel set exactly zero (filters, bias, norm affine),
    so removing those channels cannot change the output: a pruned copy that maps its indices
    right (through the concatenations, transposed convs, shortcuts and heads) then equals it."""
    from medunet.nets.unet import ConvBlock

    def kill(layers, idx):
        for m in layers:
            if isinstance(m, torch.nn.modules.conv._ConvTransposeNd):
                m.weight.data[:, idx] = 0
            elif isinstance(m, torch.nn.modules.conv._ConvNd):
                m.weight.data[idx] = 0
            if getattr(m, "bias", None) is not None:
                m.bias.data[idx] = 0
            if getattr(m, "weight", None) is not None and not isinstance(m, torch.nn.modules.conv._ConvNd):
                m.weight.data[idx] = 0  # norm affine: output 0 whatever the statistics

    def drop(n):
        return torch.randperm(n, generator=gen)[: n - scale_features([n], 0.5)[0]]

    with torch.no_grad():
        for block in [*net.encoders, *net.decoders]:
            assert isinstance(block, ConvBlock)
            body = list(block.body)
            convs = [i for i, m in enumerate(body) if isinstance(m, torch.nn.modules.conv._ConvNd)]
            for j, i in enumerate(convs):
                idx = drop(body[i].out_channels)
                kill(body[i:i + 2], idx)
                if j == len(convs) - 1 and isinstance(block.shortcut, torch.nn.Sequential):
                    kill(list(block.shortcut), idx)
        for seq in [*net.downs, *net.ups]:
            layers = list(seq) if isinstance(seq, torch.nn.Sequential) else [seq]
            conv = next((m for m in layers if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
            if conv is not None:
                kill(layers, drop(conv.out_channels))


@pytest.mark.parametrize("name", ["default", "large", "residual_ds", "classic"])
def test_prune_at_half_width_maps_every_index(name):
    teacher, student = _pair(2, [8, 16, 24], 0.5, **VARIANTS[name])
    _silence(teacher, torch.Generator().manual_seed(3))
    prune_unet(teacher, student)
    x = torch.randn(2, 2, 20, 28)
    teacher.eval(), student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x))
    # and a wrong mapping would show: shuffle the skip half of one decoder's input channels
    first = student.decoders[0].body[0]
    with torch.no_grad():
        n = first.in_channels // 2
        first.weight.data[:, n:] = first.weight.data[:, n:].roll(1, dims=1)
        assert not torch.allclose(student(x), teacher(x))


def test_prune_3d_full_width_exact():
    teacher, student = _pair(3, [4, 8], 1.0, preset="default", residual=True)
    prune_unet(teacher, student)
    x = torch.randn(1, 2, 8, 12, 10)
    teacher.eval(), student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=0, atol=0)


def test_prune_keeps_the_largest_l1_filters():
    teacher, student = _pair(2, [8, 16], 0.5, preset="classic")
    first_t, first_s = teacher.encoders[0].body[0], student.encoders[0].body[0]
    with torch.no_grad():  # make filters 1, 3, 6, 7 the strongest
        first_t.weight.mul_(0.01)
        for i in (1, 3, 6, 7):
            first_t.weight[i] += 1.0
    prune_unet(teacher, student)
    torch.testing.assert_close(first_s.weight, first_t.weight[[1, 3, 6, 7]])
    torch.testing.assert_close(first_s.bias, first_t.bias[[1, 3, 6, 7]])
    # the next conv takes exactly those input channels
    second_t, second_s = teacher.encoders[0].body[3], student.encoders[0].body[3]  # conv, Identity, act
    kept_out = torch.sort(torch.topk(second_t.weight.abs().flatten(1).sum(1), 4).indices).values
    torch.testing.assert_close(second_s.weight, second_t.weight[kept_out][:, [1, 3, 6, 7]])


def test_pruned_half_width_beats_random_init():
    torch.manual_seed(1)
    teacher, student = _pair(2, [16, 32, 64], 0.5, preset="default")
    _, random_student = _pair(2, [16, 32, 64], 0.5, preset="default")
    prune_unet(teacher, student)
    x = torch.randn(4, 2, 32, 32)
    for net in (teacher, student, random_student):
        net.eval()
    with torch.no_grad():
        t = teacher(x)
        kl_pruned = kd_loss(student(x), t, 1.0).item()
        kl_random = kd_loss(random_student(x), t, 1.0).item()
    assert kl_pruned < kl_random


def test_prune_refuses_mismatched_networks():
    teacher, _ = _pair(2, [8, 16], 1.0, preset="default")
    other = build_network(2, 2, 3, features=[4, 8], strides=[2], preset="default", residual=True)
    with pytest.raises(PruneError):
        prune_unet(teacher, other)
    wider = build_network(2, 2, 3, features=[16, 32], strides=[2], preset="default")
    with pytest.raises(PruneError, match="channels"):
        prune_unet(teacher, wider)


def test_scale_features():
    assert scale_features([16, 32, 64, 128, 256], 0.5) == [8, 16, 32, 64, 128]
    assert scale_features([16, 32, 64], 0.25) == [4, 8, 16]
    assert scale_features([16, 32], 0.1) == [4, 4]  # at least 4
    assert scale_features([30, 50], 0.5) == [16, 24]  # 15 -> 16, 25 -> 24


def test_kd_loss_zero_for_equal_logits_and_hand_value():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 5)
    target = torch.zeros(2, 4, 5, dtype=torch.long)
    loss, kd, _ = distillation_loss(s, s.clone(), target, DiceCELoss(), temperature=2.0, alpha=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and kd == pytest.approx(0.0, abs=1e-6)
    # one voxel, two classes, T = 2: T^2 * sum p_t log(p_t / p_s), written out by hand
    st, tt = torch.tensor([0.0, 0.0]), torch.tensor([2.0, 0.0])
    p_t = torch.softmax(tt / 2, 0)
    p_s = torch.softmax(st / 2, 0)
    expected = 4 * float((p_t * (p_t / p_s).log()).sum())
    got = kd_loss(st.view(1, 2, 1, 1), tt.view(1, 2, 1, 1), 2.0).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_kd_gradient_pushes_student_to_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 6, 6) * 3
    student = torch.zeros_like(teacher, requires_grad=True)
    kd_loss(student, teacher, 2.0).backward()
    # a gradient step moves the student's softened probabilities towards the teacher's
    with torch.no_grad():
        stepped = student - 5.0 * student.grad
        before = kd_loss(student, teacher, 2.0).item()
        after = kd_loss(stepped, teacher, 2.0).item()
    assert after < before
    # the gradient equals (p_s - p_t) * T / N for each logit (N voxels in the mean)
    p_t, p_s = F.softmax(teacher / 2, 1), F.softmax(student.detach() / 2, 1)
    n = teacher.numel() // teacher.shape[1]
    torch.testing.assert_close(student.grad, (p_s - p_t) * 2 / n, rtol=1e-4, atol=1e-7)


def test_mixed_loss_combines_kd_and_supervised():
    torch.manual_seed(0)
    s, t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    y = torch.randint(0, 2, (1, 4, 4))
    loss, kd, sup = distillation_loss(s, t, y, DiceCELoss(), 2.0, 0.25)
    assert sup == pytest.approx(DiceCELoss()(s, y).item())
    assert loss.item() == pytest.approx(0.25 * kd + 0.75 * sup, rel=1e-5)


# --------------------------------------------------------------------------------------------
# a short run on a tiny trained teacher

TINY = {"training.iterations_per_epoch": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    data = make_synthetic_dataset(root / "data", n_train=5, n_test=2, shape=(32, 32), seed=3)
    model = root / "teacher"
    train(data, model, epochs=1, overrides=TINY, progress=False, report=False, precision="fp32")
    return data, model


def test_distill_writes_a_loadable_student(teacher, tmp_path):
    from medunet.inference import Predictor
    from medunet.inference.predictor import load_network

    data, model = teacher
    out = tmp_path / "student"
    res = distill(model, out, data, width=0.5, epochs=2, progress=False, precision="fp32")
    for name in ("plan.json", "splits.json", "checkpoint_last.pt", "checkpoint_best.pt", "log.csv",
                 "curves.png", "distill.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((out / "splits.json").read_text()) == json.loads((model / "splits.json").read_text())
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert {"model", "ema_model", "optimizer", "state"} <= set(ckpt)
    # the student keeps an EMA exactly when its plan (the teacher's) asks for one
    from medunet.planning import Plan

    assert (ckpt["ema_model"] is not None) == bool(Plan.load(out).training.get("ema"))

    plan, net, _ = load_network(out)
    tplan, tnet, _ = load_network(model)
    assert plan.network["features"] == [f // 2 for f in tplan.network["features"]]
    assert "width 0.5" in plan.reasons["distillation"]
    ratio = count_parameters(net) / count_parameters(tnet)
    assert 0.2 < ratio < 0.3  # about width^2
    labels, _ = Predictor.load(out, precision="fp32").predict_array(
        np.random.default_rng(0).integers(0, 255, (1, 32, 32)).astype(np.float32))
    assert labels.shape == (32, 32)

    info = json.loads((out / "distill.json").read_text())
    for key in ("teacher_params", "student_params", "width", "teacher_val_dice", "student_val_dice",
                "teacher_seconds_per_image", "student_seconds_per_image", "speedup", "init_used",
                "student_val_dice_at_init"):
        assert key in info, key
    assert info["init_used"] == "prune" and info["width"] == 0.5
    assert info["student_params"] == count_parameters(net) and res.student_params == count_parameters(net)
    assert 0.0 <= info["student_val_dice"] <= 1.0 and 0.0 <= info["teacher_val_dice"] <= 1.0
    assert info["teacher_seconds_per_image"] > 0 and info["student_seconds_per_image"] > 0
    speedup = info["teacher_seconds_per_image"] / info["student_seconds_per_image"]
    assert math.isclose(info["speedup"], speedup, rel_tol=0.01)
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and "kd_loss" in rows[0]

    with pytest.raises(InputError, match="already holds a run"):
        distill(model, out, data, epochs=1, progress=False)


def test_distill_input_errors(teacher, tmp_path):
    import shutil

    from medunet.training.distill import recorded_data

    data, model = teacher
    assert recorded_data(model) == Path(data).resolve()  # the trainer records it in splits.json
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    split = json.loads((bare / "splits.json").read_text())
    split.pop("data")
    (bare / "splits.json").write_text(json.dumps(split))
    with pytest.raises(InputError, match="does not record its dataset"):
        distill(bare, tmp_path / "s", epochs=1, progress=False)
    with pytest.raises(InputError, match="width"):
        distill(model, tmp_path / "s", data, width=1.5, epochs=1, progress=False)
    with pytest.raises(InputError, match="init"):
        distill(model, tmp_path / "s", data, init="magic", epochs=1, progress=False)
    with pytest.raises(InputError, match="not a model directory"):
        distill(tmp_path, tmp_path / "s", data, epochs=1, progress=False)
    assert not (tmp_path / "s").exists()  # nothing half-written


def test_student_plan_drops_teacher_postprocessing(teacher):
    from medunet.planning import Plan

    _, model = teacher
    p = Plan.load(model)
    p.inference["postprocessing"] = {"classes": {"1": ["largest_component"]}}
    s = student_plan(p, 0.5, model)
    assert "postprocessing" not in s.inference
    assert s.network["features"] == scale_features(p.network["features"], 0.5)
    assert s.patch_size == p.patch_size and s.normalization == p.normalization


def test_distill_random_init_kd_only_with_recorded_dataset(teacher, tmp_path):
    import shutil

    data, model = teacher
    copy = tmp_path / "teacher"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("preprocessed"))
    split = json.loads((copy / "splits.json").read_text())
    (copy / "splits.json").write_text(json.dumps({**split, "data": str(data)}))
    res = distill(copy, tmp_path / "s", width=0.25, epochs=1, init="random", alpha=1.0,
                  progress=False, precision="fp32")
    info = json.loads((tmp_path / "s" / "distill.json").read_text())
    assert res.init_used == "random" and info["data"] == str(data.resolve())
    assert info["prune_notes"] == [] and info["alpha"] == 1.0
    rows = (tmp_path / "s" / "log.csv").read_text().splitlines()
    assert rows[1].split(",")[rows[0].split(",").index("supervised_loss")] == ""  # KD only


def test_distill_resumes_after_sigkill_like_an_uninterrupted_run(teacher, tmp_path):
    """Distillation runs on the trainer's loop: killed during epoch 2 (SIGKILL), the same
    command with --resume ends with the weights of a run never interrupted, and the student
    directory has the layout of a trained one."""

    data, model = teacher
    a, b = tmp_path / "a", tmp_path / "b"
    kw = {"width": 0.5, "epochs": 2, "progress": False, "precision": "fp32"}
    distill(model, a, data, **kw)
    code = ("import torch; torch.set_num_threads(1); from medunet.training.distill import distill; "
            f"import medunet.training.loop as L; distill({str(model)!r}, {str(b)!r}, {str(data)!r}, "
            "width=0.5, epochs=2, progress=False, precision='fp32')")
    # slow the steps down so the kill lands inside epoch 2 (checkpoint of epoch 1 exists)
    code = code.replace("import medunet.training.loop as L; ",
                        "import time, medunet.training.loop as L; s = L.SupervisedMode.step; "
                        "L.SupervisedMode.step = lambda self, b, lr: (time.sleep(0.3), s(self, b, lr))[1]; ")
    kill_in_epoch_two(code, b)
    with pytest.raises(InputError, match="--resume"):
        distill(model, b, data, **kw)
    distill(model, b, data, resume=True, **kw)
    sa = torch.load(a / "checkpoint_last.pt", weights_only=True)
    sb = torch.load(b / "checkpoint_last.pt", weights_only=True)
    assert sb["state"]["epoch"] == sa["state"]["epoch"] == 2
    for k in sa["model"]:
        assert torch.allclose(sa["model"][k].float(), sb["model"][k].float(), atol=1e-6), k
    assert [r.split(",")[0] for r in (b / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    # the same layout as a supervised run (distill.json on top)
    trained = {p.name for p in model.iterdir() if p.suffix in (".json", ".pt", ".csv", ".png")}
    student = {p.name for p in b.iterdir() if p.suffix in (".json", ".pt", ".csv", ".png")}
    assert trained - {"selection.json"} <= student and student - trained <= {"distill.json", "selection.json"}
    assert not (b / ".train.lock").exists()


def test_distill_keeps_an_ema_when_the_plan_has_one(teacher, tmp_path):
    from medunet.planning import Plan

    data, model = teacher
    with_ema = tmp_path / "teacher"
    import shutil

    shutil.copytree(model, with_ema, ignore=shutil.ignore_patterns("preprocessed"))
    plan = Plan.load(with_ema)
    plan.training["ema"] = 0.9
    plan.save(with_ema / "plan.json")
    distill(with_ema, tmp_path / "s", data, width=0.5, epochs=1, progress=False, precision="fp32")
    ckpt = torch.load(tmp_path / "s" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["ema_model"] is not None and ckpt["ema"]["updates"] == ckpt["state"]["iteration"]
