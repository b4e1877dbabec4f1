"""nnU-Net v2 checkpoints: read without unpickling code, map every weight by name and shape.

``checkpoint_final.pth`` is a pickled dict (weights, optimiser state, logging lists with numpy
scalars, the trainer's init arguments). ``torch.load(weights_only=True)`` refuses every
global that is not a tensor or a plain container; the numpy scalar and dtype reconstructors
are the only ones such a file needs, so exactly those are allowed (:data:`SAFE_GLOBALS`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from medunet.errors import InputError

_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
SAFE_GLOBALS = [_core.multiarray.scalar, np.dtype,
                *{type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")}]

# nnU-Net state-dict names -> NnUNet's (see medunet.nets.nnunet); a ConvBlock's body is
# [conv, norm, act] * n, so conv i is body.{3i}, its norm body.{3i + 1}
_RULES = [
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(\w+)$"),
     lambda m: f"stages.{m[1]}.body.{3 * int(m[2]) + (m[3] == 'norm')}.{m[4]}"),
    (re.compile(r"^encoder\.stem\.convs\.(\d+)\.(conv|norm)\.(\w+)$"),
     lambda m: f"stem.body.{3 * int(m[1]) + (m[2] == 'norm')}.{m[3]}"),
    (re.compile(r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv([12])\.(conv|norm)\.(\w+)$"),
     lambda m: f"stages.{m[1]}.{m[2]}.body.{3 * (int(m[3]) - 1) + (m[4] == 'norm')}.{m[5]}"),
    # the shortcut: [average pool (when strided)], 1x1 conv, norm; nnU-Net's index is the conv's
    (re.compile(r"^encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(\d+)\.(conv|norm)\.(\w+)$"),
     lambda m: f"stages.{m[1]}.{m[2]}.shortcut.{int(m[3]) + (m[4] == 'norm')}.{m[5]}"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(\w+)$"),
     lambda m: f"decoders.{m[1]}.body.{3 * int(m[2]) + (m[3] == 'norm')}.{m[4]}"),
    (re.compile(r"^decoder\.transpconvs\.(\d+)\.(\w+)$"), lambda m: f"ups.{m[1]}.{m[2]}"),
    (re.compile(r"^decoder\.seg_layers\.(\d+)\.(\w+)$"), lambda m: f"heads.{m[1]}.{m[2]}"),
]
# the same tensors registered twice in nnU-Net's modules (all_modules repeats conv/norm; the
# decoder keeps a reference to the encoder)
_DUPLICATE = re.compile(r"(^decoder\.encoder\.|\.all_modules\.)")


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's dict, unpickled with only tensors, containers and numpy scalars allowed."""
    if not path.is_file():
        raise InputError("checkpoint not found", path,
                         "train that fold with nnU-Net, or choose other --folds")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs anything else is refused, never executed
        raise InputError(f"cannot read the checkpoint safely ({str(exc).splitlines()[0][:200]})", path,
                         "it must be an nnU-Net v2 checkpoint_final.pth / checkpoint_best.pth") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise InputError("not an nnU-Net v2 checkpoint (no 'network_weights')", path)
    return ckpt


def medunet_name(key: str) -> str | None:
    """The NnUNet state-dict name of an nnU-Net one; None for a duplicate; KeyError when unknown."""
    if _DUPLICATE.search(key):
        return None
    for pattern, name in _RULES:
        m = pattern.match(key)
        if m:
            return name(m)
    raise KeyError(key)


def permute_kernel(t: torch.Tensor, dims: int, net_to_med: list[int], lift: bool = False) -> torch.Tensor:
    """A conv weight ``(out, in, *kernel)`` with its kernel axes moved from the network's order
    into medunet's (1-D tensors: norms, biases, are returned as they are). ``lift``: the weight
    is a 2D network's, run slice by slice in a 3D one: it gains a kernel axis of 1 first."""
    if lift and t.ndim == dims + 1:
        t = t.unsqueeze(2)
    if t.ndim != dims + 2 or net_to_med == list(range(dims)):
        return t
    inverse = [net_to_med.index(j) for j in range(dims)]
    return t.permute(0, 1, *[2 + i for i in inverse]).contiguous()


def map_state_dict(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], dims: int,
                   net_to_med: list[int], path: Path, lift: bool = False) -> dict[str, torch.Tensor]:
    """nnU-Net's weights under the target network's names, permuted and checked: every target
    entry is filled with a tensor of its shape and every nnU-Net weight is used (``lift``: see
    :func:`permute_kernel`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        try:
            name = medunet_name(key)
        except KeyError:
            raise InputError(f"checkpoint weight '{key}' belongs to no layer of the plan's network", path,
                             "the checkpoint does not match its plans.json") from None
        if name is None:
            continue
        if name not in target:
            raise InputError(f"checkpoint weight '{key}' has no place in the plan's network ({name})", path,
                             "the checkpoint does not match its plans.json")
        value = permute_kernel(value, dims, net_to_med, lift)
        if tuple(value.shape) != tuple(target[name].shape):
            raise InputError(f"checkpoint weight '{key}' has shape {tuple(value.shape)}, the plan's network "
                             f"needs {tuple(target[name].shape)}", path, "the checkpoint does not match its "
                             "plans.json")
        out[name] = value.to(target[name].dtype)
    missing = [k for k in target if k not in out]
    if missing:
        raise InputError(f"the checkpoint lacks {len(missing)} weight(s) of the plan's network, e.g. "
                         f"{missing[0]}", path, "the checkpoint does not match its plans.json")
    return out
