"""The Python facade: classify files, folders, arrays or PIL images with a bundle from a script or a notebook.

    from transferkit import load_bundle

    bundle = load_bundle("bundles/flowers")           # a bundle directory or a BentoML tag; checksums verified
    bundle.predict("photo.jpg")                        # {"label": ..., "score": ..., "top_k": [...]}
    bundle.predict([pil_image, "b.png", array])        # a list of those, in order
    for row in bundle.predict_files(["photos/"], engine="local"):   # folders/globs/lists, streamed
        ...

``transferkit predict`` is built on the same objects (:meth:`BundleClassifier.outcomes`), and the predictors are
those of :mod:`transferkit.core.predictors`, which the service uses too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.core.batch import Outcome, local_outcomes, outcome_rows
from transferkit.core.errors import InvalidImageError, UsageError
from transferkit.core.images import decode_image
from transferkit.core.inputs import Item, expand_inputs
from transferkit.core.manifest import RUNTIME_BACKENDS
from transferkit.core.predictors import Bundle, Device, Predictor
from transferkit.core.predictors import load_bundle as load_verified_bundle
from transferkit.core.predictors import top_k as top_k_answers
from transferkit.core.system import available_cores

ENGINES = ("local", "ray")


def _pil_pixels(image: Any, size: int) -> np.ndarray:
    """A PIL image -> uint8 RGB [size, size, 3], the way decode_image treats a decoded file."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _array_pixels(array: np.ndarray, size: int) -> np.ndarray:
    if array.ndim != 3 or array.shape[2] != 3:
        raise UsageError(f"expected an RGB image array [H, W, 3], got shape {list(array.shape)}")
    if array.shape[:2] == (size, size):
        return array
    if array.dtype != np.uint8:
        raise UsageError(f"an array of another size than {size}x{size} must be uint8 to be resized, "
                         f"got {array.dtype} {list(array.shape)}")
    from PIL import Image

    return _pil_pixels(Image.fromarray(array), size)


def to_pixels(source: Any, size: int) -> np.ndarray:
    """One image (path, bytes, PIL image or RGB array) -> pixels [size, size, 3] for the model."""
    if isinstance(source, (str, os.PathLike)):
        try:
            return decode_image(source, size)
        except FileNotFoundError:
            raise InvalidImageError(f"{source}: no such file") from None
        except InvalidImageError as exc:
            raise type(exc)(f"{source}: {exc}") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(source, size)
    if isinstance(source, np.ndarray):
        return _array_pixels(source, size)
    if hasattr(source, "convert") and hasattr(source, "size"):  # a PIL image, without importing PIL for the check
        return _pil_pixels(source, size)
    raise UsageError(f"cannot classify a {type(source).__name__}: pass a path, bytes, a PIL image or an RGB array")


class BundleClassifier:
    """A verified bundle with a predictor on ``backend``/``device``, created when first needed. ``backend="auto"``
    resolves to the fastest backend the bundle was validated for here (:mod:`transferkit.core.backends`)."""

    def __init__(self, bundle: Bundle, backend: str = "auto", device: Device = "auto"):
        from transferkit.core.backends import AUTO, Choice, choose_backend

        self.bundle = bundle
        self.device = device
        self._predictors: dict[int | None, Predictor] = {}
        spec = RUNTIME_BACKENDS.get(backend)
        if backend != AUTO and (spec is None or spec.format not in bundle.manifest.formats):
            bundle.predictor(backend, device)  # raises the loader's one-line error naming what it has
        # Measured at one thread: the local engine runs one-thread sessions side by side, each on whole batches.
        # A named backend needs no measurement here (its batch scaling only decides a service's layout).
        self.choice = choose_backend(bundle, device, threads=1) if backend == AUTO else \
            Choice(backend, "named by the user")
        self.backend = self.choice.backend

    @property
    def manifest(self):
        return self.bundle.manifest

    @property
    def class_names(self) -> list[str]:
        return self.bundle.manifest.class_names

    @property
    def image_size(self) -> int:
        return self.bundle.manifest.image_size

    def predictor(self, threads: int | None = None) -> Predictor:
        """The predictor (one per thread setting: the local engine runs one-thread sessions side by side)."""
        if threads not in self._predictors:
            self._predictors[threads] = self.bundle.predictor(self.backend, self.device, threads=threads,
                                                              spin=threads is None)
        return self._predictors[threads]

    def explain(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, C], the top class's activation maps [N, h, w]) for a list of images (or an
        [N, H, W, 3] array); UsageError when the bundle's graphs compute no map (``manifest.explain`` says why)."""
        sources = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
        pixels = np.stack([to_pixels(s, self.image_size) for s in sources])
        return self.predictor().explain(pixels)

    def probabilities(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """Class probabilities [N, C] for a list of images (or an [N, H, W, 3] array)."""
        sources = list(images) if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
        results = []
        for start in range(0, len(sources), batch_size):
            pixels = np.stack([to_pixels(s, self.image_size) for s in sources[start:start + batch_size]])
            results.append(self.predictor()(pixels))
        if not results:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(results)

    def predict(self, images: Any, top_k: int = 5, batch_size: int = 32) -> dict | list[dict]:
        """``{label, score, top_k}`` for one image (a path, bytes, PIL image or [H, W, 3] array), or a list of
        them for a list (or an [N, H, W, 3] array). An unreadable file raises InvalidImageError naming it."""
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4)
        answers = top_k_answers(self.probabilities([images] if single else images, batch_size), self.class_names,
                                top_k)
        return answers[0] if single else answers

    def outcomes(self, items: Iterable[Item], engine: str = "local", batch_size: int = 32,
                 workers: int | None = None, explain_dir: Path | None = None) -> Iterator[list[Outcome]]:
        """Stream the outcomes of ``items`` batch by batch, in input order (what ``transferkit predict`` writes).
        The Ray engine uses the Ray this process is connected to (:func:`transferkit.core.ray_engine.start_ray`).
        ``explain_dir`` (local engine): write each image's class activation map overlay there."""
        if batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if explain_dir is not None and engine != "local":
            raise UsageError("--explain writes overlays with the local engine only")
        if engine == "local":
            predictor = self.predictor(threads=1)
            return local_outcomes(items, predictor, self.image_size, batch_size, workers or available_cores(),
                                  explain_dir)
        if engine == "ray":
            from transferkit.core.ray_engine import ray_outcomes

            return ray_outcomes(list(items), self.bundle.path, self.backend, self.image_size, self.device,
                                batch_size, workers)
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")

    def predict_files(self, inputs: Iterable[str | os.PathLike], engine: str = "local", batch_size: int = 32,
                      workers: int | None = None, top_k: int = 5, address: str | None = None
                      ) -> Iterator[dict]:
        """Rows ``{path, label, score, top_k, error}`` for files, folders, globs and path lists, streamed in
        bounded memory; non-images found in folders are skipped, unreadable files get an ``error``. With
        ``engine="ray"`` a local Ray is started (or the cluster at ``address`` joined) unless one is connected."""
        started = False
        if engine == "ray":
            from transferkit.core.ray_engine import start_ray

            started = start_ray(address)
        try:
            for outcomes in self.outcomes(expand_inputs(inputs), engine, batch_size, workers):
                yield from outcome_rows(outcomes, self.class_names, top_k)
        finally:
            if started:
                import ray

                ray.shutdown()


def load_bundle(source: str | Path, backend: str = "auto", device: Device = "auto") -> BundleClassifier:
    """Load and verify a bundle directory or BentoML model tag for classification (see the module docstring)."""
    return BundleClassifier(load_verified_bundle(source), backend, device)
