"""Service stage: a hardened BentoML image-classification endpoint over an exported bundle.

Not implemented yet (issue #4).
"""
