"""The ``transferkit`` command: one entry point, a subcommand per stage.

Every subcommand ends with a readable one-line error and a non-zero exit for bad input (never a bare traceback),
and Ctrl-C / SIGTERM unwind through the atomic output directories so nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transferkit import __version__


def build_parser() -> argparse.ArgumentParser:
    from transferkit.benchmarks.cli import add_bench_models_parser, add_bench_parser, add_loadtest_parser
    from transferkit.core.predict_cli import add_predict_parser
    from transferkit.export.cli import add_export_parser
    from transferkit.service.cli import add_build_parser, add_serve_parser
    from transferkit.training.cli import add_data_parser, add_train_parser

    parser = argparse.ArgumentParser(
        prog="transferkit",
        description="Fine-tune Keras transfer-learning image classifiers, export them to SavedModel/ONNX, serve "
                    "them with BentoML and benchmark them.",
    )
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show the libraries' own log lines (TensorFlow/absl C++ logging, retracing "
                             "warnings, Python warnings), hidden by default")
    parser.add_argument("--log-file", type=Path, metavar="PATH",
                        help="append everything, hidden lines included, with timestamps to PATH")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    add_predict_parser(sub)
    add_serve_parser(sub)
    add_build_parser(sub)
    add_bench_parser(sub)
    add_loadtest_parser(sub)
    add_bench_models_parser(sub)
    add_demo_parser(sub)
    return parser


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole toolkit end to end on the embedded digits, offline",
        description="Train MobileNetV2 (width 0.35, 48 px) from scratch on digits 0-4 (model A), transfer it to "
                    "digits 5-9 with 40 training labels per digit (model B: frozen base, then fine-tuning) and "
                    "compare with the same network trained from scratch on the same labels, recipe and epoch "
                    "budget, judged on every other image of digits 5-9 (learning curves of both in one PNG). Then "
                    "export model B to SavedModel/ONNX/ONNX-fp16 with a validation report (and the OpenVINO backends "
                    "this CPU runs, where transferkit[openvino] is installed), serve it with BentoML on the backend "
                    "`auto` picks, "
                    "classify ten held-out images over HTTP (and a corrupt file), benchmark the backends, and "
                    "summarise. Writes demo.log with every library log line.",
    )
    p.add_argument("--out", type=Path, default=Path("transferkit-demo"),
                   help="directory for everything the demo writes (default ./transferkit-demo)")
    p.add_argument("--quick", action="store_true",
                   help="5 benchmark repeats instead of 20, the same training (used by the tests)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from transferkit.demo import run_demo as demo

    return demo(args.out, args.quick, args.force)


def main(argv: list[str] | None = None) -> int:
    from transferkit.core import stopping
    from transferkit.core.logs import configure_logging

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # SIGTERM -> SystemExit, so `with` blocks (atomic output directories) clean up like on Ctrl-C; both are also
    # recorded, because a library can swallow the exception or turn it into another one (core/stopping.py).
    stopping.install()
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.log_file)  # before any TensorFlow import
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: its exit status, every error turned into one line on stderr. The process-wide setup
    (signal handlers, the log router) is :func:`main`'s, so that tests can run a command in their own process."""
    from transferkit.core import stopping
    from transferkit.core.errors import TransferkitError
    from transferkit.core.extras import missing_extra, require_command_extra

    def stopped() -> int:
        print(f"transferkit {args.command}: stopped by {stopping.stop_signal_name()}; nothing was written",
              file=sys.stderr)
        return stopping.stop_exit_code()

    try:
        require_command_extra(args.command)
        return int(args.handler(args) or 0)
    except TransferkitError as exc:
        if stopping.stop_exit_code() not in (None, exc.exit_code):  # the signal came out as this error
            return stopped()
        print(f"transferkit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc, args.command)
        if missing is None:
            raise
        print(f"transferkit {args.command}: error: {missing}", file=sys.stderr)
        return missing.exit_code
    except KeyboardInterrupt:
        print(f"transferkit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if stopping.stop_exit_code() is not None and exc.code == stopping.stop_exit_code():
            return stopped()
        raise
    except Exception:
        if stopping.stop_exit_code() is not None:
            return stopped()
        raise


if __name__ == "__main__":
    sys.exit(main())
