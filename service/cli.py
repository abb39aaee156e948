"""``transferkit serve``: ``bentoml serve transferkit.service.service:ImageClassifier`` in the foreground, with the
settings as options, a readiness message, and an orderly stop on SIGTERM / Ctrl-C (service/launcher.py)."""

from __future__ import annotations

import argparse
import typing

# Settings offered as options; every other one is still read from its TRANSFERKIT_* variable.
SERVE_OPTIONS = ("default_model", "backend", "device", "layout", "workers", "threads", "top_k", "max_batch_size",
                 "max_latency_ms", "max_images", "timeout_s", "max_concurrency", "drain_timeout_s")


def add_serve_parser(subparsers) -> None:
    from transferkit.service.settings import ServiceSettings, env_name

    p = subparsers.add_parser(
        "serve", help="serve a bundle over HTTP with BentoML",
        description="Run `bentoml serve` for MODEL (a BentoML model tag such as digits:latest, a bundle "
                    "directory, or a model repository of several) until SIGTERM or Ctrl-C, then drain: requests "
                    "already received complete, new ones get 503 `shutting_down`, and the server exits within the "
                    "drain timeout. POST /predict takes "
                    "multipart 'images' file fields; /v2 speaks the Open Inference Protocol; GET /metadata, /livez, "
                    "/readyz and /metrics describe the server. Each option sets the TRANSFERKIT_* variable named in "
                    "its help; unset options keep the environment's value or the service default (README, "
                    "'Settings').",
    )
    p.add_argument("model", metavar="MODEL",
                   help="BentoML model tag, bundle directory, or model repository (a folder of NAME/ or "
                        "NAME/VERSION/ bundles, the newest version served), or several, comma-separated; each "
                        "model answers under its name (/predict?model=NAME, /v2/models/NAME)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    for name in SERVE_OPTIONS:
        field = ServiceSettings.model_fields[name]
        default = "unset" if field.default is None else field.default
        kwargs: dict = {"default": None, "help": f"{field.description} (default {default}; "
                                                 f"{env_name(name)})"}
        choices = _literal_choices(field.annotation)
        if choices:
            kwargs["choices"] = choices
        elif str in typing.get_args(field.annotation):
            kwargs["metavar"] = "NAME"
        else:
            kwargs["type"] = int
            kwargs["metavar"] = "N"
        p.add_argument("--" + name.replace("_", "-"), **kwargs)
    p.set_defaults(handler=run_serve)


def add_build_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="build a bento (CPU by default, --gpu for CUDA) of the service and its models",
        description="Run `bentoml build` on a build context written from this installed transferkit (no checkout "
                    "needed): the runtime and the service, never training or export, the models MODEL names packed "
                    "from BentoML's model store, and pinned requirements. A bundle folder, or each model of a model "
                    "repository (its newest version), is verified and registered in the store first, under its "
                    "name (BentoML lowercases it); several models are all packed, each served under its name, "
                    "their exact versions pinned in the bento. The default CPU bento installs the CPU onnxruntime "
                    "wheel, no CUDA, cuDNN or TensorFlow; --gpu installs onnxruntime-gpu with NVIDIA's CUDA and "
                    "cuDNN wheels (the image also runs on CPU). Then: bentoml containerize TAG.",
    )
    p.add_argument("model", metavar="MODEL", help="a model-store tag as `transferkit export` prints it "
                                                  "(digits:latest), a bundle folder or a model repository; several, "
                                                  "comma-separated")
    p.add_argument("--gpu", action="store_true", help="the GPU bento: onnxruntime-gpu[cuda,cudnn] instead of the "
                                                      "CPU onnxruntime wheel")
    p.add_argument("--openvino", action="store_true",
                   help="add OpenVINO and let the service choose its backend (`auto`: bf16 on CPUs with AMX or "
                        "AVX-512 BF16)")
    p.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    from transferkit.core.console import print_summary
    from transferkit.service.build import build_bento

    print(f"building the {'GPU' if args.gpu else 'CPU'} bento of {args.model} ...", flush=True)
    built = build_bento(args.model, gpu=args.gpu, openvino=args.openvino)
    print_summary([("bento", built.tag), ("models", ", ".join(built.models)), ("target", built.target),
                   ("requirements", ", ".join(built.requirements)),
                   ("next", f"bentoml containerize {built.tag}")])
    return 0


