"""Classify image files through the Open Inference Protocol (KServe v2) ``/v2/models/{name}/infer``, using httpx.

    pip install httpx
    python infer_v2_httpx.py http://127.0.0.1:3000 photo.jpg other.png --classification 3

The request is JSON: one ``images`` input, a ``BYTES [N]`` tensor whose elements are the files' base64 text. Without
``--classification`` the answer is ``probabilities``, ``FP32 [N, C]`` in the class order of the model's metadata;
with ``--classification k`` (the protocol's classification extension) it is ``BYTES [N, k]`` of
``"score:index:label"``. Any KServe v2 client speaks this (tritonclient included); this one needs only httpx.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

import httpx


def model_metadata(client: httpx.Client, model: str) -> dict:
    """``GET /v2/models/{model}``: versions, inputs, outputs and ``parameters.classes``."""
    response = client.get(f"/v2/models/{model}")
    response.raise_for_status()
    return response.json()


def infer(client: httpx.Client, model: str, files: list[bytes], classification: int = 0) -> dict:
    """The v2 answer for ``files`` (encoded images): ``{"model_name", "model_version", "outputs": [...]}``;
    an error answer (JSON ``{"error", "reason"}``) raises ``httpx.HTTPStatusError``."""
    request: dict = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(files)],
                                 "data": [base64.b64encode(data).decode("ascii") for data in files]}]}
    if classification:
        request["outputs"] = [{"name": "probabilities", "parameters": {"classification": classification}}]
    response = client.post(f"/v2/models/{model}/infer", json=request)
    if response.is_error:
        error = response.json()
        raise httpx.HTTPStatusError(f"{response.status_code} {error['reason']}: {error['error']}",
                                    request=response.request, response=response)
    return response.json()


def probabilities(answer: dict) -> list[list[float]]:
    """The ``FP32 [N, C]`` output as one list of C probabilities per image (the data comes flat, row-major)."""
    output = answer["outputs"][0]
    rows, columns = output["shape"]
    return [output["data"][row * columns:(row + 1) * columns] for row in range(rows)]


def labels(answer: dict) -> list[list[tuple[float, int, str]]]:
    """The classification extension's ``BYTES [N, k]`` as (score, class index, label), best first per image."""
    output = answer["outputs"][0]
    rows, k = output["shape"]
    parsed = []
    for item in output["data"]:
        score, index, label = item.split(":", 2)
        parsed.append((float(score), int(index), label))
    return [parsed[row * k:(row + 1) * k] for row in range(rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:3000")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--model", help="the model's name (default: the one the server serves, from /metadata)")
    parser.add_argument("--classification", type=int, default=0, help="k: the k best labels instead")
    args = parser.parse_args(argv)
    token = os.environ.get("TRANSFERKIT_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with httpx.Client(base_url=args.url, headers=headers, timeout=60) as client:
        model = args.model or client.get("/metadata").json()["name"]
        classes = model_metadata(client, model)["parameters"]["classes"]
        answer = infer(client, model, [path.read_bytes() for path in args.files], args.classification)
    if args.classification:
        for path, best in zip(args.files, labels(answer)):
            print(f"{path.name}: " + ", ".join(f"{label} {score:.3f}" for score, _, label in best))
    else:
        for path, row in zip(args.files, probabilities(answer)):
            best = max(range(len(row)), key=row.__getitem__)
            print(f"{path.name}: {classes[best]} {row[best]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
