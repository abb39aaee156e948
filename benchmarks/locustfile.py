"""Locust users for the transferkit service: real JPEG/PNG uploads of several sizes, every answer validated.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:3000

Images: benchmarks/workload.py (small PNGs, ~1 MP and ~6 MP JPEGs, or $TRANSFERKIT_LOADTEST_IMAGES), weighted by
$TRANSFERKIT_LOADTEST_MIX ("small,1mp,6mp", default "6,3,1").
Overload answers (429/503) are reported under their own name, not as failures, and the user honours their
Retry-After before its next request, as a well-behaved client does (one without Retry-After is a failure, so is a
Retry-After past 60 s); a low-weight task sends bad input
that must be answered 4xx with the error JSON. Any other answer is a reported failure with its status and the start
of its body, whatever the body is (empty, an HTML page from a proxy, JSON of another shape): never an exception in
the user, which locust would log instead of counting the request.

The users are ``FastHttpUser`` (geventhttpclient) and each upload's multipart/form-data body is encoded once, by
urllib3, at start-up: the same bytes ``requests`` sends for ``files=[("images", ...)]``, without re-encoding a 380 KB
body per request. On a machine that also runs the server this matters: the HttpUser version of this file took
0.19-0.21 of a core at ~80 uploads/s on the 2-core test machine, this one ~0.10 (BENCHMARKS.md), cores that went to
the load generator instead of the server under test.
"""

from __future__ import annotations

import json
import math
import random

import gevent
from locust import FastHttpUser, between, task
from urllib3.filepost import encode_multipart_formdata

from transferkit.benchmarks.workload import load_images, mix_weights

OVERLOAD = (429, 503)


def upload(name: str, data: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    """One ``images`` file field as a multipart/form-data body and its Content-Type header."""
    body, form_type = encode_multipart_formdata([("images", (name, data, content_type))])
    return body, {"Content-Type": form_type}


IMAGES = load_images()
KINDS = list(IMAGES)
WEIGHTS = mix_weights(KINDS)
UPLOADS = {kind: [upload(*image) for image in images] for kind, images in IMAGES.items()}
BAD_UPLOAD = upload("bad.jpg", b"not an image" * 10, "image/jpeg")
# Generating the images above takes seconds, and gevent's loop caches the time it last looked at the clock: locust
# would time `--run-time` from that stale clock and end the run early by the import's duration (measured: a 4 s run
# stopped after 0.7 s on a busy machine, its CSV still empty). Refresh the clock before locust reads it.
gevent.get_hub().loop.update_now()


def json_body(response) -> object | None:
    """The parsed JSON body; None for an empty or non-JSON one (or one whose encoding cannot be told)."""
    try:
        return json.loads(response.text)
    except (TypeError, ValueError):
        return None


def describe(response) -> str:
    """A failure's one line: the status and the start of the body, whatever it holds; without any answer (status 0:
    the connection was reset, closed or timed out), the client's error, so that a reset is told from a server bug."""
    if not response.status_code:
        return f"no answer (the connection failed): {getattr(response, 'error', None)!r}"[:200]
    return f"HTTP {response.status_code}: {(response.text or '(empty body)')[:200]}"


def overloaded(response) -> None:
    """Count a 429/503 under its own name and wait as its Retry-After says (a missing or absurd one fails)."""
    response.request_meta["name"] = f"overloaded {response.status_code}"
    try:
        wait = float(response.headers.get("Retry-After") or "nan")
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= 60:
        response.failure(f"HTTP {response.status_code} without a usable Retry-After "
                         f"({response.headers.get('Retry-After')!r})")
        return
    response.success()
    gevent.sleep(wait)


def check_answer(answer: object, classes: list[str], count: int) -> str | None:
    """Why a 200 answer (its parsed JSON, None when it was not JSON) is wrong, or None."""
    if answer is None:
        return "the answer is not JSON"
    if not isinstance(answer, list) or len(answer) != count:
        return f"expected a list of {count} answers"
    for item in answer:
        top = item.get("top_k") if isinstance(item, dict) else None
        if not isinstance(top, list) or not all(isinstance(entry, dict) for entry in top):
            return "each answer needs a top_k list of {label, score}"
        scores = [entry.get("score") for entry in top]
        if item.get("label") not in classes:
            return f"label {item.get('label')!r} is not a class"
        if not scores or not all(isinstance(s, float) and math.isfinite(s) and 0 <= s <= 1 for s in scores):
            return "scores must be finite probabilities"
        if scores != sorted(scores, reverse=True) or sum(scores) > 1.001:
            return "top_k must be sorted and sum to at most 1"
        if len(classes) <= len(scores) and abs(sum(scores) - 1) > 1e-3:
            return f"probabilities sum to {sum(scores):.4f}, not 1"
    return None


class ImageClient(FastHttpUser):
    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        while True:  # users that start together may find the server overloaded: they wait and ask again
            with self.client.get("/metadata", name="/metadata", catch_response=True) as response:
                if response.status_code in OVERLOAD and response.headers.get("Retry-After"):
                    overloaded(response)
                    continue
                meta = json_body(response)
                self.classes = meta.get("classes") if isinstance(meta, dict) else None
                if response.status_code != 200 or not isinstance(self.classes, list):
                    response.failure(f"no class list in /metadata: {describe(response)}")
                    self.classes = []  # every answer then fails as "not a class": counted, not raised
                return

    @task(20)
    def predict(self) -> None:
        kind = random.choices(KINDS, WEIGHTS)[0]
        body, headers = random.choice(UPLOADS[kind])
        with self.client.post("/predict", data=body, headers=headers, name=f"/predict {kind}",
                              catch_response=True) as response:
            if response.status_code in OVERLOAD:
                overloaded(response)
            elif response.status_code != 200:
                response.failure(describe(response))
            else:
                problem = check_answer(json_body(response), self.classes, 1)
                if problem:
                    response.failure(problem)

    @task(1)
    def bad_input(self) -> None:
        body, headers = BAD_UPLOAD
        with self.client.post("/predict", data=body, headers=headers, name="bad input (expects 4xx)",
                              catch_response=True) as response:
            if response.status_code in OVERLOAD:
                overloaded(response)
            elif 400 <= response.status_code < 500 and isinstance(answer := json_body(response), dict) \
                    and "error" in answer:
                response.success()
            else:
                response.failure(f"bad input answered {describe(response)}")
