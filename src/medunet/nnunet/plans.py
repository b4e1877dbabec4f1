"""nnU-Net v2's ``plans.json`` + ``dataset.json`` as a medunet :class:`~medunet.planning.Plan`.

Everything is translated into settings medunet's own pipeline already has, so the imported
model runs through the same Predictor, backends and exports as a trained one:

- **Axes.** nnU-Net's networks see its reader's array order after ``transpose_forward``;
  medunet's readers give ``(x, y, z)`` (PNG: rows, columns). Instead of transposing every
  image, the plan and the weights are permuted into medunet's axis order (a convolution
  with a permuted kernel on permuted data is the same convolution), see :func:`axis_map`.
- **Preprocessing.** Crop to the non-zero box, normalise *before* resampling
  (``normalize_first``), third-order spline resampling clipped to the input's range
  (``clip_resampled``, as scikit-image's ``resize``), order 0 across a thick axis chosen per
  case by nnU-Net's anisotropy rule (``separate_z: auto``); the normalisation schemes map onto
  medunet's (``zscore`` with nnU-Net's filled non-zero mask, ``ct``, ``minmax``, ``rgb``, ``none``).
- **Prediction.** Gaussian sliding window at the plan's patch with step 0.5, nnU-Net's
  Gaussian (``window_weights: nnunet``), images smaller than the patch padded on both sides
  (``pad: center``), logits averaged over windows, mirrors and folds (``average: logits``),
  mirroring on the axes the checkpoint allows (``mirror_axes``) by default, logits resampled
  back linearly, then the argmax.

Anything without an exact counterpart is refused with a one-line error naming the file.
"""

from __future__ import annotations

from pathlib import Path

from medunet.errors import InputError
from medunet.planning import Plan
from medunet.planning.plan import default_training, value_reasons

NETWORKS = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "plain",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "residual",
}
NORMS = {"InstanceNorm": "instance", "BatchNorm": "batch"}
NONLINS = {"torch.nn.LeakyReLU": "leakyrelu", "torch.nn.modules.activation.LeakyReLU": "leakyrelu",
           "torch.nn.ReLU": "relu", "torch.nn.modules.activation.ReLU": "relu"}
# nnU-Net's readers and how their array axes relate to medunet's: medunet reads volumes as (x, y, z)
# (SimpleITK's arrays are (z, y, x): reversed), nibabel's order is medunet's, 2D natural images
# are (rows, columns) in both
READERS = {"SimpleITKIO": "reverse", "NibabelIO": "same", "NaturalImage2DIO": "same"}
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


