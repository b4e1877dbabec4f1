"""The U-Net family (medunet.nets registry): one shared test class that every variant subclasses
in 2D and 3D (as segmentation_models_pytorch does), plus the registry, plan, CLI and distillation
around it. Sizes are tiny on purpose: features [4, 8, 16], odd inputs of ~20-40 px, 3D ~16^3."""

from __future__ import annotations

import copy
import hashlib
import io
import math
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medunet.cli import app
from medunet.errors import InputError
from medunet.nets import ARCH_NAMES, ARCHS, UNet, arch_table, build_network, create_model
from medunet.planning import Plan
from medunet.training.losses import build_loss

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


_BUILT: dict[tuple, nn.Module] = {}  # one build per variant, settings and seed, copied per test


class ArchTester:
    """What every variant must do. Subclasses ``Test<Arch><D>D`` set ``arch`` and ``dims``.

    The 3D cases use anisotropic strides ([1, 2, 2] first) and a slice-blind first level
    ([1, 3, 3] kernels) so every variant honours the plan's per-level strides and kernels.
    """

    arch: ClassVar[str] = "unet"
    dims: ClassVar[int] = 2
    in_channels: ClassVar[int] = 2
    out_channels: ClassVar[int] = 3
    options: ClassVar[dict[str, Any]] = {}
    bf16_min_agreement: ClassVar[float] = 0.8
    mixes_slices: ClassVar[bool] = False  # global pooling or attention sees every slice at once

    # ---------------------------------------------------------------- set-up

    @property
    def input_size(self) -> tuple[int, ...]:
        return (21, 27) if self.dims == 2 else (11, 17, 15)  # odd: padded to the divisor, cropped back

    @property
    def patch_size(self) -> list[int]:
        return [24, 32] if self.dims == 2 else [12, 16, 16]

    def settings(self, deep_supervision: bool = True) -> dict[str, Any]:
        geometry: dict[str, Any] = (
            {"strides": [2, 2]} if self.dims == 2 else
            {"strides": [[1, 2, 2], [2, 2, 2]], "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]]})
        return {"preset": "default", "features": [4, 8, 16], **geometry,
                "deep_supervision": deep_supervision, **self.options}

    def build(self, seed: int = 0, deep_supervision: bool = True) -> nn.Module:
        key = (type(self), seed, deep_supervision)
        if key not in _BUILT:
            torch.manual_seed(seed)
            _BUILT[key] = create_model(self.arch, self.dims, self.in_channels, self.out_channels,
                                       **self.settings(deep_supervision))
        return copy.deepcopy(_BUILT[key])

    def sample(self, batch: int = 2, seed: int = 1, size: tuple[int, ...] | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.in_channels, *(size or self.input_size), generator=g)

    def expected_sizes(self, net: nn.Module) -> list[tuple[int, ...]]:
        """Deep-supervision output sizes: ceil(size / factor) per decoder level, full first
        (UNet++'s heads all sit on its full-resolution top row)."""
        levels = net.output_levels()[::-1]
        sizes = []
        for level in levels:
            factor = [math.prod(s[a] for s in net.strides[:level]) for a in range(self.dims)]
            sizes.append(tuple(-(-n // f) for n, f in zip(self.input_size, factor, strict=True)))
        return sizes

    def plan(self) -> Plan:
        return Plan(dataset_name="t", dim=self.dims, in_channels=self.in_channels,
                    channel_names=["a", "b"], label_names=["bg", "x", "y"], label_values=[0, 1, 2],
                    spacing=[1.0] * self.dims, median_shape=list(self.input_size),
                    normalization=[{"scheme": "none"}] * self.in_channels, patch_size=self.patch_size,
                    batch_size=2, network={"arch": self.arch, **self.settings()},
                    inference={"overlap": 0.5, "tta": "none"})

    # ---------------------------------------------------------------- checks

    def test_forward_odd_size(self) -> None:
        net = self.build().eval()
        with torch.no_grad():
            out = net(self.sample())
        assert isinstance(out, torch.Tensor)
        assert out.shape == (2, self.out_channels, *self.input_size)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()

    def test_backward_through_the_deep_supervision_loss(self) -> None:
        net = self.build().train()
        out = net(self.sample())
        assert isinstance(out, list) and len(out) == len(net.heads) == 2  # the trainer counts heads
        assert [tuple(o.shape[2:]) for o in out] == self.expected_sizes(net)
        assert tuple(out[0].shape[2:]) == self.input_size
        g = torch.Generator().manual_seed(2)
        target = torch.randint(0, self.out_channels, (2, *self.input_size), generator=g)
        loss = build_loss("dice_ce", self.out_channels, deep_supervision=len(net.heads))(out, target)
        loss.backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing}"
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())

    def test_without_deep_supervision_one_head_and_every_parameter_trains(self) -> None:
        net = self.build(deep_supervision=False).train()
        out = net(self.sample())
        assert isinstance(out, torch.Tensor) and out.shape == (2, self.out_channels, *self.input_size)
        assert len(net.heads) == 1
        out.square().mean().backward()
        assert not [n for n, p in net.named_parameters() if p.grad is None]

    def test_divisor_follows_the_strides(self) -> None:
        net = self.build()
        assert net.divisor == ((4, 4) if self.dims == 2 else (2, 4, 4))
        size = tuple(2 * d for d in net.divisor)  # a multiple: no padding at all
        with torch.no_grad():
            assert net.eval()(self.sample(size=size)).shape[2:] == size

    def test_slice_kernels_keep_slices_apart(self) -> None:
        """The 2d configuration of 3D data ([1, 3, 3] kernels, [1, 2, 2] strides on every level):
        a variant that honours the plan's kernels keeps every slice's output blind to the
        others (unless its attention pools over the whole volume on purpose)."""
        if self.dims == 2:
            pytest.skip("3D only")
        torch.manual_seed(0)
        opts = {**self.settings(False), "strides": [[1, 2, 2], [1, 2, 2]], "kernel_sizes": [[1, 3, 3]] * 3,
                "norm": "batch"}  # eval-mode batch norm: no statistics across slices
        net = create_model(self.arch, 3, self.in_channels, self.out_channels, **opts).eval()
        assert net.divisor == (1, 4, 4)
        x = self.sample(batch=1, size=(3, 17, 15))
        y = x.clone()
        y[:, :, 2] += 5 * torch.randn_like(y[:, :, 2])
        with torch.no_grad():
            a, b = net(x), net(y)
        assert not torch.allclose(a[:, :, 2], b[:, :, 2])
        assert torch.equal(a[:, :, :2], b[:, :, :2]) != self.mixes_slices

    def test_same_seed_same_network_and_outputs(self) -> None:
        torch.manual_seed(0)
        a = create_model(self.arch, self.dims, self.in_channels, self.out_channels, **self.settings())
        torch.manual_seed(0)
        b = create_model(self.arch, self.dims, self.in_channels, self.out_channels, **self.settings())
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        x = self.sample()
        a.train(), b.train()
        assert all(torch.equal(u, v) for u, v in zip(a(x), b(x), strict=True))
        a.eval()
        with torch.no_grad():
            assert torch.equal(a(x), a(x))

    def test_channels_last_bf16_autocast(self) -> None:
        net = self.build().eval()
        x = self.sample()
        fmt = torch.channels_last if self.dims == 2 else torch.channels_last_3d
        with torch.no_grad():
            ref = net(x)
            net = net.to(memory_format=fmt)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x.contiguous(memory_format=fmt))
        assert out.shape == ref.shape and torch.isfinite(out.float()).all()
        agreement = (out.float().argmax(1) == ref.argmax(1)).float().mean().item()
        assert agreement >= self.bf16_min_agreement, agreement

    def test_state_dict_round_trip(self) -> None:
        net = self.build(seed=0).eval()
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        buf.seek(0)
        other = self.build(seed=7).eval()
        other.load_state_dict(torch.load(buf, weights_only=True))
        x = self.sample()
        with torch.no_grad():
            assert torch.equal(net(x), other(x))

    def test_model_dir_onnx_export_and_predictor(self, tmp_path) -> None:
        """Saved as a model directory: loads back through the plan (network.arch), exports to ONNX
        matching PyTorch at a size it was not traced with, and predicts through the Predictor."""
        from medunet.export import export_model
        from medunet.inference import Predictor
        from medunet.modeldir import load_network

        plan = self.plan()
        model = tmp_path / "model"
        plan.save(model / "plan.json")
        net = self.build().eval()
        torch.save({"model": net.state_dict(), "ema_model": None}, model / "checkpoint_last.pt")
        loaded_plan, loaded, _ = load_network(model)
        assert type(loaded) is type(net) and loaded_plan.network["arch"] == self.arch
        x = self.sample()
        with torch.no_grad():
            assert torch.equal(loaded(x), net(x))

        res = export_model(model, "onnx")
        check = res.check["random"]
        assert check["input_shape"][2:] != self.patch_size  # an untraced size
        assert check["max_abs_diff"] < 1e-4, check

        image = np.random.default_rng(3).normal(size=(self.in_channels, *self.input_size)).astype(np.float32)
        labels, probs = Predictor.load(model).predict_array(image)
        assert labels.shape == self.input_size and set(np.unique(labels)) <= {0, 1, 2}
        assert probs.shape == (3, *self.input_size)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
        onnx_labels, _ = Predictor.load(model, backend="onnx").predict_array(image, probabilities=False)
        assert (onnx_labels == labels).mean() > 0.99


# one 2D and one 3D subclass per registered variant -------------------------------------------


class TestUNet2D(ArchTester):
    arch = "unet"


class TestUNet3D(ArchTester):
    arch, dims = "unet", 3


class TestClassic2D(ArchTester):
    arch = "classic"


class TestClassic3D(ArchTester):
    arch, dims = "classic", 3


class TestResEnc2D(ArchTester):
    arch = "resenc"


class TestResEncL3D(ArchTester):
    arch, dims = "resenc", 3
    options = {"size": "L", "norm": "instance"}


class TestAttention2D(ArchTester):
    arch = "attention"


class TestAttention3D(ArchTester):
    arch, dims = "attention", 3
    options = {"norm": "instance", "down": "conv"}


class TestCBAM2D(ArchTester):
    arch = "cbam"


class TestCBAM3D(ArchTester):
    arch, dims = "cbam", 3
    mixes_slices = True


class TestSCSE2D(ArchTester):
    arch = "scse"
    options = {"up": "interp"}


class TestSCSE3D(ArchTester):
    arch, dims = "scse", 3
    mixes_slices = True


class TestUNetPlusPlus2D(ArchTester):
    arch = "unetpp"


class TestUNetPlusPlus3D(ArchTester):
    arch, dims = "unetpp", 3
    options = {"norm": "group"}


class TestTransUNet2D(ArchTester):
    arch = "transunet"


class TestTransUNet3D(ArchTester):
    arch, dims = "transunet", 3
    mixes_slices = True


class TestMedNeXt2D(ArchTester):
    arch = "mednext"


class TestMedNeXt3D(ArchTester):
    arch, dims = "mednext", 3
    options = {"kernel": 3, "act": "gelu"}


def test_every_registered_arch_has_a_2d_and_a_3d_test_class() -> None:
    tested = {(c.arch, c.dims) for c in globals().values()
              if isinstance(c, type) and issubclass(c, ArchTester) and c.__name__.startswith("Test")}
    assert tested == {(a, d) for a in ARCHS for d in (2, 3)}


# --------------------------------------------------------------------------- registry and plan


def _digest(net: nn.Module) -> str:
    sig = ";".join(f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items())
    return hashlib.sha256(sig.encode()).hexdigest()[:16]


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_arch_is_exactly_todays_network(dims: int) -> None:
    """Same class, same state-dict keys in the same order and shapes: old checkpoints load."""
    old = build_network(dims, 1, 2, "default", deep_supervision=True)
    new = create_model("unet", dims, 1, 2, preset="default", deep_supervision=True)
    assert type(new) is UNet and _digest(new) == _digest(old)
    with torch.device("meta"):
        assert _digest(create_model("unet", 2, 1, 2)) == "86aa55b45d155bc8"  # tests/test_nets.py


def _plan(network: dict) -> Plan:
    return Plan(dataset_name="t", dim=2, in_channels=1, channel_names=["x"], label_names=["bg", "fg"],
                label_values=[0, 1], spacing=[1.0, 1.0], median_shape=[32, 32],
                normalization=[{"scheme": "none"}], patch_size=[32, 32], batch_size=2, network=network)


def test_plans_without_arch_build_the_unet_and_arch_is_a_plan_field() -> None:
    old = _plan({"preset": "default", "features": [4, 8, 16], "strides": [2, 2]})
    net = old.build_network()
    assert type(net) is UNet
    changed = old.override({"network.arch": "resenc", "network.size": "L"})
    assert changed.network["arch"] == "resenc" and changed.reasons["network.size"] == "set by the user"
    assert changed.reasons["network.arch"] == f"set by the user: {ARCHS['resenc'].summary}"
    assert "trains from scratch" in old.override({"network.arch": "transunet"}).reasons["network.arch"]
    assert changed.build_network().features == [8, 16, 32]
    assert _digest(_plan({**old.network, "arch": "unet"}).build_network()) == _digest(net)


def test_unknown_arch_is_a_one_line_error_listing_the_valid_names() -> None:
    for call in (lambda: create_model("vnet", 2, 1, 2),
                 lambda: _plan({"preset": "default", "arch": "vnet"}).build_network(),
                 lambda: _plan({"preset": "default"}).override({"network.arch": "vnet"})):
        with pytest.raises(InputError) as err:
            call()
        text = str(err.value)
        assert "unknown network arch 'vnet'" in text and "\n" not in text
        assert all(name in text for name in ARCH_NAMES)
    with pytest.raises(InputError, match="did you mean 'network.size'"):
        _plan({"preset": "default"}).override({"network.sise": "L"})


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="arch 'resenc' has no option residual"):
        create_model("resenc", 2, 1, 2, residual=True)
    with pytest.raises(InputError, match="invalid network settings.*has no option residual"):
        _plan({"preset": "default", "arch": "mednext", "residual": True}).build_network()
    with pytest.raises(ValueError, match="no pretrained ViT weights|cannot be downloaded"):
        create_model("transunet", 2, 1, 2, pretrained=True)
    with pytest.raises(ValueError, match="unknown resenc size 'XL'"):
        create_model("resenc", 2, 1, 2, size="XL")
    with pytest.raises(ValueError, match="unknown network preset"):
        create_model("cbam", 2, 1, 2, preset="huge")


def test_classic_arch_has_the_papers_widths_at_the_plans_depth() -> None:
    net = create_model("classic", 2, 1, 2, features=[16, 32, 64], strides=[2, 2])
    assert type(net) is UNet and net.features == [64, 128, 256]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)) for m in net.modules())
    assert all(isinstance(d, nn.MaxPool2d) for d in net.downs)


