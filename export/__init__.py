"""Export stage: a training run -> a validated bundle (SavedModel, ONNX, ONNX-fp16) with a checksummed manifest.

Not implemented yet (issue #3).
"""
