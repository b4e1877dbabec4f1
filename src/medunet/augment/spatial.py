"""Spatial augmentations applied to image and label together, per sample of a batch."""

from __future__ import annotations

import torch


def flip_rot90(images: torch.Tensor, labels: torch.Tensor, p_flip: float = 0.5,
               p_rot90: float = 0.5, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random mirroring along every spatial axis and 90-degree rotations in square planes.

    ``images`` is ``(B, C, *S)``, ``labels`` ``(B, *S)``. Rotations use only axis pairs of
    equal size so the patch shape is kept (for 2D: the only plane; for 3D: any square plane).
    Both tensors are transformed with the same draw, so they stay aligned.
    """
    nsp = images.ndim - 2
    out_i, out_l = [], []
    planes = [(a, b) for a in range(nsp) for b in range(a + 1, nsp)
              if images.shape[2 + a] == images.shape[2 + b]]
    for i in range(images.shape[0]):
        img, lab = images[i], labels[i]
        draws = torch.rand(nsp + 2, generator=generator)
        flip_axes = [a for a in range(nsp) if draws[a] < p_flip]
        if flip_axes:
            img = torch.flip(img, [1 + a for a in flip_axes])
            lab = torch.flip(lab, flip_axes)
        if planes and draws[nsp] < p_rot90:
            a, b = planes[int(draws[nsp + 1] * len(planes)) % len(planes)]
            k = int(torch.randint(1, 4, (1,), generator=generator))
            img = torch.rot90(img, k, (1 + a, 1 + b))
            lab = torch.rot90(lab, k, (a, b))
        out_i.append(img)
        out_l.append(lab)
    return torch.stack(out_i), torch.stack(out_l)
