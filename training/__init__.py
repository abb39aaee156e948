"""Training stage: class-folder images -> two-phase transfer learning -> a run directory.

Library entry points: :func:`transferkit.training.train.train` (one run),
:func:`transferkit.training.data.load_dataset` (discovery, split and decoding),
:func:`transferkit.training.digits.write_digits` (the embedded dataset), :mod:`transferkit.training.rundir` (reading a
run directory). TensorFlow is imported by the modules that need it, not here, so ``import transferkit.training``
stays cheap.
"""
