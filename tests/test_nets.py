"""medunet.nets: one shared test class that every network variant subclasses (as in
segmentation_models_pytorch), plus checks of the classic preset against the paper."""

from __future__ import annotations

import copy
import io
import math
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from medunet.nets import PRESETS, UNet, build_network

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


_BUILT: dict[tuple[type, int], UNet] = {}  # built once per variant and seed, copied per test


class NetTester:
    """Checks every variant must pass. Subclasses named ``Test*`` set how to build theirs.

    Inputs have odd sizes on purpose: the net pads to its divisor and crops back.
    """

    dims: ClassVar[int] = 2
    in_channels: ClassVar[int] = 2
    out_channels: ClassVar[int] = 3
    preset: ClassVar[str] = "default"
    overrides: ClassVar[dict[str, Any]] = {}
    input_size: ClassVar[tuple[int, ...]] = (37, 50)
    batch: ClassVar[int] = 1
    bf16_min_agreement: ClassVar[float] = 0.9

    def build(self, seed: int = 0) -> UNet:
        key = (type(self), seed)
        if key not in _BUILT:
            torch.manual_seed(seed)
            _BUILT[key] = build_network(self.dims, self.in_channels, self.out_channels,
                                        self.preset, **self.overrides)
        return copy.deepcopy(_BUILT[key])

    def sample(self, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, self.in_channels, *self.input_size, generator=g)

    def test_forward_shape(self) -> None:
        net = self.build().eval()
        with torch.no_grad():
            out = net(self.sample())
        assert isinstance(out, torch.Tensor)
        assert out.shape == (self.batch, self.out_channels, *self.input_size)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()

    def test_backward_gives_finite_grads_for_all_parameters(self) -> None:
        net = self.build().train()
        out = net(self.sample())
        outputs = out if isinstance(out, list) else [out]
        g = torch.Generator().manual_seed(2)
        loss = sum(
            nn.functional.cross_entropy(
                o, torch.randint(0, self.out_channels, (o.shape[0], *o.shape[2:]), generator=g))
            for o in outputs
        )
        loss.backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing}"
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
        assert any(p.grad.abs().sum() > 0 for p in net.parameters())

    def test_eval_is_deterministic(self) -> None:
        net = self.build().eval()
        x = self.sample()
        with torch.no_grad():
            assert torch.equal(net(x), net(x))

    def test_state_dict_round_trip(self) -> None:
        net = self.build(seed=0).eval()
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        buf.seek(0)
        other = self.build(seed=123).eval()
        other.load_state_dict(torch.load(buf, weights_only=True))
        x = self.sample()
        with torch.no_grad():
            assert torch.equal(net(x), other(x))

    def test_channels_last_bf16_autocast(self) -> None:
        net = self.build().eval()
        x = self.sample()
        with torch.no_grad():
            ref = net(x)
            fmt = torch.channels_last if self.dims == 2 else torch.channels_last_3d
            net_cl = net.to(memory_format=fmt)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net_cl(x.to(memory_format=fmt))
        assert out.shape == ref.shape and torch.isfinite(out.float()).all()
        agreement = (out.float().argmax(1) == ref.argmax(1)).float().mean().item()
        assert agreement >= self.bf16_min_agreement, agreement


class TestClassic(NetTester):
    """The paper's widths (31 M parameters): kept to one tiny image for speed."""

    preset = "classic"
    in_channels = 1
    out_channels = 2
    input_size = (15, 31)  # padded to 16 x 32: as cheap as the 32 x 32 the paper net needs


class TestDefault2D(NetTester):
    preset = "default"
    batch = 2


class TestDefault3D(NetTester):
    dims = 3
    preset = "default"
    input_size = (19, 23, 11)  # padded to 32 x 32 x 16: batch norm needs > 1 value at the bottom


class TestLarge(NetTester):
    preset = "large"


