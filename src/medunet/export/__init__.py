"""Export a model directory to ONNX (fp32, int8) or TorchScript, checked against PyTorch."""

from medunet.export.exporters import (
    EXPORT_FORMATS,
    ExportResult,
    PadCropNet,
    default_export_path,
    ensure_onnx,
    ensure_onnx_all,
    export_model,
)

__all__ = [
    "EXPORT_FORMATS", "ExportResult", "PadCropNet", "default_export_path", "ensure_onnx", "ensure_onnx_all",
    "export_model",
]
