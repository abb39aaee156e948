"""Training stage: class-folder images -> two-phase transfer learning -> a run directory.

Library entry points: :func:`transferkit.training.train.train` (one run),
:func:`transferkit.training.data.load_dataset` (discovery, the stable split, the decoded-image cache of
:mod:`transferkit.training.cache`), :func:`transferkit.training.digits.write_digits` (the embedded dataset),
:mod:`transferkit.training.config` (the configuration model every ``transferkit train`` option is generated from),
:mod:`transferkit.training.rundir` (the typed run directory: config, metrics, split). The recipe lives in
:mod:`transferkit.training.recipe`, the input pipeline and augmentation in :mod:`transferkit.training.pipeline`, the
kept work directory of a run in progress in :mod:`transferkit.training.workdir`. TensorFlow is imported by the
modules that need it, not here, so ``import transferkit.training`` stays cheap.
"""
