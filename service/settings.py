"""Service settings: one pydantic-settings model, read once from ``TRANSFERKIT_*`` environment variables.

This model is the only source of the defaults: ``transferkit serve`` and the README's table (``settings_table()``,
checked by a test) are derived from it. BentoML reads workers, batching and traffic settings when the service class is
decorated, i.e. at import time, so they come from the environment of ``bentoml serve``, not from a request.

Which processes run (the *layout*) follows the hardware; :meth:`ServiceSettings.plan` works it out:

- ``inprocess`` (CPU): N HTTP workers, each decoding and running its own onnxruntime session of cores/N threads.
  No second process, no pickled pixels, no batching queue: on a CPU onnxruntime's images/s is flat in batch size.
- ``microbatch`` (CPU whose engine batches well): the same workers and sessions as ``inprocess``, but in each worker
  the compute threads only decode, and one model thread runs every image queued since its previous call (up to
  ``max_batch_size``) as one batch: decoding overlaps inference, and batches grow under load. Chosen when the
  backend's measured images/s at batch 8 is at least ``BATCH_SCALING_MIN`` times batch 1's (core/backends.py):
  OpenVINO bf16 on a CPU matrix engine, never onnxruntime fp32 on a 224-px model.
- ``batched`` (GPU): entry workers scaled to the cores decode and send uint8 pixels to one model process per GPU (per
  model served), whose BentoML adaptive batcher merges concurrent requests into one device call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from transferkit.core.backends import BATCH_SCALING_MIN
from transferkit.core.errors import UsageError
from transferkit.core.images import DEFAULT_MAX_PIXELS
from transferkit.core.system import available_cores

Layout = Literal["inprocess", "microbatch", "batched"]
MAX_CPU_WORKERS = 16  # each CPU worker holds a copy of the model: beyond this, more threads per worker instead
ENV_PREFIX = "TRANSFERKIT_"

# Two different waits past the drain timeout (service/lifecycle.py, service/launcher.py):
# - a worker: once its drain deadline has passed and uvicorn was told to exit at once, how long before it exits hard;
#   also what the arbiter adds to the drain timeout for each watcher's graceful stop (uvicorn's shutdown, lifespan
#   hooks, the process's exit).
WORKER_EXIT_GRACE_S = 5.0
# - the launcher: how long after the drain timeout it waits for the whole `bentoml serve` to exit before it SIGKILLs
#   it. The arbiter stops the entry watcher (drain + WORKER_EXIT_GRACE_S at most), then the model watchers (idle by
#   then: seconds), then exits itself; this covers the last two with room to spare.
SERVER_STOP_GRACE_S = 15.0


def env_name(setting: str) -> str:
    """The environment variable of a setting: ``drain_timeout_s`` -> ``TRANSFERKIT_DRAIN_TIMEOUT_S``."""
    return ENV_PREFIX + setting.upper()


def gpu_count() -> int:
    """NVIDIA GPUs visible to this process, counted without importing a framework (this runs at import time)."""
    root = Path("/proc/driver/nvidia/gpus")
    gpus = sum(1 for _ in root.iterdir()) if root.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and gpus:
        gpus = min(gpus, len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]))
    return gpus


@dataclass(frozen=True)
class Plan:
    """The processes and threads a layout resolves to on this machine (reported by /metadata)."""

    layout: Layout
    cores: int
    gpus: int
    entry_workers: int  # HTTP worker processes
    model_workers: int  # batched: model processes (one per GPU); inprocess: one session per HTTP worker
    threads: int  # onnxruntime intra-op threads per session
    reason: str


class ServiceSettings(BaseSettings):
    """Every ``TRANSFERKIT_*`` variable of the service. Descriptions feed the README table."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    model: str | None = Field(None, description="BentoML model tag, bundle directory or model repository folder "
                                                "(`NAME/` or `NAME/VERSION/` bundles), or several, comma-separated; "
                                                "unset: the only transferkit model in the store")
    default_model: str | None = Field(None, description="the model `/predict` answers for when a request names "
                                                        "none (`?model=NAME`); unset: the only model, if one")
    backend: Literal["auto", "onnx", "onnx-fp16", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8",
                     "savedmodel"] = Field("auto", description="`auto`: the fastest backend the bundle was "
                                                               "validated for, measured on this machine")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="`auto`: CUDA when a GPU is present")
    layout: Literal["auto", "inprocess", "microbatch", "batched"] = Field(
        "auto", description="`auto`: `batched` with a GPU; on CPU `microbatch` where batching pays (measured), "
                            "else `inprocess`")
    workers: int | None = Field(None, ge=1, description="HTTP worker processes; unset: one per core "
                                                        f"(at most {MAX_CPU_WORKERS})")
    model_workers: int | None = Field(None, ge=1, description="`batched`: model processes of each model; unset: "
                                                              "one per GPU (1 on CPU)")
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads per session; unset: "
                                                        "cores ÷ processes running a session")
    top_k: int = Field(5, ge=1, description="labels listed per image")
    max_batch_size: int = Field(32, ge=2, description="`batched`, `microbatch`: images per model call (BentoML "
                                                      "needs > 1)")
    max_latency_ms: int = Field(10_000, ge=1, description="`batched`: the batcher answers 503 past this budget")
    max_images: int = Field(16, ge=1, description="images per request")
    max_body_mb: int = Field(32, ge=1, description="request body cap, enforced before the body is read")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="pixels per image, from its header")
    decode_concurrency: int = Field(2, ge=1, description="requests decoding at once per worker")
    decode_memory_mb: int = Field(1024, ge=64, description="decode memory per worker: an image is decoded only "
                                                           "when its estimated peak fits (larger: 413)")
    timeout_s: int = Field(30, ge=1, description="per request: 504 past it")
    max_concurrency: int = Field(64, ge=1, description="requests in flight (whole service): 429 past it")
    latency_budget_ms: int = Field(2000, ge=0, description="a request that would not be answered within this, "
                                                           "predicted from the requests ahead of it and the "
                                                           "worker's measured rate, is refused at once (503 "
                                                           "`overloaded`, Retry-After); 0: no budget")
    drain_timeout_s: int = Field(30, ge=1, description="on SIGTERM: time allowed to finish requests in flight")
    header_timeout_s: int = Field(10, ge=1, description="seconds a request's line and headers may take from "
                                                        "their first byte (a new connection: from its opening); "
                                                        "past it 408 and the connection closes")
    keep_alive_s: int = Field(75, ge=1, description="seconds an idle keep-alive connection stays open; longer "
                                                    "than a load balancer's idle timeout (60 s on AWS's) and than "
                                                    "the longest Retry-After (30 s), so that neither reuses a "
                                                    "connection the server is closing (uvicorn's default, 5 s, "
                                                    "reset clients that waited a 5-s Retry-After)")
    max_header_kb: int = Field(16, ge=1, le=1024, description="request line and headers, in KiB: 431 past it")
    api_token: SecretStr | None = Field(None, description="bearer token every route but the probes requires "
                                                          "(`Authorization: Bearer ...`, else 401); unset: no "
                                                          "access control")
    api_token_file: Path | None = Field(None, description="file holding that token (a container secret), "
                                                          "instead of `TRANSFERKIT_API_TOKEN`")
    protect_metrics: bool = Field(False, description="`true`: `/metrics` requires the token too")
    admin_token: SecretStr | None = Field(None, description="bearer token of the model-control routes "
                                                            "(`/v2/repository/...`: index, load, unload; else 401); "
                                                            "unset: those routes are off (403)")
    admin_token_file: Path | None = Field(None, description="file holding that token, instead of "
                                                            "`TRANSFERKIT_ADMIN_TOKEN`")
    poll_s: float = Field(0, ge=0, description="seconds between looks at each repository model's folder for a "
                                               "newer version, loaded, warmed and swapped in without a failed "
                                               "request (batched layout: versions of the same input size and classes "
                                               "only); 0: no polling")
    memory_budget_mb: int = Field(0, ge=0, description="memory the models may hold, all workers together (each "
                                                       "worker gets its share; batched layout: each device, "
                                                       "shared by its model processes): past it the least recently "
                                                       "used model is unloaded, and loaded again at its next "
                                                       "request (503 `reloading` with Retry-After meanwhile); 0: no "
                                                       "budget")
    spare_models: int = Field(0, ge=0, le=16, description="`batched`: empty model services started beside the "
                                                          "served models' ones, each given for good to a model "
                                                          "first loaded after the start through model control; 0: "
                                                          "such a load is refused (409)")

    @classmethod
    def from_env(cls) -> ServiceSettings:
        """Read the environment; a bad value is a :class:`UsageError` naming the variable."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(f"{env_name('_'.join(map(str, e['loc'])))}: {e['msg']}" for e in exc.errors())
            raise UsageError(f"invalid service settings: {problems}") from None

    @property
    def max_header_bytes(self) -> int:
        return self.max_header_kb * 1024

    def bearer_token(self) -> bytes | None:
        """The token requests must present (UTF-8), from the variable or the file; None when neither is set.

        Read when the service starts, so that a missing file or an empty token stops it with the reason instead of
        serving unprotected."""
        return self._token("api_token")

    def admin_credential(self) -> bytes | None:
        """The token of the model-control routes (service/control.py), read as :meth:`bearer_token` is; None: the
        routes are off."""
        return self._token("admin_token")

    def _token(self, field: str) -> bytes | None:
        value, path = getattr(self, field), getattr(self, field + "_file")
        if value is not None and path is not None:
            raise UsageError(f"set {env_name(field)} or {env_name(field + '_file')}, not both")
        if path is not None:
            try:
                token = path.read_text(encoding="utf-8").strip()  # secrets end with a newline
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"{env_name(field + '_file')}: cannot read the token file "
                                 f"({type(exc).__name__})") from None
            source = env_name(field + "_file")
        elif value is not None:
            token, source = value.get_secret_value(), env_name(field)
        else:
            return None
        if not token or not token.isprintable() or " " in token:
            raise UsageError(f"{source}: the token must be non-empty printable text without spaces")
        return token.encode("utf-8")

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mb * 1024 * 1024

    @property
    def decode_memory_bytes(self) -> int:
        return self.decode_memory_mb * 1024 * 1024

    def plan(self, cores: int | None = None, gpus: int | None = None, backend: str | None = None,
             batch_scaling: float | None = None) -> Plan:
        """Resolve the layout and the process and thread counts for ``cores`` and ``gpus`` (default: this host),
        running ``backend`` (default: the setting) whose measured batch scaling is ``batch_scaling``."""
        cores = available_cores() if cores is None else cores
        gpus = 0 if self.device == "cpu" else (gpu_count() if gpus is None else gpus)
        backend = backend or self.backend
        if self.layout != "auto":
            layout, reason = self.layout, "TRANSFERKIT_LAYOUT"
        elif backend == "savedmodel":
            layout, reason = "inprocess", "savedmodel: TensorFlow's own thread pools, one process"
        elif gpus:
            layout, reason = "batched", f"{gpus} GPU(s): batching fills the device"
        elif batch_scaling is not None and batch_scaling >= BATCH_SCALING_MIN:
            layout, reason = "microbatch", (f"CPU: {backend} runs {batch_scaling:.2f}x the images/s at batch 8 as "
                                            f"at batch 1 here (>= {BATCH_SCALING_MIN}): batching pays")
        else:
            measured = "not measured" if batch_scaling is None else f"{batch_scaling:.2f}x at batch 8 vs 1"
            layout, reason = "inprocess", f"CPU: batching adds queueing but no throughput ({backend}: {measured})"
        if layout in ("inprocess", "microbatch"):
            if backend == "savedmodel":
                workers = self.workers or 1  # TensorFlow sizes its own pools to the whole machine
            else:
                workers = self.workers or min(cores, MAX_CPU_WORKERS)
            threads = self.threads or max(1, cores // workers)
            return Plan(layout, cores, gpus, workers, workers, threads, reason)
        model_workers = self.model_workers or max(1, gpus)
        workers = self.workers or min(cores, MAX_CPU_WORKERS)
        # On a GPU the session's CPU threads only feed the device; on CPU (tests) the model shares the cores.
        threads = self.threads or (1 if gpus else max(1, cores // model_workers))
        return Plan("batched", cores, gpus, workers, model_workers, threads, reason)

    def model_resources(self, plan: Plan) -> dict:
        """BentoML resources of the process that runs the model: every GPU when there are GPUs (BentoML exposes them
        to each worker through CUDA_VISIBLE_DEVICES; a worker picks its own by index)."""
        return {"gpu": plan.gpus} if plan.gpus else {}

    def public(self) -> dict:
        """What /metadata may show: the settings without the model's location (a path on the server) or the
        token's."""
        return self.model_dump(exclude={"model", "api_token", "api_token_file"})


def settings_table() -> str:
    """The README's Markdown table of every variable, its default and its meaning, from the model itself."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in ServiceSettings.model_fields.items():
        default = "unset" if field.default is None else f"`{field.default}`"
        lines.append(f"| `{env_name(name)}` | {default} | {field.description} |")
    return "\n".join(lines)


DRAIN_TIMEOUT_ENV = env_name("drain_timeout_s")
DEFAULT_DRAIN_TIMEOUT_S: int = ServiceSettings.model_fields["drain_timeout_s"].default


def setting_from(environ: Mapping[str, str], name: str) -> Any:
    """One setting as a service started with ``environ`` reads it, validated by its field; the default when the
    variable is unset or invalid (a service then refuses to start, with the reason: :meth:`ServiceSettings.from_env`).

    For a process that must know a setting without reading them all: the launcher sizes its stop by the drain timeout
    of the server it started, whose other variables it has no business validating."""
    field = ServiceSettings.model_fields[name]
    raw = environ.get(env_name(name), "")
    if not raw.strip():
        return field.default
    try:
        return TypeAdapter(Annotated[(field.annotation, *field.metadata)]).validate_python(raw)
    except ValidationError:
        return field.default
