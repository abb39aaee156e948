"""Run a bundle: one loader that verifies checksums, and a predictor per backend.

``load_bundle`` accepts a bundle directory or a BentoML model tag, checks every file against the manifest's sha256
before anything is loaded (and refuses links, unlisted files and entries that leave the bundle: core/manifest.py),
and hands out predictors, each built from bytes hashed again as they are read (ONNX and OpenVINO: the session is
created from those bytes, not from the path): ``onnx`` / ``onnx-fp16`` / ``onnx-int8`` through onnxruntime
(CUDA when it really loads, else CPU; the provider in use is reported) and ``savedmodel`` through TensorFlow, which
is imported only for that backend. A predictor maps RGB pixels [N, H, W, 3] (0-255, uint8 or float) to
probabilities [N, C], feeding each format the dtype its manifest entry records: uint8 for schema-2 bundles (the graph
casts on the device, so a quarter of the bytes cross a process or PCIe boundary), float32 for schema-1 bundles.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from transferkit.core.errors import BundleError, NoClassActivationMap, UsageError
from transferkit.core.manifest import (
    MANIFEST_NAME,
    RUNTIME_BACKENDS,
    Manifest,
    entry_path,
    read_manifest,
    verify_bundle,
    verify_entry,
)
from transferkit.core.system import available_cores

Device = Literal["auto", "cpu", "gpu"]


class Predictor(Protocol):
    backend: str
    provider: str  # what actually runs it, e.g. "CUDAExecutionProvider", "CPUExecutionProvider", "TF:CPU"

    def __call__(self, images: np.ndarray) -> np.ndarray: ...

    # (probabilities, the top class's activation maps [N, h, w]); UsageError when the bundle has no map
    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def validation_row(manifest: Manifest, backend: str):
    """The export-time validation row of ``backend`` (None when the export did not validate it)."""
    report = manifest.validation
    return next((row for row in report.formats if row.format == backend), None) if report else None


def map_refusal(manifest: Manifest, backend: str) -> str:
    """Why ``backend`` answers no class activation map for this bundle ("" when it does): the head has none, the
    bundle predates them, or that backend's map failed its bound at export (export/validate.py)."""
    explain = manifest.explain
    if explain is None:
        return "the bundle was exported before transferkit added class activation maps: export it again"
    if not explain.available:
        return explain.reason
    spec = RUNTIME_BACKENDS.get(backend)
    row = validation_row(manifest, backend)
    if row is not None and row.cam_passed is False:
        return (f"the {backend} map differed from Keras's by {row.cam_max_rel_diff:.2f} of its range at export "
                f"({spec.precision if spec else backend} rounding); explain with the fp32 backend (onnx)")
    return ""


def explaining_backend(manifest: Manifest, backend: str) -> str | None:
    """The backend that answers maps for a service or a run on ``backend``: itself when its map passed; else the
    fp32 ``onnx`` file's, when that one passed (its map is the reference's closest); None when neither does."""
    if not map_refusal(manifest, backend):
        return backend
    if backend != "onnx" and "onnx" in manifest.formats and not map_refusal(manifest, "onnx"):
        return "onnx"
    return None


def no_map_error(backend: str, why: str) -> NoClassActivationMap:
    """What every predictor's ``explain`` raises when its backend answers no map (``why``: :func:`map_refusal`)."""
    return NoClassActivationMap(f"no class activation map from {backend}: {why or 'this bundle has none'}")


@functools.cache
def cuda_libraries_missing() -> str:
    """Why onnxruntime's CUDA provider cannot load here ("" when it can be tried).

    Asking for CUDA without its libraries makes onnxruntime print a page of errors before falling back to CPU, on
    every session. ``preload_dlls`` loads CUDA/cuDNN from NVIDIA's pip wheels (onnxruntime-gpu[cuda,cudnn]) when
    they are installed; otherwise the system's libraries must be on the loader path.
    """
    import ctypes

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider"
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls()
    for library in ("libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9"):
        try:
            ctypes.CDLL(library)
        except OSError:
            return f"{library} not found"
    return ""


