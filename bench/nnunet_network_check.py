"""nnU-Net's own networks vs medunet's import of them, weight for weight (no training needed).

    python bench/nnunet_network_check.py [--nnunet-python /tmp/nnunet_venv/bin/python]

In nnU-Net's virtual environment (see bench/_nnunet.py), dynamic_network_architectures builds a
``PlainConvUNet`` and a ``ResidualEncoderUNet`` (3D, anisotropic first kernel and stride, unequal
conv/block counts per stage) with random weights, and runs one input through each. medunet then
maps those state dicts onto its ``nnunet`` network (``medunet.nnunet.checkpoint.map_state_dict``,
SimpleITK axis order, so every kernel is permuted) and runs the permuted input. Prints JSON: the
largest absolute logit difference per network (float32 rounding is ~1e-6).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

ARCH = dict(n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], n_conv_per_stage_decoder=[1, 2], conv_bias=True,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin_kwargs={"inplace": True})
EXTRA = {"PlainConvUNet": {"n_conv_per_stage": [2, 1, 3]},
         "ResidualEncoderUNet": {"n_blocks_per_stage": [1, 3, 4]}}

# runs in nnU-Net's venv: builds each network, writes weights, input and output
NNUNET_SIDE = """
import sys, torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
arch, extra, out = eval(sys.argv[1]), eval(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
for cls in (PlainConvUNet, ResidualEncoderUNet):
    net = cls(input_channels=2, num_classes=3, conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d,
              dropout_op=None, dropout_op_kwargs=None, nonlin=torch.nn.LeakyReLU, deep_supervision=True,
              **arch, **extra[cls.__name__])
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(1, 2, 8, 20, 24)
    with torch.no_grad():
        y = net.eval()(x)[0]
    torch.save({"network_weights": net.state_dict(), "x": x, "y": y}, f"{out}/{cls.__name__}.pt")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nnunet-python", type=Path, default=Path("/tmp/nnunet_venv/bin/python"))
    args = ap.parse_args()
    from medunet.nets import create_model
    from medunet.nnunet.checkpoint import map_state_dict
    from medunet.nnunet.plans import axis_map, network_options

    result = {"benchmark": "nnunet_network_check", "machine": machine(), "networks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(args.nnunet_python), "-c", NNUNET_SIDE, repr(ARCH), repr(EXTRA), tmp], check=True)
        for name, extra in EXTRA.items():
            saved = torch.load(Path(tmp) / f"{name}.pt", weights_only=True)
            arch = {"network_class_name": f"dynamic_network_architectures.architectures.unet.{name}",
                    "arch_kwargs": {**ARCH, **extra, "conv_op": "torch.nn.modules.conv.Conv3d",
                                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                    "nonlin": "torch.nn.LeakyReLU"}}
            net_to_med = axis_map("SimpleITKIO", 3, [0, 1, 2], Path("plans.json"))
            opts = network_options(arch, 3, net_to_med, Path("plans.json"))
            opts.pop("arch")
            net = create_model("nnunet", 3, 2, 3, **opts).eval()
            net.load_state_dict(map_state_dict(saved["network_weights"], net.state_dict(), 3, net_to_med,
                                               Path(f"{name}.pt")))
            perm = (0, 1, 4, 3, 2)  # SimpleITK's (z, y, x) <-> medunet's (x, y, z)
            with torch.no_grad():
                ours = net(saved["x"].permute(*perm)).permute(*perm)
            result["networks"][name] = {
                "max_abs_logit_diff": float((ours - saved["y"]).abs().max()),
                "max_abs_logit": float(saved["y"].abs().max()),
                "weights": len(saved["network_weights"]),
            }
    emit(result, None)


if __name__ == "__main__":
    main()