def _literal_choices(annotation) -> tuple[str, ...] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return None


def chosen_settings(args: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line, validated by the service's own settings model."""
    from pydantic import ValidationError

    from transferkit.core.errors import UsageError
    from transferkit.service.settings import ServiceSettings

    given = {name: getattr(args, name) for name in SERVE_OPTIONS if getattr(args, name) is not None}
    try:
        ServiceSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise UsageError(problems) from None
    return given


def _check_port_free(host: str, port: int) -> None:
    """One readable line instead of BentoML's traceback when the port is taken."""
    import socket

    from transferkit.core.errors import UsageError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror} (choose another --port)") from None


def _running(url: str, token: bytes | None = None) -> str:
    """What the ready server runs, from its /metadata: the backend `auto` resolved to, why, and the layout."""
    import json
    import urllib.request

    headers = {"Authorization": "Bearer " + token.decode()} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/metadata", headers=headers), timeout=10) as response:
            meta = json.load(response)
    except (OSError, ValueError) as exc:
        return f"(could not read /metadata: {exc})"
    models = ", ".join(f"{m['name']} ({m['backend']}{', default' if m['default'] else ''})" for m in meta["models"])
    if "backend" not in meta:  # several models, none the default: the list alone
        return f"models {models}; layout {meta['layout']['name']}"
    return (f"{meta['backend']} ({meta['backend_choice']['reason']}); layout {meta['layout']['name']} "
            f"({meta['layout']['reason']}); models {models}")


def run_serve(args: argparse.Namespace) -> int:
    from transferkit.core.errors import UsageError
    from transferkit.core.extras import require_module
    from transferkit.core.manifest import RUNTIME_BACKENDS
    from transferkit.core.predictors import load_bundle
    from transferkit.core.repository import absolute_setting, default_model, model_sources
    from transferkit.service.launcher import BentoServer, serve_in_foreground
    from transferkit.service.settings import ServiceSettings

    settings = chosen_settings(args)
    effective = ServiceSettings(**settings)  # environment + options: what the server will run with
    token = effective.bearer_token()  # a missing token file: one line here, not a server that never starts
    model = absolute_setting(args.model)
    sources = model_sources(model)
    default_model(sources, effective.default_model)  # a default that is not served: one line, now
    needed = RUNTIME_BACKENDS[effective.backend].format if effective.backend != "auto" else None
    if needed is not None:  # savedmodel needs TensorFlow, the openvino backends OpenVINO: say so before starting
        require_module(RUNTIME_BACKENDS[effective.backend].engine, f"--backend {effective.backend}")
    described = []
    for source in sources:
        # Fail here with one line rather than in a server log: each bundle must exist, verify and have the format.
        bundle = load_bundle(source.tag or source.path, formats=None)
        if needed is not None and needed not in bundle.manifest.formats:
            raise UsageError(f"{source.tag or source.path} has no {needed} format, which --backend "
                             f"{effective.backend} runs (it has {', '.join(bundle.manifest.formats)})")
        manifest = bundle.manifest
        described.append(f"{source.name} {manifest.version} ({manifest.backbone}, {len(manifest.class_names)} "
                         "classes)")
    _check_port_free(args.host, args.port)
    server = BentoServer(model, host=args.host, port=args.port, **settings)
    print(f"starting {'; '.join(described)} with {effective.backend} on {server.url}", flush=True)

    def ready(server: BentoServer) -> None:
        credentials = ' -H "Authorization: Bearer <token>"' if token else ""
        print(f"ready: {server.url}  (try: curl{credentials} -F images=@photo.jpg {server.url}/predict; Ctrl-C or "
              f"SIGTERM drains for up to {effective.drain_timeout_s} s and stops)", flush=True)
        print(f"running: {_running(server.url, token)}", flush=True)

    code = serve_in_foreground(server, on_ready=ready)
    print(f"stopped (bentoml serve exit code {code})", flush=True)
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