def as_batch(images: np.ndarray, size: int, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """``images`` as a contiguous [N, size, size, 3] array of the dtype the graph takes."""
    batch = np.asarray(images)
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
        raise UsageError(f"expected images of shape [N, {size}, {size}, 3], got {list(batch.shape)}")
    if dtype == np.uint8 and batch.dtype != np.uint8:
        batch = np.clip(np.rint(batch), 0, 255)  # float pixels 0-255 (older callers): round, never wrap around
    return np.ascontiguousarray(batch, dtype=dtype)


class OnnxPredictor:
    """An onnxruntime session. ``device="auto"`` tries CUDA and falls back to CPU; ``"gpu"`` insists on CUDA.
    ``model_bytes``: the file's content, already checked against the manifest (:meth:`Bundle.predictor`); the
    session is made from them, and ``path`` only names the file in messages. Without them, the path is read."""

    def __init__(self, path: Path, backend: str, size: int, device: Device = "auto", threads: int | None = None,
                 spin: bool = True, input_dtype: str = "float32", device_id: int = 0,
                 model_bytes: bytes | None = None, output_name: str | None = None, cam_output: str | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if not spin:
            # Idle intra-op threads spin-wait by default: right for a benchmark that owns the cores, wrong in a
            # server where decoding and HTTP need the same cores between model calls.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # CUDA probing on a CPU machine would otherwise print a page of warnings
        providers: list = ["CPUExecutionProvider"]
        # The GPU wheel lists CUDA whenever it is installed, libraries present or not: ask for it only when the
        # CUDA libraries load, then check which provider the session really got.
        self.cuda_note = cuda_libraries_missing() if device != "cpu" else "not requested"
        if not self.cuda_note:
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC",
                                                           "device_id": device_id}))
        try:
            model = model_bytes if model_bytes is not None else str(path)
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise BundleError(f"onnxruntime cannot load {path.name}: {str(exc).splitlines()[0]}") from None
        self.provider = self.session.get_providers()[0]
        if device == "gpu" and self.provider != "CUDAExecutionProvider":
            raise UsageError(f"--device gpu: the CUDA provider did not load for {path.name} ("
                             f"{self.cuda_note or 'onnxruntime fell back to ' + self.provider}); install "
                             f"onnxruntime-gpu[cuda,cudnn] and an NVIDIA driver >= 580")
        self.backend = backend
        self.size = size
        self.threads = options.intra_op_num_threads
        self.input_dtype = np.dtype(input_dtype)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = output_name or self.session.get_outputs()[0].name
        self.cam_output = cam_output
        self.cam_refusal = ""  # why cam_output is None (Bundle.predictor sets it)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = as_batch(images, self.size, self.input_dtype)
        return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.cam_output:
            raise no_map_error(self.backend, self.cam_refusal)
        batch = as_batch(images, self.size, self.input_dtype)
        probabilities, maps = self.session.run([self.output_name, self.cam_output], {self.input_name: batch})
        return probabilities.astype(np.float32, copy=False), maps.astype(np.float32, copy=False)


class SavedModelPredictor:
    """The SavedModel's ``serving_default`` signature through TensorFlow (imported only here)."""

    def __init__(self, path: Path, size: int, input_name: str, output_name: str, device: Device = "auto",
                 input_dtype: str = "float32", cam_output: str | None = None):
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus:
            raise UsageError("--device gpu: TensorFlow sees no GPU")
        self._device = "/GPU:0" if gpus and device != "cpu" else "/CPU:0"
        self.provider = f"TF:{self._device[1:4]}"
        with tf.device(self._device):
            self._loaded = tf.saved_model.load(str(path))
        self._signature = self._loaded.signatures["serving_default"]
        self._tf = tf
        self.backend = "savedmodel"
        self.size = size
        self.input_name = input_name
        self.output_name = output_name
        self.cam_output = cam_output
        self.cam_refusal = ""
        self.input_dtype = np.dtype(input_dtype)

    def _run(self, images: np.ndarray) -> dict:
        batch = as_batch(images, self.size, self.input_dtype)
        with self._tf.device(self._device):
            return self._signature(**{self.input_name: self._tf.constant(batch)})

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[self.output_name].numpy().astype(np.float32, copy=False)

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.cam_output:
            raise no_map_error(self.backend, self.cam_refusal)
        outputs = self._run(images)
        return (outputs[self.output_name].numpy().astype(np.float32, copy=False),
                outputs[self.cam_output].numpy().astype(np.float32, copy=False))