class TestResidual(NetTester):
    overrides = {"features": [8, 16, 32, 64], "residual": True, "norm": "group"}


class TestResidual3D(NetTester):
    dims = 3
    overrides = {"features": [8, 16, 24], "residual": True, "norm": "instance"}
    input_size = (19, 23, 11)


class TestInterpUpsampling(NetTester):
    overrides = {"features": [8, 16, 32, 64], "up": "interp", "down": "conv"}


class TestDeepSupervision(NetTester):
    overrides = {"features": [8, 16, 32, 64], "deep_supervision": True}
    batch = 2

    def test_training_returns_every_level_at_label_size(self) -> None:
        net = self.build().train()
        out = net(self.sample())
        assert isinstance(out, list) and len(out) == 3
        h, w = self.input_size
        for k, o in enumerate(out):  # full size, then ceil(size / 2^k) like a down-sampled label
            assert o.shape == (self.batch, self.out_channels, math.ceil(h / 2**k),
                               math.ceil(w / 2**k))
        assert len(net.heads) == 3


class TestAnisotropicStrides3D(NetTester):
    dims = 3
    overrides = {"features": [8, 16, 32, 48], "strides": [[1, 2, 2], [2, 2, 2], [2, 2, 1]],
                 "deep_supervision": True}
    input_size = (19, 23, 11)

    def test_divisor_and_levels(self) -> None:
        net = self.build().train()
        assert net.divisor == (4, 8, 4)
        out = net(self.sample())
        assert [tuple(o.shape[2:]) for o in out] == [(19, 23, 11), (19, 12, 6), (10, 6, 3)]


# --------------------------------------------------------------------------- classic preset


def _conv_params(k: int, dims: int, cin: int, cout: int) -> int:
    return k**dims * cin * cout + cout  # weights + bias


def classic_param_count(in_ch: int, n_classes: int, f: tuple[int, ...] = (64, 128, 256, 512, 1024),
                        dims: int = 2) -> int:
    """Ronneberger et al. 2015, by hand: per encoder stage two 3x3 convs (c_in->c, c->c);
    per decoder stage a 2x2 up-conv (2c->c) and two 3x3 convs (2c->c, c->c); a final 1x1 conv.

        sum_l [9*cin_l*c_l + c_l + 9*c_l^2 + c_l]                     (encoder, cin_0 = in_ch)
      + sum_{l<4} [4*c_{l+1}*c_l + c_l + 9*2c_l*c_l + c_l + 9*c_l^2 + c_l]   (decoder)
      + c_0 * n_classes + n_classes                                    (head)
    """
    total, cin = 0, in_ch
    for c in f:
        total += _conv_params(3, dims, cin, c) + _conv_params(3, dims, c, c)
        cin = c
    for lo, hi in zip(f[:-1], f[1:], strict=True):
        total += _conv_params(2, dims, hi, lo)
        total += _conv_params(3, dims, 2 * lo, lo) + _conv_params(3, dims, lo, lo)
    return total + _conv_params(1, dims, f[0], n_classes)


def _layers(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if not isinstance(m, (nn.Sequential, nn.Identity))
            and m is not block]


@pytest.fixture(scope="module")
def classic() -> UNet:
    torch.manual_seed(0)
    return build_network(2, 1, 2, "classic")


