"""Prove a bundle faithful: compare every exported format with the Keras model on real images.

Validation is its own step and returns a :class:`ValidationReport` (stored in the manifest, printed as a table).
Real images matter: random noise gives flat softmaxes whose top-1 flips on rounding, which says nothing about a
model in use. The gates judge the conversion, not the model's indecision:

- the **error bound** b = max |Δp| over every image and class is measured per format. An image whose Keras top-1
  margin (best minus second-best probability) is at most 2·min(b, tolerance) is a *near-tie*: a difference within
  the bound may flip its top-1 without anything being wrong with the conversion (a weak model has many). Top-1
  agreement and the accuracy change are counted on the other, *decisive*, images. The tolerance caps the excuse:
  an int8 file whose error reaches 0.4 somewhere does not thereby excuse every flip below a 0.8 margin.
- fp32 (savedmodel, onnx): b <= 1e-4 (the upstream Keras-vs-SavedModel tolerance) and 100% decisive agreement;
- fp16: b <= 0.1 (fp16 keeps ~3 significant digits: a 32-px MobileNetV2 measures ~1e-2 through its ~50 layers;
  weights beyond fp16's range, which the converter clips, or a damaged weight give 0.3 and more), 100% decisive
  agreement, accuracy within 0.5 points of Keras. On a CPU, onnxruntime computes float16 graphs in float32 (only
  the stored weights are float16), so an activation overflow that a GPU would hit is not seen here;
- bf16 (OpenVINO on a CPU matrix engine): fp16's agreement and accuracy rules, b <= 0.2. bfloat16 keeps 8
  significant bits against fp16's 11 (about 8x the rounding error) but float32's range (nothing clips): measured
  9e-2 on the tests' 32-px MobileNetV2, 2e-3 on 224-px random-weight ResNet50/MobileNetV2;
- int8: >= 97% decisive agreement and accuracy within 1.5 points of Keras (no bound: int8 errors are what they are,
  their effect on decisions is what is judged);
- OpenVINO rows (``openvino``, ``openvino-bf16``, ``openvino-int8``) judge an engine on a file already validated
  with onnxruntime. They are advisory for the bundle (``ValidationReport.passed`` covers the files): a failing
  engine row makes that backend refuse to load, it does not refuse the export;
- every format: finite outputs, and a batch of 1 and a batch of N answer the same per image (dynamic batch axis).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.core.manifest import RUNTIME_BACKENDS, FormatEntry, FormatValidation, ValidationReport

logger = logging.getLogger(__name__)

FP32_MAX_ABS_DIFF = 1e-4
# Per-backbone loosening of the fp32 |Δp| gate, only where a measurement showed the need (none so far: every family
# exported in tests/test_export_families.py stays below 1e-4 on CPU).
FP32_MAX_ABS_DIFF_OVERRIDES: dict[str, float] = {}


@dataclass(frozen=True)
class Gate:
    """The rule for one precision. ``tolerance`` caps the error bound used to call an image a near-tie; where
    ``bound_gated`` it is also the largest error bound the format may show."""

    tolerance: float
    bound_gated: bool
    min_decisive_agreement: float
    max_accuracy_drop: float | None  # accuracy points (fraction), judged on decisive images; None: not gated
    batch_consistency: float


GATES: dict[str, Gate] = {
    "fp32": Gate(FP32_MAX_ABS_DIFF, True, 1.0, None, 1e-4),
    "fp16": Gate(0.1, True, 1.0, 0.005, 1e-2),
    "bf16": Gate(0.2, True, 1.0, 0.005, 5e-2),
    "int8": Gate(5e-2, False, 0.97, 0.015, 1e-2),
}
# The class activation map's max |Δ| against Keras' (relative to the largest |value| of the Keras maps, on the
# decisive images whose top-1 agrees), per precision. A map sums ~1000 products of features and weights that largely
# cancel, so the features' rounding shows more in it than in the probabilities: measured on trained bundles fp32
# < 3e-6, fp16 < 0.006, OpenVINO bf16 < 0.033, int8 < 0.085, and on the tests' weak 96-px model up to 1.7e-5, 0.048,
# 0.25 and 0.67 (BENCHMARKS.md). A map beyond its bound is refused by that backend; the format's probabilities are
# judged by their own gate.
CAM_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-1, "bf16": 5e-1, "int8": 5e-1}
MIN_IMAGES = 64
BATCH_SIZE = 32
BATCH_ONE_IMAGES = 8

Predict = Callable[[np.ndarray], np.ndarray]
Explain = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _batched(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def cam_difference(probabilities: np.ndarray, maps: np.ndarray, reference: np.ndarray,
                   reference_maps: np.ndarray, decisive: np.ndarray) -> tuple[float, int]:
    """(max |Δ| of the maps relative to the largest |value| of the Keras maps, images compared): only decisive
    images (a near-tie's map explains an answer the model barely made) whose top-1 agrees (another class, another
    map). One scale for all images: a map that is nearly flat would otherwise turn rounding into a large ratio."""
    same = (probabilities.argmax(1) == reference.argmax(1)) & decisive
    scale = float(np.abs(reference_maps).max()) if reference_maps.size else 0.0
    if not same.any() or scale == 0:
        return 0.0, int(same.sum())
    return float(np.abs(maps[same] - reference_maps[same]).max() / scale), int(same.sum())


def _checker(path: Path) -> tuple[str, bool]:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        return f"onnx.checker: {str(exc).splitlines()[0]}", False
    return "onnx.checker ok", True


def top1_margins(probabilities: np.ndarray) -> np.ndarray:
    """Best minus second-best probability per row."""
    ordered = np.sort(probabilities, axis=1)
    return ordered[:, -1] - ordered[:, -2]


@dataclass(frozen=True)
class Comparison:
    """Converted vs reference probabilities on the same images, judged with near-ties set aside."""

    bound: float  # max |Δp|
    near_tie_margin: float  # images with a reference margin at or below this are near-ties
    decisive: np.ndarray  # bool per image
    agreement: float  # every image
    decisive_agreement: float | None  # None when no image is decisive
    accuracy: float | None
    reference_accuracy: float | None
    accuracy_change: float | None  # decisive images only, over all images (a fraction of the sample)


def compare(probabilities: np.ndarray, reference: np.ndarray, labels: np.ndarray | None,
            tolerance: float) -> Comparison:
    """The measurements every gate is built from (see the module docstring)."""
    finite = bool(np.isfinite(probabilities).all())
    bound = float(np.abs(probabilities - reference).max()) if finite else float("inf")
    near_tie_margin = 2 * min(bound, tolerance)
    decisive = top1_margins(reference) > near_tie_margin
    same = probabilities.argmax(1) == reference.argmax(1)
    decisive_agreement = float(same[decisive].mean()) if decisive.any() else None
    accuracy = reference_accuracy = change = None
    if labels is not None:
        right, reference_right = probabilities.argmax(1) == labels, reference.argmax(1) == labels
        accuracy, reference_accuracy = float(right.mean()), float(reference_right.mean())
        change = float((right[decisive].sum() - reference_right[decisive].sum()) / len(labels))
    return Comparison(bound, near_tie_margin, decisive, float(same.mean()), decisive_agreement, accuracy,
                      reference_accuracy, change)


def judge(comparison: Comparison, precision: str, bound_limit: float | None = None) -> tuple[str, list[str]]:
    """The gate in words and the failures (empty: passed) for one format's :class:`Comparison`."""
    gate = GATES[precision]
    limit = gate.tolerance if bound_limit is None else bound_limit
    rule, failures = [], []
    if gate.bound_gated:
        rule.append(f"max |Δp| ≤ {limit:.0e}")
        if not comparison.bound <= limit:
            failures.append(f"max |Δp| {comparison.bound:.2e} > {limit:.0e}")
    rule.append(f"decisive top-1 ≥ {gate.min_decisive_agreement:.0%}")
    if comparison.decisive_agreement is not None and comparison.decisive_agreement < gate.min_decisive_agreement:
        flips = int(round((1 - comparison.decisive_agreement) * comparison.decisive.sum()))
        failures.append(f"top-1 differs on {flips} of {int(comparison.decisive.sum())} decisive images "
                        f"(Keras margin > {comparison.near_tie_margin:.1e})")
    if gate.max_accuracy_drop is not None:
        rule.append(f"accuracy ≥ Keras - {gate.max_accuracy_drop * 100:g} pt")
        if comparison.accuracy_change is not None and comparison.accuracy_change < -gate.max_accuracy_drop - 1e-12:
            failures.append(f"accuracy {comparison.accuracy_change * 100:+.1f} pt vs Keras on decisive images")
    return ", ".join(rule), failures


