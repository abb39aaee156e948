"""Export stage, the bundle writer (the ``train`` extra): a training run -> SavedModel, ONNX, ONNX-fp16/int8 converted
(``convert``), validated against the Keras model (``validate``) and published atomically with a checksummed manifest
(``bundle``). Reading and running a bundle is the runtime's, in :mod:`transferkit.core`.
"""
