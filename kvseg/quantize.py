"""Static int8 quantisation of an exported model with ONNX Runtime, calibrated on training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvseg.onnx_model import quiet


class _CalibrationReader:
    """Feeds training images to ONNX Runtime's static quantisation, one batch at a time."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}

    def rewind(self) -> None:  # part of the CalibrationDataReader interface; one pass is enough here
        return None


def quantize_int8(fp32_path: Path, out_path: Path, calibration: list[np.ndarray]) -> None:
    """Static int8 quantisation in QDQ format (per-channel weights), calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_name(out_path.name + ".pre.onnx")
    try:
        with quiet():
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(out_path), _CalibrationReader(calibration),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    finally:
        prepared.unlink(missing_ok=True)
