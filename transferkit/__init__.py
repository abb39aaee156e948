"""transferkit: from a folder of labelled images to a fine-tuned Keras model, an exported bundle and a served endpoint.

The package itself holds the shared core (``transferkit.core``) and the command-line entry point
(``transferkit.cli``). The stages live in the top-level packages ``training``, ``export``, ``service`` and
``benchmarks``; imports flow one way: core <- training <- export <- service / benchmarks.
"""

__version__ = "0.1.0"