def validate_format(
    name: str,
    entry: FormatEntry,
    predict: Predict,
    reference: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray | None,
    backbone: str,
    bundle_dir: Path,
    batch_size: int = BATCH_SIZE,
    explain: Explain | None = None,
    reference_maps: np.ndarray | None = None,
) -> FormatValidation:
    """Compare one format's answers with the Keras ``reference`` probabilities for the same ``images``, and its
    class activation maps with ``reference_maps`` when ``explain`` gives them."""
    precision = RUNTIME_BACKENDS[name].precision
    maps = None
    if explain is not None and reference_maps is not None:
        answers = [explain(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        probabilities, maps = np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])
    else:
        probabilities = _batched(predict, images, batch_size)
    singles = np.concatenate([predict(images[i : i + 1]) for i in range(min(BATCH_ONE_IMAGES, len(images)))])
    consistency = float(np.abs(singles - probabilities[: len(singles)]).max())
    limit = FP32_MAX_ABS_DIFF_OVERRIDES.get(backbone) if precision == "fp32" else None
    comparison = compare(probabilities, reference, labels, GATES[precision].tolerance if limit is None else limit)
    gate, failures = judge(comparison, precision, limit)
    cam = None if maps is None else cam_difference(probabilities, maps, reference, reference_maps,
                                                   comparison.decisive)
    if not np.isfinite(probabilities).all():
        failures.insert(0, f"non-finite probabilities in {int((~np.isfinite(probabilities)).any(1).sum())} images")
    if not consistency <= GATES[precision].batch_consistency:
        failures.append(f"batch 1 vs {batch_size} differ by {consistency:.2e}")
    if cam is not None:
        gate += f"; its map: Δ ≤ {CAM_TOLERANCE[precision]:.0e} or refused"
    checker = "n/a"
    if entry.file.endswith(".onnx"):
        checker, ok = _checker(bundle_dir / entry.file)
        if not ok:
            failures.append(checker)
    diff = np.abs(probabilities - reference)
    return FormatValidation(
        format=name, images=len(images), max_abs_diff=comparison.bound,
        mean_abs_diff=float(diff.mean()) if np.isfinite(diff).all() else float("inf"),
        top1_agreement=comparison.agreement, accuracy=comparison.accuracy,
        keras_accuracy=comparison.reference_accuracy, decisive_images=int(comparison.decisive.sum()),
        decisive_agreement=comparison.decisive_agreement, accuracy_change=comparison.accuracy_change,
        batch_consistency_max_diff=consistency, checker=checker, gate=gate, passed=not failures, failures=failures,
        cam_max_rel_diff=None if cam is None else cam[0], cam_images=None if cam is None else cam[1],
        cam_passed=None if cam is None else cam[0] <= CAM_TOLERANCE[precision],
    )


