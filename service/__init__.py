"""Service stage: a hardened BentoML image-classification endpoint over a bundle, run by the runtime in
:mod:`transferkit.core` (never the writer, never TensorFlow but for the savedmodel backend).

``service.py`` is what ``bentoml serve`` loads; ``settings`` the one settings model (``TRANSFERKIT_*``); ``runtime``,
``microbatch`` and ``balance`` the CPU and GPU layouts; ``http``, ``decoding``, ``middleware`` and ``oip`` the
request path; ``lifecycle`` and ``launcher`` the drain and the one ``bentoml serve`` launcher; ``build`` the bentos.
"""
