"""Training stage: class-folder images -> two-phase transfer learning -> a run directory.

Library entry points: :func:`training.train.train` (one run), :func:`training.data.load_dataset` (discovery, split and
decoding), :func:`training.digits.write_digits` (the embedded dataset). TensorFlow is imported by the modules that
need it, not here, so ``import training`` stays cheap.
"""
