"""Trained ONNX models that others made, shipped in pip wheels (installed with --no-deps by
scripts/setup.sh, found through importlib.metadata; nothing is downloaded at test time).

* rapidocr-onnxruntime 1.4.4: PP-OCR text detector (dynamic H/W), direction classifier
  (3x48x192 in use, dynamic in the file), PP-OCRv4 text recognizer (dynamic width).
* silero-vad: voice activity detector with three inputs (audio chunk, recurrent state, int64
  sample rate).

A test that needs a missing wheel fails when CI=true (the setup must install it) and is skipped
elsewhere.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

#: name -> (distribution, package, resource path inside the package)
MODELS = {
    "ocr-det": ("rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    "ocr-cls": ("rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ocr-rec": ("rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "silero-vad": ("silero-vad", "silero_vad", "data/silero_vad.onnx"),
    "silero-vad-op15": ("silero-vad", "silero_vad", "data/silero_vad_16k_op15.onnx"),
    "silero-vad-op18": ("silero-vad", "silero_vad", "data/silero_vad_op18_ifless.onnx"),
}


def model_path(name: str) -> Path:
    """Path of a real model; fails (CI) or skips (elsewhere) when its wheel is not installed.

    The package is not imported (rapidocr imports onnxruntime-dependent code at import time):
    the file is found through the distribution's file list.
    """
    dist, package, resource = MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
        path = next((Path(f.locate()) for f in files if str(f).replace("\\", "/") == f"{package}/{resource}"), None)
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        message = f"{name}: wheel {dist} not installed (scripts/setup.sh installs it with pip install --no-deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
