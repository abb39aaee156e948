"""int8 ONNX: static QDQ quantization in the form that is fast on x86 CPUs, with the most sensitive nodes kept in
float when the quantized model disagrees with the float one.

The form: activations **uint8**, weights int8 per output channel (U8S8). onnxruntime's x86 int8 kernels multiply an
unsigned by a signed byte (VNNI's ``vpdpbusd``, AVX2's ``vpmaddubsw``); signed activations (S8S8, the quantizer's
default) ran ResNet50 at 0.8-1.3x fp32 where U8S8 ran it at 2.9-3.3x (AMD EPYC with AVX-512 VNNI, BENCHMARKS.md,
"int8"). On a CPU without VNNI the 16-bit intermediate of ``vpmaddubsw`` can saturate, so the weights there use 7 bits
(``reduce_range``), as onnxruntime advises.

Calibration: MinMax by default (every range seen in the calibration images); Entropy and Percentile clip outliers,
which helps models whose activations have long tails. When int8's decisive answers agree with fp32's on fewer than
:data:`AGREEMENT_TARGET` of the calibration images, the nodes whose outputs quantize worst (lowest signal-to-noise,
measured with onnxruntime's QDQ debugging tools on the same images) are excluded from quantization, a few more each
round, and the file is quantized again.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.errors import TransferkitError
from transferkit.core.system import matrix_engine_flags
from transferkit.export.validate import GATES, compare

METHODS = ("minmax", "entropy", "percentile")
INPUT_NAME = "image"  # convert.INPUT_NAME: that module imports TensorFlow, which this one (and the CLI) need not
OUTPUT_NAME = "probabilities"  # convert.OUTPUT_NAME
AGREEMENT_TARGET = 0.98  # decisive top-1 agreement with fp32 on the calibration images (the gate asks 0.97 on others)
EXCLUDE_ROUNDS = (4, 12, 32)  # nodes kept in float after each failed round, most sensitive first


class QuantizationError(TransferkitError):
    exit_code = 4
    reason = "export_failed"


@dataclass
class Int8Recipe:
    """How a bundle's int8 file was made: the manifest's ``formats["onnx-int8"].quantization``, shown by the export."""

    method: str = "minmax"
    activations: str = "uint8"
    weights: str = "int8 per channel"
    reduce_range: bool = False
    excluded_nodes: list[str] = field(default_factory=list)
    calibration_agreement: float | None = None

    def describe(self) -> dict:
        return asdict(self)


def recipe_for_this_cpu(method: str = "minmax") -> Int8Recipe:
    """U8S8 everywhere; 7-bit weights where no VNNI instruction keeps the products from saturating. ``method`` is
    one of :data:`METHODS` (export_model refuses others before the slow part)."""
    vnni = any(flag in matrix_engine_flags() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return Int8Recipe(method=method, reduce_range=not vnni)


def _reader(images: np.ndarray, batch_size: int = 16):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([images[i:i + batch_size] for i in range(0, len(images), batch_size)])

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    return Reader()


def beside_the_probabilities(path: Path) -> list[str]:
    """Nodes the probabilities do not depend on (the class activation map's few): kept in float, so that the map
    is computed from the quantized model's features without a quantization step of its own."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {output: node for node in graph.node for output in node.output}
    needed, pending = set(), [OUTPUT_NAME]
    while pending:
        node = producer.get(pending.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            pending.extend(node.input)
    return [node.name for node in graph.node if node.name not in needed]


def _quantize(prepared: Path, path: Path, images: np.ndarray, recipe: Int8Recipe,
              keep_float: list[str] | None = None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe.method]
    quantize_static(str(prepared), str(path), _reader(images), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    reduce_range=recipe.reduce_range,
                    nodes_to_exclude=[*recipe.excluded_nodes, *(keep_float or [])],
                    extra_options={"CalibMaxIntermediateOutputs": 8} if recipe.method != "minmax" else None)


def _probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + 32]})[0]
                           for i in range(0, len(images), 32)])


def calibration_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Decisive top-1 agreement of int8 with fp32, judged as the int8 gate judges it (export/validate.py: near-ties
    set aside); 1.0 when no image is decisive."""
    agreement = compare(candidate, reference, None, GATES["int8"].tolerance).decisive_agreement
    return 1.0 if agreement is None else agreement


def most_sensitive_nodes(source: Path, quantized: Path, images: np.ndarray, count: int) -> list[str]:
    """The ``count`` quantizable nodes whose outputs lose most to quantization on ``images``: the lowest
    signal-to-noise ratio between each float tensor and its quantize-dequantize (onnxruntime's qdq_loss_debug)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory() as scratch:
        float_aug, quant_aug = Path(scratch, "float.onnx"), Path(scratch, "quant.onnx")
        modify_model_output_intermediate_tensors(str(source), str(float_aug))
        modify_model_output_intermediate_tensors(str(quantized), str(quant_aug))
        sample = images[:8]
        float_acts = collect_activations(str(float_aug), _reader(sample, 1))
        quant_acts = collect_activations(str(quant_aug), _reader(sample, 1))
    errors = compute_activation_error(create_activation_matching(quant_acts, float_acts))
    producers = {output: node.name for node in onnx.load(str(source)).graph.node for output in node.output}
    ranked = sorted((err["qdq_err"], producers[name]) for name, err in errors.items()
                    if name in producers and np.isfinite(err.get("qdq_err", np.nan)))
    return [node for _, node in ranked[:count]]


def write_onnx_int8(source: Path, path: Path, calibration_images: np.ndarray, method: str = "minmax") -> Int8Recipe:
    """Quantize ``source`` (fp32 ONNX, uint8 input) to ``path``; returns how (see the module docstring)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from transferkit.export.convert import quiet_converters

    if len(calibration_images) == 0:
        raise QuantizationError("int8 quantization needs calibration images and the training split is empty")
    recipe = recipe_for_this_cpu(method)
    prepared = path.with_name(path.stem + ".prep.onnx")
    try:
        with quiet_converters():
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            reference = _probabilities(source, calibration_images)
            keep_float = beside_the_probabilities(prepared)
            for round_ in range(len(EXCLUDE_ROUNDS) + 1):
                _quantize(prepared, path, calibration_images, recipe, keep_float)
                recipe.calibration_agreement = calibration_agreement(reference,
                                                                     _probabilities(path, calibration_images))
                if recipe.calibration_agreement >= AGREEMENT_TARGET or round_ == len(EXCLUDE_ROUNDS):
                    break
                more = EXCLUDE_ROUNDS[round_] - len(recipe.excluded_nodes)  # the excluded ones are float now
                recipe.excluded_nodes += most_sensitive_nodes(prepared, path, calibration_images, more)
    except TransferkitError:
        raise
    except Exception as exc:
        raise QuantizationError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from None
    finally:
        if prepared.exists():
            os.remove(prepared)
    return recipe