class _OnnxRunner:
    """A plain CPU onnxruntime session fed the file's declared input dtype (independent of the serving code)."""

    def __init__(self, path: Path, entry: FormatEntry):
        import onnxruntime as ort

        from transferkit.core.system import available_cores

        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cores()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = np.dtype(entry.input_dtype)
        self.outputs = [entry.output_name, *([entry.cam_output] if entry.cam_output else [])]

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(images, dtype=self.dtype)
        return [out.astype(np.float32, copy=False) for out in self.session.run(self.outputs, {self.input_name: batch})]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[0]

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, maps = self._run(images)
        return probabilities, maps


class _SavedModelRunner:
    """The SavedModel's ``serving_default`` signature on the CPU (a GPU's TF32 would blur a 1e-4 comparison)."""

    def __init__(self, path: Path, entry: FormatEntry):
        import tensorflow as tf

        with tf.device("/CPU:0"):
            self._signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        self._tf, self._entry = tf, entry

    def _run(self, images: np.ndarray) -> dict:
        batch = self._tf.constant(np.asarray(images, dtype=np.dtype(self._entry.input_dtype)))
        with self._tf.device("/CPU:0"):
            return self._signature(**{self._entry.input_name: batch})

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._run(images)[self._entry.output_name].numpy().astype(np.float32, copy=False)

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self._run(images)
        return (outputs[self._entry.output_name].numpy().astype(np.float32, copy=False),
                outputs[self._entry.cam_output].numpy().astype(np.float32, copy=False))


