"""The bundle runtime and what every stage shares; installed by the base install, never imports TensorFlow.

Runtime (reading and running a bundle; the service, ``predict`` and ``bench --bundles`` need nothing else):
- ``manifest``: the bundle manifest, checksums and integrity check; ``images``: the one guarded image decoder, shared
  by training, export, predict and serve; ``predictors`` (onnxruntime; OpenVINO in ``openvino``): a bundle's backends;
  ``backends``: the measured ``auto`` choice; ``inputs``, ``batch``, ``ray_engine``, ``outputs``, ``evaluation``,
  ``metrics``, ``progress``, ``predict_cli``: batch prediction; ``classifier``: the ``load_bundle`` facade.

Shared:
- ``errors``: one error taxonomy, each class carrying its HTTP status and CLI exit code; ``extras``: which optional
  extra a missing import belongs to.
- ``backbones``: the registry of keras.applications backbones (sizes, preprocessing, weight constraints).
- ``atomic``: write an output directory all at once or not at all; ``system``, ``console``, ``logs``, ``stopping``.
"""
