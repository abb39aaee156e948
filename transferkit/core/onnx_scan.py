"""Which tensors of an ONNX file keep their data in side files ("external data"), read without the onnx package.

A tensor stored outside the ``.onnx`` file names a file (``external_data`` entry ``location``) that onnxruntime and
OpenVINO open by path: relative to the model's directory when loaded from a path, relative to the *current working
directory* when loaded from bytes (measured with onnxruntime 1.31). Either way those bytes are not the ones the
manifest's checksum covers, so the loader refuses such a file (:func:`transferkit.core.manifest.read_verified`).

The runtime has onnxruntime but not the onnx package, so this reads the protobuf wire format itself, descending only
into the fields that can hold a ``TensorProto`` (field numbers from onnx.proto, stable since ONNX 1.x) and skipping
every other field by its length: raw tensor bytes are never mistaken for a message.
"""

from __future__ import annotations

from collections.abc import Iterator

MODEL, TRAINING, FUNCTION, GRAPH, NODE, ATTRIBUTE, SPARSE, TENSOR = range(8)
# message type -> {field number: the message type of that field}, for the fields a TensorProto can be under.
CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},  # graph, training_info, functions
    TRAINING: {1: GRAPH, 2: GRAPH},  # initialization, algorithm
    FUNCTION: {7: NODE, 11: ATTRIBUTE},  # node, attribute_proto
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},  # node, initializer, sparse_initializer
    NODE: {5: ATTRIBUTE},  # attribute
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},  # t, g, tensors, graphs, ...
    SPARSE: {1: TENSOR, 2: TENSOR},  # values, indices
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 8, 13, 14
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
ENTRY_KEY, ENTRY_VALUE = 1, 2  # StringStringEntryProto


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of each field of the message in [start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, end)
            yield number, wire, value, pos
            continue
        if wire == 2:
            length, pos = _varint(data, pos, end)
            payload, pos = pos, pos + length
        elif wire in (1, 5):  # fixed64, fixed32
            payload, pos = pos, pos + (8 if wire == 1 else 4)
        else:  # groups (3, 4) are not used by ONNX; 6 and 7 do not exist
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
        yield number, wire, payload, pos


def _tensor_external(data: memoryview, start: int, end: int) -> tuple[str, str] | None:
    """(tensor name, side file) when the TensorProto in [start, end) keeps its data outside the file."""
    name, location, external = "", "", False
    for number, wire, value, stop in _fields(data, start, end):
        if number == TENSOR_NAME and wire == 2:
            name = bytes(data[value:stop]).decode("utf-8", "replace")
        elif number == TENSOR_DATA_LOCATION and wire == 0:
            external = external or value == EXTERNAL
        elif number == TENSOR_EXTERNAL_DATA and wire == 2:
            external = True  # any external_data entry: onnx tooling treats the tensor as external
            entry = {n: bytes(data[v:s]) for n, w, v, s in _fields(data, value, stop) if w == 2}
            if entry.get(ENTRY_KEY) == b"location":
                location = entry.get(ENTRY_VALUE, b"").decode("utf-8", "replace")
    return (name, location) if external else None


def external_tensors(model: bytes) -> list[tuple[str, str]]:
    """(tensor name, side file) of every tensor of the serialized ModelProto ``model`` stored as external data.
    Raises ValueError when the bytes are not a well-formed protobuf message."""
    data = memoryview(model)
    found: list[tuple[str, str]] = []
    stack = [(MODEL, 0, len(data))]  # iterative: a hostile file's nesting cannot exhaust Python's recursion limit
    while stack:
        kind, start, end = stack.pop()
        if kind == TENSOR:
            if (hit := _tensor_external(data, start, end)) is not None:
                found.append(hit)
            continue
        children = CHILDREN[kind]
        for number, wire, value, stop in _fields(data, start, end):
            if wire == 2 and number in children:
                stack.append((children[number], value, stop))
    return found
