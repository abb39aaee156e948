"""A real ONNX bundle that misbehaves on purpose, to drive the service's fault paths through real onnxruntime.

The model reads the mean pixel value m of each image (warm-up images are zeros, so it warms up and becomes ready):
- m < 128: finite probabilities (a dark image is answered normally);
- 128 <= m < 200: log(128 - m) -> NaN probabilities (a broken model; the service must answer a counted 5xx);
- m >= 200: the same finite answer, but only after a chain of large matrix products (~1 s): a slow model.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from transferkit.core.manifest import FormatEntry, Manifest, sha256_path

SIZE = 32
CLASSES = ["dark", "other"]


def _slow_branch(steps: int, width: int) -> onnx.GraphProto:
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["matrix", "scale"], ["x0"])]
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [f"x{i}", "matrix"], [f"x{i + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"x{steps}"], ["total"], keepdims=0),
              helper.make_node("Mul", ["total", "zero"], ["zeroed"]),
              helper.make_node("Add", ["logits", "zeroed"], ["slow_logits"])]
    return helper.make_graph(nodes, "slow", [], [helper.make_tensor_value_info("slow_logits", TensorProto.FLOAT,
                                                                              None)],
                             initializer=[numpy_helper.from_array(matrix, "matrix"),
                                          numpy_helper.from_array(np.float32(0), "zero")])


def _fast_branch() -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Identity", ["logits"], ["fast_logits"])], "fast", [],
                             [helper.make_tensor_value_info("fast_logits", TensorProto.FLOAT, None)])


def build_model(steps: int = 12, width: int = 2048) -> onnx.ModelProto:
    f = np.float32
    inits = [numpy_helper.from_array(np.array(v, f), n) for n, v in
             [("c128", 128.0), ("c200", 200.0), ("one", 1.0), ("w", [0.0, 1.0])]]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),  # [N]
        helper.make_node("Sub", ["c128", "m"], ["d"]),
        helper.make_node("Log", ["d"], ["logd"]),  # NaN where m > 128 ...
        helper.make_node("Less", ["m", "c200"], ["below200"]),
        helper.make_node("Where", ["below200", "logd", "one"], ["safe"]),  # ... but finite again from 200 up
        helper.make_node("Unsqueeze", ["safe", "axes1"], ["col"]),  # [N, 1]
        helper.make_node("Mul", ["col", "w"], ["logits"]),  # [N, 2]
        helper.make_node("ReduceMax", ["m"], ["mmax"], keepdims=0),
        helper.make_node("Div", ["mmax", "c200"], ["scale"]),  # makes the slow chain depend on the input
        helper.make_node("GreaterOrEqual", ["mmax", "c200"], ["slow"]),
        helper.make_node("If", ["slow"], ["chosen"], then_branch=_slow_branch(steps, width),
                         else_branch=_fast_branch()),
        helper.make_node("Softmax", ["chosen"], ["probabilities"], axis=1),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes1"))
    graph = helper.make_graph(
        nodes, "faulty",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_faulty_bundle(out: Path) -> Path:
    out.mkdir(parents=True)
    onnx.save(build_model(), str(out / "model.onnx"))
    digest, size, count = sha256_path(out / "model.onnx")
    manifest = Manifest(
        name="faulty", version="1", created=datetime.now(UTC), backbone="MobileNetV2",
        family="mobilenet_v2", image_size=SIZE, class_names=CLASSES,
        preprocessing={"mode": "none", "in_graph": "none"}, input={"name": "image"},
        output={"name": "probabilities"},
        formats={"onnx": FormatEntry(file="model.onnx", sha256=digest, bytes=size, files=count, input_name="image",
                                     output_name="probabilities", precision="fp32", opset=17)},
        training={}, validation=None, versions={},
    )
    (out / "manifest.json").write_text(json.dumps(json.loads(manifest.model_dump_json()), indent=2))
    return out