@dataclass
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest
    source: str  # what the user named: a directory or a BentoML tag

    def predictor(self, backend: str = "onnx", device: Device = "auto", threads: int | None = None,
                  spin: bool = True, device_id: int = 0) -> Predictor:
        """A predictor for ``backend``; ``device_id`` picks the GPU (a batched service runs one per GPU)."""
        spec = RUNTIME_BACKENDS.get(backend)
        if spec is None:
            raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(RUNTIME_BACKENDS)}")
        entry = self.manifest.formats.get(spec.format)
        if entry is None:
            raise UsageError(f"bundle {self.manifest.name} has no {spec.format} format; it has "
                             f"{', '.join(self.manifest.formats)} (re-export with --formats ...,{spec.format})")
        path = entry_path(self.path, spec.format, entry.file)
        # Read, hashed and checked here, just before use: the bytes an engine loads are the bytes that were hashed.
        model_bytes = verify_entry(self.path, self.manifest, spec.format)
        refusal = map_refusal(self.manifest, backend)
        entry = entry.model_copy(update={"cam_output": None}) if refusal else entry
        predictor = self._engine_predictor(backend, spec, entry, path, model_bytes, device, threads, spin, device_id)
        predictor.cam_refusal = refusal
        return predictor

    def _engine_predictor(self, backend: str, spec, entry, path: Path, model_bytes: bytes, device: Device,
                          threads: int | None, spin: bool, device_id: int) -> Predictor:
        if spec.engine == "tensorflow":
            # Residual risk: TensorFlow loads a SavedModel only by path, so the directory just hashed is opened
            # again by TF. A process that can write into the bundle between the two could swap a file; such a
            # process could as well rewrite the manifest, so the checksum guards against corruption and mistakes,
            # not against a writer. Links are refused by the hash walk, so TF reads nothing outside the bundle, and
            # a SavedModel runs no Python code (graphs only). The ONNX backends leave no such window.
            return SavedModelPredictor(path, self.manifest.image_size, entry.input_name, entry.output_name, device,
                                       entry.input_dtype, entry.cam_output)
        if spec.engine == "openvino":
            from transferkit.core.openvino import OpenVinoPredictor

            if device == "gpu":
                raise UsageError(f"--backend {backend} runs on the CPU; use onnx for --device gpu")
            self.require_validated(backend)
            return OpenVinoPredictor(path, backend, spec.precision, self.manifest.image_size,
                                     threads or available_cores(), entry.input_dtype, model_bytes,
                                     outputs=(entry.output_name, entry.cam_output))
        return OnnxPredictor(path, backend, self.manifest.image_size, device, threads, spin, entry.input_dtype,
                             device_id, model_bytes, entry.output_name, entry.cam_output)

    def validation_of(self, backend: str):
        """The export-time validation row of ``backend`` (None when the export did not validate it)."""
        return validation_row(self.manifest, backend)

    def require_validated(self, backend: str) -> None:
        """An engine that adds no file (OpenVINO) runs only where the export proved it against Keras."""
        from transferkit.core.openvino import EXTRA as OPENVINO_EXTRA

        row = self.validation_of(backend)
        if row is None:
            raise UsageError(f"--backend {backend}: bundle {self.manifest.name} was exported without validating "
                             f"{backend} (OpenVINO missing, or a CPU without that precision, where it was exported); "
                             f"re-export it on this machine with {OPENVINO_EXTRA} installed")
        if not row.passed:
            raise UsageError(f"--backend {backend}: it failed its validation gate at export "
                             f"({'; '.join(row.failures)})")


def resolve_bundle_path(source: str | Path) -> Path:
    """A bundle directory, or the store path of a BentoML model tag (``name`` or ``name:version``)."""
    path = Path(source)
    if path.is_dir():
        return path.absolute()
    text = str(source)
    if "/" in text or text.startswith(".") or path.suffix:
        raise BundleError(f"bundle {text} not found (expected a bundle directory or a BentoML model tag)")
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return Path(bentoml.models.get(text).path)
    except NotFound:
        raise BundleError(f"no bundle directory and no BentoML model named {text!r} "
                          f"(see `bentoml models list`; BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')})"
                          ) from None
    except BentoMLException as exc:
        raise BundleError(f"{text!r} is not a bundle directory or a valid BentoML model tag: {exc}") from None


def load_bundle(source: str | Path, formats: list[str] | None = None) -> Bundle:
    """Read the manifest and verify checksums (of ``formats``, default all) before anything is loaded."""
    path = resolve_bundle_path(source)
    if not os.path.lexists(path / MANIFEST_NAME):  # a linked manifest is refused by read_manifest, with its reason
        raise BundleError(f"{source} is not a transferkit bundle: {MANIFEST_NAME} is missing")
    manifest = read_manifest(path)
    verify_bundle(path, manifest, formats)
    return Bundle(path=path, manifest=manifest, source=str(source))


def top_k(probabilities: np.ndarray, class_names: list[str], k: int = 5) -> list[dict]:
    """Per image: the best label, its score and the ``k`` best ``{label, score}`` pairs."""
    k = max(1, min(k, len(class_names)))
    results = []
    for row in np.asarray(probabilities, dtype=np.float64):
        order = np.argsort(-row, kind="stable")[:k]
        best = [{"label": class_names[i], "score": float(row[i])} for i in order]
        results.append({"label": best[0]["label"], "score": best[0]["score"], "top_k": best})
    return results