def configuration_of(plans: dict, name: str, path: Path) -> dict:
    """The configuration ``name`` with ``inherits_from`` resolved (child keys win)."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise InputError(f"plans.json has no configuration '{name}' (it has {', '.join(configs) or 'none'})",
                         path, "import a result folder of one of those configurations")
    chain, seen = [], set()
    while name is not None:
        if name in seen or name not in configs:
            raise InputError(f"configuration '{name}' inherits from a missing or circular parent", path)
        seen.add(name)
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    merged: dict = {}
    for part in reversed(chain):
        merged.update(part)
    return merged


def axis_map(reader: str, dim: int, transpose_forward: list[int], path: Path) -> list[int]:
    """For each axis the network sees (nnU-Net's order), the medunet image axis it is."""
    how = READERS.get(reader)
    if how is None:
        raise InputError(f"image reader '{reader}' is not supported (supported: {', '.join(READERS)})",
                         path, "convert the dataset to NIfTI or PNG and train nnU-Net with SimpleITKIO")
    # nnU-Net arrays are always 3D (2D images get a leading axis of 1); medunet's axis for each
    raw = list(range(3)) if dim == 3 else [-1, 0, 1]
    if how == "reverse":
        raw = raw[::-1] if dim == 3 else [-1, 1, 0]
    tf = [int(a) for a in transpose_forward]
    if sorted(tf) != [0, 1, 2]:
        raise InputError(f"transpose_forward {tf} is not a permutation of 3 axes", path)
    net = [raw[a] for a in tf]
    if dim == 2:
        if net[0] != -1:
            raise InputError("2D data with the image axes transposed onto the slice axis", path)
        net = net[1:]
    return net


def to_medunet(values: list, net_to_med: list[int]) -> list:
    """Per-axis values in the network's order -> medunet's axis order."""
    out: list = [None] * len(net_to_med)
    for i, m in enumerate(net_to_med):
        out[m] = values[i]
    return out


def _norm_kind(name: str | None, kwargs: dict | None, path: Path) -> str:
    if name is None:
        return "none"
    short = name.rsplit(".", 1)[-1]
    kind = next((v for k, v in NORMS.items() if short.startswith(k)), None)
    kw = kwargs or {}
    if kind is None or float(kw.get("eps", 1e-5)) != 1e-5 or not kw.get("affine", True):
        raise InputError(f"norm {short} {kw} has no exact counterpart (instance or batch norm, eps 1e-5, "
                         "affine)", path)
    return kind


def network_options(arch: dict, dims: int, net_to_med: list[int], path: Path) -> dict:
    """``network`` plan fields for :class:`medunet.nets.nnunet.NnUNet` from ``architecture``."""
    cls = arch.get("network_class_name", "")
    encoder = NETWORKS.get(cls)
    if encoder is None:
        raise InputError(f"network class '{cls}' is not supported (supported: "
                         f"{', '.join(n.rsplit('.', 1)[-1] for n in NETWORKS)})", path)
    kw = arch.get("arch_kwargs") or {}
    unsupported = {k: kw[k] for k in ("block", "bottleneck_channels", "stem_channels", "pool")
                   if kw.get(k) not in (None, "BasicBlockD", "conv",
                                        "dynamic_network_architectures.building_blocks.residual.BasicBlockD")}
    if encoder == "residual" and kw.get("stem_channels") not in (None, kw["features_per_stage"][0]):
        unsupported["stem_channels"] = kw["stem_channels"]
    if unsupported:
        raise InputError(f"{cls.rsplit('.', 1)[-1]} with {unsupported} is not supported", path)
    conv_dims = 3 if "Conv3d" in str(kw.get("conv_op", "")) else 2
    if conv_dims > dims:
        raise InputError(f"a 3D network for {dims}D data", path)
    # a 2D network on 3D data (nnU-Net's 2d configuration) runs slice by slice: medunet builds it
    # 3D with kernel and stride 1 on the slice axis (the first after transpose_forward)
    lift = [1] if conv_dims < dims else []
    nonlin = NONLINS.get(str(kw.get("nonlin")))
    slope = (kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01)
    if nonlin is None or (nonlin == "leakyrelu" and float(slope) != 0.01):
        raise InputError(f"non-linearity {kw.get('nonlin')} {kw.get('nonlin_kwargs')} is not supported "
                         "(LeakyReLU 0.01 or ReLU)", path)
    strides = [lift + ([int(v) for v in s] if isinstance(s, list) else [int(s)] * conv_dims)
               for s in kw["strides"]]
    kernels = [lift + ([int(v) for v in k] if isinstance(k, list) else [int(k)] * conv_dims)
               for k in kw["kernel_sizes"]]
    if any(v != 1 for v in strides[0]):
        raise InputError(f"the first stage down-samples (strides {strides[0]})", path)
    n_stages = int(kw.get("n_stages", len(kw["features_per_stage"])))
    per_stage = kw.get("n_blocks_per_stage") if encoder == "residual" else kw.get("n_conv_per_stage")
    return {
        "arch": "nnunet", "encoder": encoder,
        "features": [int(f) for f in kw["features_per_stage"]][:n_stages],
        "strides": [to_medunet(s, net_to_med) for s in strides[1:n_stages]],
        "kernel_sizes": [to_medunet(k, net_to_med) for k in kernels[:n_stages]],
        "n_convs": [int(n) for n in per_stage] if isinstance(per_stage, list) else int(per_stage),
        "decoder_convs": [int(n) for n in kw["n_conv_per_stage_decoder"]]
        if isinstance(kw["n_conv_per_stage_decoder"], list) else int(kw["n_conv_per_stage_decoder"]),
        "conv_bias": bool(kw.get("conv_bias", False)),
        "norm": _norm_kind(kw.get("norm_op"), kw.get("norm_op_kwargs"), path), "act": nonlin,
        "deep_supervision": True,  # nnU-Net always trains (and saves) every decoder head
    }


def normalization(config: dict, plans: dict, n_channels: int, path: Path) -> list[dict]:
    """One medunet normalisation scheme per channel, with nnU-Net's stored statistics."""
    schemes = config.get("normalization_schemes") or []
    masks = config.get("use_mask_for_norm") or [False] * len(schemes)
    if len(schemes) != n_channels:
        raise InputError(f"plans.json has {len(schemes)} normalisation schemes for {n_channels} channels",
                         path)
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    out = []
    for c, (name, masked) in enumerate(zip(schemes, masks, strict=True)):
        if name == "ZScoreNormalization":
            out.append({"scheme": "zscore", **({"nonzero_mask": "filled"} if masked else {})})
        elif name == "CTNormalization":
            p = props.get(str(c))
            if not p:
                raise InputError(f"CTNormalization of channel {c} without its intensity statistics", path)
            out.append({"scheme": "ct", "lower": float(p["percentile_00_5"]),
                        "upper": float(p["percentile_99_5"]), "mean": float(p["mean"]),
                        "std": max(float(p["std"]), 1e-8)})
        elif name == "NoNormalization":
            out.append({"scheme": "none"})
        elif name == "RescaleTo01Normalization":
            out.append({"scheme": "minmax"})
        elif name == "RGBTo0_1Normalization":
            out.append({"scheme": "rgb", "mean": 0.0, "std": 1.0})
        else:
            raise InputError(f"normalisation scheme '{name}' is not supported", path)
    return out


def labels_of(dataset: dict, path: Path) -> tuple[list[str], list[int]]:
    """Label names and values the network predicts (the ``ignore`` label is not one)."""
    labels = dataset.get("labels") or {}
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise InputError("region-based training (labels as lists of values) is not supported", path)
    pairs = sorted((int(v), str(k)) for k, v in labels.items() if k != "ignore")
    if [v for v, _ in pairs] != list(range(len(pairs))):
        raise InputError(f"labels {dict(labels)} are not 0..K-1", path)
    return [n for _, n in pairs], [v for v, _ in pairs]


def make_plan(plans: dict, dataset: dict, configuration: str, mirror_axes: list[int] | None,
              plans_path: Path, dataset_path: Path) -> tuple[Plan, list[int]]:
    """The medunet plan of one nnU-Net configuration, and the network-to-medunet axis map."""
    if configuration not in CONFIGURATIONS:
        raise InputError(f"configuration '{configuration}' is not supported (supported: "
                         f"{', '.join(CONFIGURATIONS)}; a cascade stage needs the previous stage's output)",
                         plans_path)
    if "architecture" not in configuration_of(plans, configuration, plans_path):
        raise InputError("plans.json has no 'architecture' section: plans of an nnU-Net version before 2.4 "
                         "(or of an unknown version)", plans_path, "re-plan with a current nnU-Net v2")
    config = configuration_of(plans, configuration, plans_path)
    if config.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise InputError(f"preprocessor {config['preprocessor_name']} is not supported", plans_path)
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
            raise InputError(f"{key} {config[key]} is not supported", plans_path)
    data_kw = config.get("resampling_fn_data_kwargs") or {}
    if int(data_kw.get("order_z", 0)) != 0 or int((config.get("resampling_fn_probabilities_kwargs") or {})
                                                   .get("order", 1)) != 1:
        raise InputError("resampling orders other than nnU-Net's defaults (order_z 0, probabilities 1) "
                         "are not supported", plans_path)
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    names = [str(channels[k]) for k in sorted(channels, key=int)]
    label_names, label_values = labels_of(dataset, dataset_path)
    spacing_3d = [float(v) for v in plans.get("original_median_spacing_after_transp") or []]
    shape_3d = [float(v) for v in plans.get("original_median_shape_after_transp") or []]
    slices = len(config["patch_size"]) == 2 and not (spacing_3d and spacing_3d[0] >= 999)
    dim = 3 if len(config["patch_size"]) == 3 or slices else 2
    reader = plans.get("image_reader_writer") or "SimpleITKIO"
    net_to_med = axis_map(reader, dim, plans.get("transpose_forward", [0, 1, 2]), plans_path)
    # per-axis values in the network's order; a 2d configuration of 3D data adds the slice axis
    # (patch 1, its median spacing and size: each case keeps its own spacing there)
    if slices and len(spacing_3d) != 3:
        raise InputError("plans.json lacks original_median_spacing_after_transp (needed for a 2d "
                         "configuration of 3D data)", plans_path)

    def lead(values: list, first: float) -> list:
        return [first, *values] if slices else list(values)

    first_spacing = spacing_3d[0] if slices else 0.0
    first_size = shape_3d[0] if slices and len(shape_3d) == 3 else 1.0
    network = network_options(config["architecture"], dim, net_to_med, plans_path)
    shift = 1 if slices else 0  # the 2D network's axes are the last two
    axes = None if mirror_axes is None else sorted(net_to_med[int(a) + shift] for a in mirror_axes)
    force = data_kw.get("force_separate_z")
    patch = [int(p) for p in to_medunet(lead(config["patch_size"], 1), net_to_med)]
    inference = {"tta": "flip" if axes else "none", "mirror_axes": axes or [], "average": "logits",
                 "window_weights": "nnunet", "pad": "center", "overlap": 0.5, "sigma_scale": 0.125}
    # medunet's measured training defaults: used only when the model is fine-tuned or distilled
    training = default_training(dim, patch)
    plan = Plan(
        dataset_name=str(plans.get("dataset_name", dataset.get("name", "nnunet"))), dim=dim,
        in_channels=len(names), channel_names=names, label_names=label_names, label_values=label_values,
        spacing=[float(s) for s in to_medunet(lead(config["spacing"], first_spacing), net_to_med)],
        median_shape=[int(round(float(s))) for s in to_medunet(
            lead(config["median_image_size_in_voxels"], first_size), net_to_med)],
        normalization=normalization(config, plans, len(names), plans_path),
        patch_size=patch, batch_size=int(config.get("batch_size", 2)), network=network,
        training=training, inference=inference, reasons=value_reasons(training, inference),
        preprocessing={"crop_nonzero": True, "resample": True, "image_order": int(data_kw.get("order", 3)),
                       "separate_z": None if force is False else "auto", "normalize_first": True,
                       "clip_resampled": True, "label_mode": "nearest",
                       "keep_spacing_axes": [net_to_med[0]] if slices else []},
        configuration="2d" if slices else f"{dim}d", configurations=["2d" if slices else f"{dim}d"],
    )
    return plan, net_to_med
