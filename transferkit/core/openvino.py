"""OpenVINO's CPU plugin on a bundle's ONNX files: f32, bf16 on a CPU matrix engine, int8 from the QDQ file.

Why a second engine: on a CPU with AMX or AVX-512 BF16, OpenVINO computes convolutions in bfloat16 on the matrix
engine (ResNet50 at batch 8: 282 images/s against onnxruntime fp32's 46 on two Xeon cores, BENCHMARKS.md), and
runs the int8 file's quantized operations with VNNI/AMX kernels (ResNet50 on an AMD EPYC with AVX-512 VNNI: 2.6x
its own f32, a little behind onnxruntime's int8 there; BENCHMARKS.md, "int8").
The bundle needs no new file: OpenVINO reads the same ONNX graphs, uint8 input and preprocessing included.

OpenVINO is an optional extra (``transferkit[openvino]``), imported only through :func:`openvino_module`, which keeps
its telemetry off: ``import openvino`` (2026.4) sends an "import" event to Google Analytics unless a consent file in
``~/intel`` says no, because its model-conversion package is imported with it. With ``openvino_telemetry`` absent,
OpenVINO falls back to its own no-op stub (``openvino/tools/ovc/telemetry_stub.py``), so transferkit makes that
module unimportable in its process before OpenVINO is first imported.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np

from transferkit.core.errors import BundleError, UsageError
from transferkit.core.extras import install_hint

EXTRA = "transferkit[openvino]"
# OpenVINO's names for the precisions transferkit records (INFERENCE_PRECISION_HINT).
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the quantized ops run int8, the rest f32
# What OPTIMIZATION_CAPABILITIES must list for a precision to run natively (bf16 is emulated nowhere: without it
# OpenVINO silently computes f32, which would make a "bf16" figure a lie).
NEEDS = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}


@functools.cache
def installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def openvino_module():
    """``import openvino`` with its telemetry client unimportable (see the module docstring)."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: `import` raises ImportError
    import openvino

    return openvino


@functools.cache
def cpu_capabilities() -> frozenset[str]:
    """What OpenVINO's CPU plugin can compute natively here (``BF16`` needs AMX or AVX-512 BF16); empty when
    OpenVINO is not installed."""
    if not installed():
        return frozenset()
    ov = openvino_module()
    return frozenset(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def unavailable_reason(precision: str, capabilities: frozenset[str] | None = None) -> str:
    """Why OpenVINO cannot run ``precision`` on this CPU ("" when it can)."""
    if capabilities is None:
        if not installed():
            return f"OpenVINO is not installed ({install_hint('openvino')})"
        capabilities = cpu_capabilities()
    if NEEDS[precision] not in capabilities:
        what = "AMX or AVX-512 BF16" if precision == "bf16" else NEEDS[precision]
        return f"this CPU has no {what} support in OpenVINO (it offers {', '.join(sorted(capabilities)) or 'none'})"
    return ""


class OpenVinoPredictor:
    """One compiled model; one infer request per calling thread (a request is not thread-safe, the model is).
    ``model_bytes``: the ONNX file's content, already checked against the manifest; the model is read from them
    (``Core.read_model`` takes bytes), and ``path`` only names the file in messages. Without them, the path is read
    (export's validation, on the file it has just written)."""

    def __init__(self, path: Path, backend: str, precision: str, size: int, threads: int, input_dtype: str,
                 model_bytes: bytes | None = None, outputs: tuple[str, str | None] = ("probabilities", None)):
        why = unavailable_reason(precision)
        if why:
            raise UsageError(f"--backend {backend}: {why}")
        core = openvino_module().Core()
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "INFERENCE_NUM_THREADS": threads,
                  "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  # Pinned threads would fight the decode threads and HTTP workers that share these cores.
                  "ENABLE_CPU_PINNING": False}
        try:
            model = core.read_model(model_bytes if model_bytes is not None else str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with a multi-line C++ message
            raise BundleError(f"OpenVINO cannot load {path.name}: {str(exc).strip().splitlines()[0]}") from None
        self.backend, self.precision, self.size, self.threads = backend, precision, size, threads
        self.input_dtype = np.dtype(input_dtype)
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what really runs: f32, bf16
        self.provider = f"OpenVINO:CPU:{ran}"
        self._local = threading.local()
        # By name: a graph with a class activation map has two outputs (probabilities, cam).
        names = {name for port in self.compiled.outputs for name in port.get_names()}
        self._probabilities = self.compiled.output(outputs[0] if outputs[0] in names else 0)
        self._cam = self.compiled.output(outputs[1]) if outputs[1] in names else None
        self.cam_refusal = ""  # why there is no map (Bundle.predictor sets it)

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def _infer(self, images: np.ndarray):
        from transferkit.core.predictors import as_batch

        request = self._request()
        request.infer({0: as_batch(images, self.size, self.input_dtype)})
        return request

    def __call__(self, images: np.ndarray) -> np.ndarray:
        request = self._infer(images)
        return np.array(request.get_tensor(self._probabilities).data, dtype=np.float32)  # a copy: tensors are reused

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, the top class's activation maps [N, h, w]) from one inference."""
        if self._cam is None:
            from transferkit.core.predictors import no_map_error

            raise no_map_error(self.backend, self.cam_refusal)
        request = self._infer(images)
        return (np.array(request.get_tensor(self._probabilities).data, dtype=np.float32),
                np.array(request.get_tensor(self._cam).data, dtype=np.float32))
