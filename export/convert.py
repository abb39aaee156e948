"""Turn a Keras classifier into SavedModel, ONNX fp32, ONNX fp16 and ONNX int8 files.

All formats are traced from one function, ``serve(image) -> {"probabilities": model(float32(image), training=False)}``,
with a named input spec: unnamed Keras inputs get process-dependent names (``keras_tensor_123``) that would leak into
the files, and tf2onnx renames outputs only when the function returns a dict. The model already contains the
backbone's preprocessing layer, so every format takes RGB pixels 0-255; they arrive as uint8 (what the decoder
produces: a quarter of float32's bytes across a process or PCIe boundary) and the cast to float32 is the graph's
first node.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from transferkit.core.errors import TransferkitError
from transferkit.training.cam import CamSource

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
CAM_OUTPUT_NAME = "cam"  # the top class's activation map [N, h, w], where the head has an exact one (training/cam.py)
INPUT_DTYPE = "uint8"  # every format of a schema-2 bundle (manifest FormatEntry.input_dtype)
DEFAULT_OPSET = 17


class ConversionError(TransferkitError):
    exit_code = 4
    reason = "export_failed"


def input_spec(image_size: int) -> tf.TensorSpec:
    return tf.TensorSpec((None, image_size, image_size, 3), tf.dtypes.as_dtype(INPUT_DTYPE), name=INPUT_NAME)


def serving_function(model: keras.Model, cam: CamSource | None = None) -> Callable:
    """``image -> {"probabilities"}``, and ``"cam"`` (the top class's map) when ``cam`` says where it comes from.

    One forward pass gives both; the map adds h·w·k multiply-adds (7·7·1280 for a 224-px MobileNetV2), so every
    format carries it: onnxruntime computes every output of a graph whichever are fetched."""
    if cam is None:
        def serve(image):
            return {OUTPUT_NAME: model(tf.cast(image, tf.float32), training=False)}

        return serve
    explainer = cam.explainer
    kernel = cam.dense.kernel.value  # the variable: frozen into the ONNX graph, tracked by the SavedModel

    def serve_explained(image):
        probabilities, features = explainer(tf.cast(image, tf.float32), training=False)
        weights = tf.gather(tf.transpose(kernel), tf.argmax(probabilities, axis=1))  # [N, k]: each top class's
        maps = tf.reduce_sum(features * weights[:, tf.newaxis, tf.newaxis, :], axis=-1)
        return {OUTPUT_NAME: probabilities, CAM_OUTPUT_NAME: maps}

    return serve_explained


def write_saved_model(model: keras.Model, image_size: int, path: Path, cam: CamSource | None = None) -> None:
    """A forward-only SavedModel with ``serve`` and ``serving_default`` signatures (keras ExportArchive)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serve", fn=serving_function(model, cam), input_signature=[input_spec(image_size)])
    archive.write_out(str(path), verbose=False)


@contextlib.contextmanager
def quiet_converters():
    """tf2onnx and the quantizer log every step at INFO on stdout/stderr; keep the CLI's output readable."""
    import logging

    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("tf2onnx", "onnxruntime", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            yield
        finally:
            logging.getLogger().setLevel(previous)


_erfc_registered = False


def _register_erfc() -> None:
    """tf2onnx 1.17 has no handler for ``Erfc``, which Keras' exact GELU (ConvNeXt) emits: erfc(x) = 1 - erf(x)."""
    global _erfc_registered
    if _erfc_registered:
        return
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 (registered by the decorator)
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            node.type = "Erf"
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
            ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(f"{node.name}_erfc"),
                                          inputs=[one.output[0], node.output[0]])

    _erfc_registered = True


@contextlib.contextmanager
def _without_forced_xla():
    """Trace without ``tf.function(jit_compile=True)``.

    Keras' TensorFlow backend runs grouped convolutions (ConvNeXt's depthwise blocks) through an XLA-compiled inner
    function, which tf2onnx cannot inline ("No Op registered for StatefulPartitionedCall"). Traced without the
    flag, the same convolution becomes one ONNX ``Conv`` with ``group``, which onnxruntime runs. Only the ONNX trace
    uses this; the SavedModel keeps Keras' behaviour (TF's CPU kernels need XLA for grouped convolutions).
    """
    original = tf.function

    def without_jit(*args, **kwargs):
        kwargs.pop("jit_compile", None)
        return original(*args, **kwargs)

    tf.function = without_jit
    try:
        yield
    finally:
        tf.function = original


CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"


@contextlib.contextmanager
def _optimizer_errors_raised():
    """tf2onnx deep-copies the whole graph before each of its optimizers, so that one that fails can be skipped: a
    sixth of an export's time (ConvNeXtTiny, VGG16, MobileNetV2: 13 of 75 s). With TF2ONNX_CATCH_ERRORS set it does
    not copy (in tf2onnx 1.17 any value means "do not catch": it compares the variable's name, not its value), and
    :func:`write_onnx` converts again the careful way only if an optimizer raises."""
    previous = os.environ.get(CATCH_ERRORS)
    os.environ[CATCH_ERRORS] = "FALSE"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[CATCH_ERRORS]
        else:
            os.environ[CATCH_ERRORS] = previous


def write_onnx(model: keras.Model, image_size: int, path: Path, opset: int = DEFAULT_OPSET,
               cam: CamSource | None = None) -> None:
    """fp32 ONNX through ``tf2onnx.convert.from_function``.

    ``from_keras`` is not used: with Keras 3 it fails on auto-named tensors (onnx/tensorflow-onnx#2448).
    """
    import tf2onnx

    _register_erfc()
    function = tf.function(serving_function(model, cam), input_signature=[input_spec(image_size)])

    def convert() -> None:
        tf2onnx.convert.from_function(function, input_signature=[input_spec(image_size)], opset=opset,
                                      output_path=str(path))

    try:
        with quiet_converters(), _without_forced_xla():
            try:
                with _optimizer_errors_raised():
                    convert()
            except Exception:  # an optimizer that fails: convert again, letting tf2onnx skip it as it would
                convert()
    except Exception as exc:  # tf2onnx raises whatever its handlers raise
        raise ConversionError(f"tf2onnx could not convert the model to ONNX opset {opset}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    with _without_forced_xla():
        concrete = function.get_concrete_function()
    _tidy_graph(path, concrete)


def _tidy_graph(path: Path, concrete) -> None:
    """Fold captured constants (below) and put ``probabilities`` first among the outputs: tf2onnx orders a dict's
    outputs by name ("cam" before "probabilities"), and a consumer that takes output 0 expects the probabilities."""
    import onnx

    model = onnx.load(str(path))
    changed = _fold_captured_constants(model, concrete)
    outputs = sorted(model.graph.output, key=lambda output: output.name != OUTPUT_NAME)
    if [o.name for o in outputs] != [o.name for o in model.graph.output]:
        copies = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in outputs]
        del model.graph.output[:]
        model.graph.output.extend(copies)
        changed = True
    if changed:
        onnx.save(model, str(path))


def _fold_captured_constants(model, concrete) -> bool:
    """Turn graph inputs that are really captured constants into initializers (or drop them when unused); True when
    the graph changed.

    tf2onnx freezes captured *variables* but leaves captured eager *tensors* as graph inputs. Keras'
    ``Normalization`` layer (inside every EfficientNet) keeps its mean and variance as such tensors, so the exported
    model would demand two extra inputs besides "image".
    """
    from onnx import numpy_helper

    captured = {placeholder.name: value for value, placeholder in zip(concrete.captured_inputs,
                                                                     concrete.graph.internal_captures)
                if value.dtype != tf.resource}
    extra = [i for i in model.graph.input if i.name != INPUT_NAME]
    if not extra:
        return False
    unknown = [i.name for i in extra if i.name not in captured]
    if unknown:
        raise ConversionError(f"the ONNX model has inputs besides {INPUT_NAME!r} that are not captured constants: "
                              f"{', '.join(unknown)}")
    consumed = {name for node in model.graph.node for name in node.input}
    for graph_input in extra:
        if graph_input.name in consumed:  # often tf2onnx has already folded the value and nothing reads the input
            model.graph.initializer.append(numpy_helper.from_array(captured[graph_input.name].numpy(),
                                                                   graph_input.name))
        model.graph.input.remove(graph_input)
    return True


def write_onnx_fp16(source: Path, path: Path) -> None:
    """float16 weights and compute; the same uint8 input and float32 output as the fp32 file (callers unchanged)."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    # The converter would retarget the input's uint8 -> float32 Cast to float16 while the graph still declares its
    # output float32 (onnxruntime refuses to load that); kept in float32, it gets a float16 Cast after it instead.
    input_casts = [node.name for node in model.graph.node if node.op_type == "Cast" and INPUT_NAME in node.input]
    try:
        with warnings.catch_warnings():
            # One warning per weight below fp16's smallest normal number; the validation report shows the effect.
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=input_casts)
    except Exception as exc:
        raise ConversionError(f"float16 conversion failed: {type(exc).__name__}: {exc}") from None
    onnx.save(converted, str(path))


CLASS_NAMES_KEY = "class_names"


def label_onnx(path: Path, class_names: list[str]) -> None:
    """Record the class names in the ONNX file's ``metadata_props`` (key ``class_names``, a JSON list in output
    order), so a consumer with only the ONNX file can label the probabilities. Run before the file is hashed."""
    import json

    import onnx

    model = onnx.load(str(path))
    kept = [prop for prop in model.metadata_props if prop.key != CLASS_NAMES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = CLASS_NAMES_KEY, json.dumps(list(class_names), ensure_ascii=False)
    onnx.save(model, str(path))