def test_classic_matches_the_paper(classic: UNet) -> None:
    widths = [64, 128, 256, 512, 1024]
    assert PRESETS["classic"]["features"] == widths
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm))
                   for m in classic.modules())
    cin = 1
    for enc, c in zip(classic.encoders, widths, strict=True):  # two 3x3 conv + ReLU per stage
        layers = _layers(enc)
        assert [type(m) for m in layers] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU]
        assert (layers[0].in_channels, layers[0].out_channels) == (cin, c)
        assert (layers[2].in_channels, layers[2].out_channels) == (c, c)
        assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in layers[::2])
        cin = c
    assert len(classic.downs) == 4
    for pool in classic.downs:  # max pool 2x2, stride 2
        assert isinstance(pool, nn.MaxPool2d)
        assert pool.kernel_size == (2, 2) and pool.stride == (2, 2)
    ups = list(classic.ups)
    assert [(u.in_channels, u.out_channels) for u in ups] == [
        (1024, 512), (512, 256), (256, 128), (128, 64)]
    for up in ups:  # 2x2 up-convolution halving the channels
        assert isinstance(up, nn.ConvTranspose2d)
        assert up.kernel_size == (2, 2) and up.stride == (2, 2)
    for dec, c in zip(classic.decoders, [512, 256, 128, 64], strict=True):
        layers = _layers(dec)
        assert [type(m) for m in layers] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU]
        assert (layers[0].in_channels, layers[0].out_channels) == (2 * c, c)
    assert len(classic.heads) == 1  # the final 1x1 conv to the classes, nothing else
    head = classic.heads[-1]
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1)
    assert (head.in_channels, head.out_channels) == (64, 2)


def test_classic_parameter_count(classic: UNet) -> None:
    n = sum(p.numel() for p in classic.parameters())
    assert n == classic_param_count(1, 2) == 31_030_658
    torch.manual_seed(0)
    rgb = build_network(2, 3, 5, "classic")
    assert sum(p.numel() for p in rgb.parameters()) == classic_param_count(3, 5)


def test_classic_forward_tiny(classic: UNet) -> None:
    with torch.no_grad():
        assert classic.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


# --------------------------------------------------------------------------- builder


def test_build_network_presets_and_overrides() -> None:
    assert set(PRESETS) >= {"classic", "default", "large"}
    net = build_network(2, 1, 2, "default", features=[4, 8], norm=None, residual=None)
    assert isinstance(net, UNet) and len(net.encoders) == 2
    assert isinstance(net.encoders[0].body[1], nn.BatchNorm2d)  # None keeps the preset value
    with pytest.raises(ValueError, match="unknown network preset 'huge'"):
        build_network(2, 1, 2, "huge")
    with pytest.raises(TypeError):
        build_network(2, 1, 2, "default", not_an_option=1)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"features": [8]}, "at least 2 levels"),
        ({"features": [8, 16, 32], "strides": [2]}, "need 2 strides"),
        ({"features": [8, 16], "strides": [[2, 2, 2]]}, "one per axis"),
        ({"features": [8, 16], "norm": "layer"}, "unknown norm"),
        ({"features": [8, 16], "act": "swish"}, "unknown activation"),
        ({"features": [8, 16], "down": "avgpool"}, "unknown down"),
        ({"features": [8, 16], "up": "pixelshuffle"}, "unknown up"),
    ],
)
def test_bad_arguments(kwargs: dict, pattern: str) -> None:
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        UNet(**args)


def test_wrong_input_rank_is_a_clear_error() -> None:
    net = UNet(3, 1, 2, features=(4, 8))
    with pytest.raises(ValueError, match="3D U-Net"):
        net(torch.zeros(1, 1, 8, 8))


def test_group_norm_with_any_width() -> None:
    net = UNet(2, 1, 2, features=(12, 20), norm="group")
    assert net(torch.zeros(1, 1, 9, 9)).shape == (1, 2, 9, 9)


# --------------------------------------------------------------------------- per-level kernels


