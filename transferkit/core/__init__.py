"""Shared core: what every stage needs and nothing that imports TensorFlow.

- ``errors``: one error taxonomy, each class carrying its HTTP status and CLI exit code.
- ``backbones``: the registry of keras.applications backbones (sizes, preprocessing, weight constraints).
- ``images``: the guarded image decoder used by training *and* serving.
- ``atomic``: write an output directory all at once or not at all.
"""