def test_resenc_follows_nnunet_resenc() -> None:
    m = create_model("resenc", 2, 1, 2, features=[8, 16, 32, 64])
    assert m.blocks == [1, 3, 4, 6] and [len(s) for s in m.stages] == [1, 3, 4, 6]
    assert all(len([c for c in d.modules() if isinstance(c, nn.Conv2d)]) == 1 for d in m.decoders)
    big = create_model("resenc", 2, 1, 2, features=[8, 16, 32, 64], size="L")
    assert big.features == [16, 32, 64, 128]


def test_transunet_attends_across_the_whole_bottleneck() -> None:
    """Perturbing one bottleneck voxel changes every token, far beyond the depthwise position
    conv's reach: the transformer mixes the whole patch."""
    torch.manual_seed(0)
    net = create_model("transunet", 3, 1, 2, features=[4, 8, 16], strides=[2, 2]).eval()
    x = torch.randn(1, 16, 6, 8, 8)
    y = x.clone()
    y[0, :, 0, 0, 0] += 3.0
    with torch.no_grad():
        change = (net.transformer(x) - net.transformer(y)).abs().amax(dim=1)
    assert change.min() > 1e-5, change.min()
    assert net.transformer.layers[0].attn.heads == 4


def test_arch_table_and_cli() -> None:
    rows = arch_table()
    assert [r["arch"] for r in rows if "(" not in r["arch"]] == list(ARCH_NAMES)
    assert all(r["params_2d"] > 0 and r["params_3d"] > r["params_2d"] and r["summary"] for r in rows)
    by = {r["arch"]: r for r in rows}
    assert by["unet"]["params_2d"] == 1942306 and by["classic"]["params_2d"] == 31030658
    r = runner.invoke(app, ["archs"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert all(name in r.output for name in ARCH_NAMES) and "1.94 M" in r.output


def test_train_unknown_arch_is_exit_2_before_anything_is_written(tmp_path) -> None:
    from medunet.datasets.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", n_train=2, n_test=0, shape=(16, 16))
    r = runner.invoke(app, ["train", str(data), "-o", str(tmp_path / "bad"), "--arch", "vnet",
                            "--epochs", "1"])
    assert isinstance(r.exception, InputError) and "unknown network arch 'vnet'" in str(r.exception)
    assert r.exception.exit_code == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("arch", "shape"), [("unetpp", (24, 24)), ("transunet", (16, 16, 16)),
                                             ("mednext", (16, 16, 16))])
def test_train_arch_option(tmp_path, arch: str, shape: tuple[int, ...]) -> None:
    """``medunet train --arch NAME`` records the arch in plan.json and trains it through the
    trainer (its precision and memory format, its deep-supervision loss: in 2D switched on to
    cover UNet++'s full-resolution heads), then the model directory predicts."""
    import json

    from medunet.datasets.synthetic import make_synthetic_dataset
    from medunet.inference import Predictor

    data = make_synthetic_dataset(tmp_path / "d", n_train=3, n_test=0, shape=shape)
    model = tmp_path / "m"
    r = runner.invoke(app, ["train", str(data), "-o", str(model), "--arch", arch, "--epochs", "1",
                            "--quiet", "--no-report", "--set", "training.iterations_per_epoch=2",
                            "--set", "network.deep_supervision=true"])
    assert r.exit_code == 0, r.output
    assert json.loads((model / "plan.json").read_text())["network"]["arch"] == arch
    pred = Predictor.load(model)
    assert type(pred.nets[0]).__name__ == type(create_model(arch, 2, 1, 2)).__name__
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    labels, _ = pred.predict_array(image, probabilities=False)
    assert labels.shape == shape


# --------------------------------------------------------------------------- pruning and distillation


def test_pruning_refuses_variants_it_cannot_map_and_width_works_for_all() -> None:
    from medunet.training.distill import check_prunable, prune_unet, student_plan

    for arch, spec in ARCHS.items():
        plan = _plan({"preset": "default", "arch": arch, "features": [8, 16, 32], "strides": [2, 2]})
        check_prunable(plan, "random")  # a random start distils every variant
        if spec.prunable:
            check_prunable(plan, "prune")
        else:
            with pytest.raises(InputError, match=f"not this teacher's arch '{arch}'.*--init random"):
                check_prunable(plan, "prune")
        student = student_plan(plan, 0.5, "teacher").build_network().eval()
        with torch.no_grad():
            assert student(torch.zeros(1, 1, 19, 23)).shape == (1, 2, 19, 23)
    # classic: the student is the paper's U-Net at half width, pruned from the teacher
    teacher_plan = _plan({"preset": "default", "arch": "classic", "features": [8, 16], "strides": [2]})
    splan = student_plan(teacher_plan, 0.5, "teacher")
    assert splan.network["arch"] == "unet" and splan.network["features"] == [32, 64]
    assert splan.network["norm"] == "none" and splan.network["act"] == "relu"
    torch.manual_seed(0)
    teacher, student = teacher_plan.build_network().eval(), splan.build_network().eval()
    prune_unet(teacher, student)
    assert torch.equal(student.heads[-1].bias, teacher.heads[-1].bias)
    full = prune_unet(teacher, student_plan(teacher_plan, 1.0, "t").build_network().eval())
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(full(x), teacher(x))


# not one of the compared variants (ARCH_NAMES), but every network the registry builds passes the same checks
class TestNnUNetPlain2D(ArchTester):
    arch = "nnunet"
    options = {"norm": "instance", "n_convs": [2, 1, 3], "decoder_convs": [1, 2]}


class TestNnUNetResidual3D(ArchTester):
    arch, dims = "nnunet", 3
    options = {"norm": "instance", "encoder": "residual", "n_convs": [1, 2, 3]}