class TestSliceKernels3D(NetTester):
    """The 2d configuration of 3D data: [1, 3, 3] kernels and [1, 2, 2] strides on every level."""

    dims = 3
    overrides = {"features": [8, 16, 32], "strides": [[1, 2, 2], [1, 2, 2]],
                 "kernel_sizes": [[1, 3, 3]] * 3}
    input_size = (3, 23, 19)

    def test_slices_are_independent(self) -> None:
        net = self.build().eval()
        x = self.sample()
        y = x.clone()
        y[:, :, 2] += 5 * torch.randn_like(y[:, :, 2])  # perturb slice 2 only
        with torch.no_grad():
            a, b = net(x), net(y)
        assert torch.equal(a[:, :, :2], b[:, :, :2])
        assert not torch.allclose(a[:, :, 2], b[:, :, 2])
        assert net.divisor == (1, 4, 4)

    def test_equals_a_2d_unet_slice_by_slice(self) -> None:
        """Reference: a 2D U-Net with the same weights (kernel axis of size 1 squeezed)."""
        net3 = self.build().eval()
        net2 = build_network(2, self.in_channels, self.out_channels, "default",
                             features=[8, 16, 32], strides=[2, 2]).eval()
        state = {k: (v.squeeze(2) if v.ndim == 5 else v) for k, v in net3.state_dict().items()}
        net2.load_state_dict(state)
        x = self.sample()
        with torch.no_grad():
            out3 = net3(x)
            for d in range(x.shape[2]):
                torch.testing.assert_close(out3[:, :, d], net2(x[:, :, d]), rtol=1e-4, atol=1e-5)

    def test_layers_have_the_kernels(self) -> None:
        net = self.build()
        convs = [m for m in net.encoders.modules() if isinstance(m, nn.Conv3d)]
        assert convs and all(m.kernel_size == (1, 3, 3) and m.padding == (0, 1, 1) for m in convs)


# parameter counts and a digest of the state-dict keys and shapes of the nets as built before
# per-level kernels existed: old checkpoints must keep loading
_OLD_NETS = [
    (2, "default", {}, 1942306, "86aa55b45d155bc8"),
    (3, "default", {}, 5646402, "5c9bbc8c2c00b125"),
    (3, "large", {}, 17241410, "6b088e065bdeb7d7"),
    (3, "default", {"strides": [[1, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 2]], "residual": True,
                    "deep_supervision": True}, None, "713a8b900a39e841"),
]


@pytest.mark.parametrize("dims, preset, kwargs, count, digest", _OLD_NETS)
def test_default_kernels_build_the_same_nets_as_before(dims, preset, kwargs, count, digest) -> None:
    import hashlib

    for kernels in (None, [3] * 5):
        net = build_network(dims, 1, 2, preset, kernel_sizes=kernels, **kwargs)
        sig = ";".join(f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items())
        assert hashlib.sha256(sig.encode()).hexdigest()[:16] == digest
        if count is not None:
            assert sum(p.numel() for p in net.parameters()) == count


@pytest.mark.parametrize(
    "kernels, pattern",
    [([3, 3], "need 3 kernel sizes"), ([3, 2, 3], "odd positive"), ([[1, 3]] * 3, "odd positive")],
)
def test_bad_kernel_sizes(kernels, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        UNet(3, 1, 2, features=(4, 8, 16), kernel_sizes=kernels)


@pytest.mark.parametrize(("levels", "n_convs"), [(4, 2), (2, 1), (3, 3)])
def test_encoder_receptive_field_matches_the_gradient(levels: int, n_convs: int) -> None:
    """The planner's receptive field equals the input extent that moves one bottleneck voxel."""
    from medunet.nets import encoder_receptive_field

    net = UNet(2, 1, 2, features=[2] * (levels + 1), n_convs=n_convs, norm="none", act="relu",
               down="conv")
    for p in net.parameters():  # positive weights: no gradient cancels inside the field
        nn.init.constant_(p, 0.1)
    size = 2 ** levels * 24
    x = torch.zeros(1, 1, size, size, requires_grad=True)
    h = x + 1.0
    for level, enc in enumerate(net.encoders):
        h = enc(h)
        if level < levels:
            h = net.downs[level](h)
    c = h.shape[-1] // 2
    h[0, 0, c, c].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1))
    assert int(rows.max() - rows.min() + 1) == encoder_receptive_field(levels, n_convs)
    assert encoder_receptive_field(4) == 140  # the default preset
