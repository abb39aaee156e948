"""The streaming local engine of ``transferkit predict``: read, decode and classify in batches, in bounded memory.

A pool of ``workers`` threads each takes a batch of ``batch_size`` paths, reads and decodes them with the guarded
decoder (Pillow releases the GIL while it decodes and resizes) and runs the model on the batch; onnxruntime also
releases the GIL, so the threads really run in parallel. On a CPU each run uses one onnxruntime thread: ``workers``
batches side by side keep every core busy without the decode threads and onnxruntime's own pool fighting for them.
At most ``2 x workers`` batches are in flight, and results come back in input order, so memory stays the same for
ten files or ten million.

Both engines (this one and :mod:`transferkit.core.ray_engine`) turn a batch of :class:`Item` into a list of
:class:`Outcome` with :func:`classify_items`, so they decode and classify identically.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from transferkit.core.errors import InvalidImageError
from transferkit.core.images import decode_image
from transferkit.core.inputs import Item, looks_like_image
from transferkit.core.predictors import Predictor, top_k


@dataclass
class Outcome:
    """What happened to one input: class probabilities, or an error, or skipped (a non-image found in a folder)."""

    path: str
    probabilities: np.ndarray | None = None
    error: str | None = None
    skipped: bool = False


# Errors of reading a file, which another try may not meet (a network share that hung, a file not copied yet, a
# permission since fixed), as opposed to bytes that are not a valid image: `predict --resume --retry-failed` classifies
# rows with these again. Output rows carry only the message, so the messages are the contract.
MISSING, UNREADABLE = "no such file", "cannot read: "
TRANSIENT_ERRORS = (MISSING, UNREADABLE)


def is_transient(error: str | None) -> bool:
    """Whether an output row's ``error`` was a read failure worth retrying (not an invalid image)."""
    return bool(error) and error.startswith(TRANSIENT_ERRORS)


def read_and_decode(item: Item, size: int) -> tuple[np.ndarray | None, str | None, bool]:
    """``(pixels, error, skipped)`` for one input: uint8 pixels [size, size, 3], or why not."""
    try:
        data = Path(item.path).read_bytes()
    except FileNotFoundError:
        return None, MISSING, False
    except IsADirectoryError:
        return None, "is a directory, not an image", False
    except OSError as exc:
        return None, f"{UNREADABLE}{exc.strerror or exc}", False
    if not item.named and not looks_like_image(data[:16]):
        return None, None, True
    try:
        return decode_image(data, size), None, False
    except InvalidImageError as exc:
        return None, str(exc), False


def classify_items(predictor: Predictor, items: list[Item], size: int,
                   explain_dir: Path | None = None) -> list[Outcome]:
    """Read, decode and classify one batch; unreadable inputs become outcomes with an error. With ``explain_dir``,
    each classified image's class activation map is written there as an overlay (core/explain.py)."""
    decoded = [read_and_decode(item, size) for item in items]
    outcomes = [Outcome(item.path, error=error, skipped=skipped)
                for item, (_, error, skipped) in zip(items, decoded)]
    ready = [index for index, (pixels, _, _) in enumerate(decoded) if pixels is not None]
    if ready:
        # uint8 pixels: the predictor casts to whatever its graph takes (the manifest's input dtype).
        pixels = np.stack([decoded[index][0] for index in ready])
        if explain_dir is None:
            probabilities = predictor(pixels)
        else:
            from transferkit.core.explain import write_overlay

            probabilities, maps = predictor.explain(pixels)
            for index, image, cam in zip(ready, pixels, maps):
                write_overlay(explain_dir, items[index].path, image, cam)
        for index, row in zip(ready, probabilities):
            outcomes[index].probabilities = row
    return outcomes


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def local_outcomes(items: Iterable[Item], predictor: Predictor, size: int, batch_size: int,
                   workers: int, explain_dir: Path | None = None) -> Iterator[list[Outcome]]:
    """Classify ``items`` on ``workers`` threads, yielding each batch's outcomes in input order."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transferkit-predict")
    pending: deque[Future] = deque()
    try:
        for chunk in batched(items, batch_size):
            pending.append(pool.submit(classify_items, predictor, chunk, size, explain_dir))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # Ctrl-C or a consumer that stops early: drop queued batches, let running ones finish
        pool.shutdown(wait=True, cancel_futures=True)


def outcome_rows(outcomes: list[Outcome], class_names: list[str], k: int) -> list[dict]:
    """Output rows (path, label, score, top_k, error) for the classified and unreadable outcomes; skipped
    non-images have no row."""
    kept = [outcome for outcome in outcomes if not outcome.skipped]
    classified = [outcome for outcome in kept if outcome.probabilities is not None]
    answers = iter(top_k(np.stack([o.probabilities for o in classified]), class_names, k) if classified else [])
    rows = []
    for outcome in kept:
        if outcome.probabilities is not None:
            rows.append({"path": outcome.path, **next(answers), "error": None})
        else:
            rows.append({"path": outcome.path, "label": None, "score": None, "top_k": None,
                         "error": outcome.error})
    return rows
