"""The simplest server a user could write instead of transferkit's service: FastAPI + onnxruntime, no batching.

    TRANSFERKIT_BASELINE_BUNDLE=path/to/bundle uvicorn transferkit.benchmarks.baseline_server:app --workers 2

Each uvicorn worker holds one onnxruntime session with one intra-op thread (CUDA where it loads); a request is
decoded with the same decoder (transferkit.core.images.decode_image) and answered in the same shape as ``/predict``.
Nothing else: no limits, no drain, no metrics. ``transferkit loadtest --compare-baseline`` runs it beside the service.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import JSONResponse

from transferkit.core.errors import InvalidImageError
from transferkit.core.images import decode_image
from transferkit.core.manifest import read_manifest
from transferkit.core.predictors import cuda_libraries_missing, top_k

BUNDLE = Path(os.environ.get("TRANSFERKIT_BASELINE_BUNDLE", "."))
manifest = read_manifest(BUNDLE)
fmt = manifest.formats[os.environ.get("TRANSFERKIT_BASELINE_BACKEND", "onnx")]
options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("TRANSFERKIT_BASELINE_THREADS", "1"))
# On a GPU machine the plain server uses CUDA too (one session per worker, no batching): a fair comparison there.
providers = ["CPUExecutionProvider"] if cuda_libraries_missing() else ["CUDAExecutionProvider", "CPUExecutionProvider"]
session = ort.InferenceSession(str(BUNDLE / fmt.file), options, providers=providers)
app = FastAPI()


@app.get("/readyz")
def ready() -> dict:
    return {"ready": True}


@app.get("/metadata")
def metadata() -> dict:
    return {"name": manifest.name, "classes": manifest.class_names, "image_size": manifest.image_size}


@app.post("/predict")
def predict(images: list[UploadFile] = File(...)):
    try:
        pixels = np.stack([decode_image(f.file.read(), manifest.image_size) for f in images])
    except InvalidImageError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    probabilities = session.run(None, {fmt.input_name: pixels.astype(fmt.input_dtype)})[0]
    return top_k(probabilities, manifest.class_names, 5)
