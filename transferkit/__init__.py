"""transferkit: from a folder of labelled images to a fine-tuned Keras model, an exported bundle and a served endpoint.

The distribution installs one namespace: the core (``transferkit.core``: the bundle runtime and what every stage
shares), the command-line entry point (``transferkit.cli``) and the stages ``transferkit.training``,
``transferkit.export``, ``transferkit.service`` and ``transferkit.benchmarks``. Imports flow one way: core <- training
<- export <- service / benchmarks; the service needs only the core, so the base install (no TensorFlow) serves.

In the repository the stages are folders beside this package (``training/``, ``export/``, ...): ``pip install``
maps them into the namespace (pyproject's ``package-dir``). A built bento or a checkout that was never installed has
no such mapping, so :mod:`transferkit._source_layout` provides the same one there.
"""

from transferkit._source_layout import install_source_layout

__version__ = "0.1.0"

install_source_layout()


def __getattr__(name: str):
    # `from transferkit import load_bundle` (the batch-prediction facade) without importing numpy, onnxruntime or
    # TensorFlow at `import transferkit`: the facade module loads on first use.
    if name == "load_bundle":
        from transferkit.core.classifier import load_bundle

        return load_bundle
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