def _runner(backend: str, path: Path, entry: FormatEntry, size: int) -> Predict:
    engine = RUNTIME_BACKENDS[backend].engine
    if engine == "tensorflow":
        return _SavedModelRunner(path, entry)
    if engine == "openvino":
        from transferkit.core.openvino import OpenVinoPredictor
        from transferkit.core.system import available_cores

        return OpenVinoPredictor(path, backend, RUNTIME_BACKENDS[backend].precision, size, available_cores(),
                                 entry.input_dtype, outputs=(entry.output_name, entry.cam_output))
    return _OnnxRunner(path, entry)


def _validate_here(name: str, entry: FormatEntry, reference: np.ndarray, images: np.ndarray,
                   labels: np.ndarray | None, backbone: str, bundle_dir: Path,
                   reference_maps: np.ndarray | None = None) -> FormatValidation:
    runner = _runner(name, bundle_dir / entry.file, entry, images.shape[1])
    explain = runner.explain if entry.cam_output else None
    return validate_format(name, entry, runner, reference, images, labels, backbone, bundle_dir,
                           explain=explain, reference_maps=reference_maps)


def _failed_row(name: str, images: int, reason: str) -> FormatValidation:
    return FormatValidation(format=name, images=images, max_abs_diff=float("inf"), mean_abs_diff=float("inf"),
                            top1_agreement=0.0, accuracy=None, keras_accuracy=None, batch_consistency_max_diff=0.0,
                            checker="n/a", gate="runs", passed=False, failures=[reason])


def _validate_engine_rows(names: list[str], formats: dict[str, FormatEntry], reference: np.ndarray,
                          images: np.ndarray, labels: np.ndarray | None, backbone: str,
                          bundle_dir: Path, reference_maps: np.ndarray | None = None) -> list[FormatValidation]:
    """Engine rows in turn (in a child process); an engine that refuses the graph gives a failed row."""
    rows = []
    for name in names:
        try:
            rows.append(_validate_here(name, formats[RUNTIME_BACKENDS[name].format], reference, images, labels,
                                       backbone, bundle_dir, reference_maps))
        except Exception as exc:  # OpenVINO raises its own untyped errors: the row fails with the first line
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rows.append(_failed_row(name, len(images), f"{RUNTIME_BACKENDS[name].engine} cannot run it: {text}"))
    return rows


def _validate_isolated(names: list[str], *args) -> list[FormatValidation]:
    """Engine rows in one child process: OpenVINO 2026.4's CPU plugin crashes (SIGSEGV in ``compile_model``) on some
    graphs that onnxruntime runs, which would kill the export. After a crash each row runs again in a child of its
    own, so that only the crashing engine's row fails (and that backend then refuses the bundle)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_validate_engine_rows, names, *args).result()
    except BrokenProcessPool:
        if len(names) > 1:
            return [row for name in names for row in _validate_isolated([name], *args)]
        engine = RUNTIME_BACKENDS[names[0]].engine
        return [_failed_row(names[0], len(args[2]), f"{engine} crashed loading or running this model")]


def engine_backends(formats: dict[str, FormatEntry], capabilities: frozenset[str] | None = None) -> list[str]:
    """The OpenVINO backends an export can validate here: their file is in ``formats`` and this CPU runs their
    precision natively (none without OpenVINO)."""
    from transferkit.core.openvino import unavailable_reason

    return [b.name for b in RUNTIME_BACKENDS.values()
            if b.engine == "openvino" and b.format in formats and not unavailable_reason(b.precision, capabilities)]


def validate_bundle(
    bundle_dir: Path,
    formats: dict[str, FormatEntry],
    reference: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray | None,
    source: str,
    backbone: str,
    engines: list[str] | None = None,
    reference_maps: np.ndarray | None = None,
) -> ValidationReport:
    """Validate every format in ``formats`` (files under ``bundle_dir``), then every backend of ``engines`` (engine
    rows on those files, see the module docstring), against the Keras ``reference``.

    ``images`` are uint8 RGB pixels, fed to each format in its declared input dtype.
    """
    results = []
    for name in formats:
        logger.info("validating %s on %d images", name, len(images))
        results.append(_validate_here(name, formats[name], reference, images, labels, backbone, bundle_dir,
                                      reference_maps))
    if engines:
        logger.info("validating %s on %d images", ", ".join(engines), len(images))
        results += _validate_isolated(list(engines), formats, reference, images, labels, backbone, bundle_dir,
                                      reference_maps)
    return ValidationReport(source=source, images=len(images), batch_size=BATCH_SIZE,
                            passed=all(r.passed for r in results if r.format in formats), formats=results)
