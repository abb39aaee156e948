"""The ``transferkit`` command: one entry point, a subcommand per stage.

Every subcommand ends with a readable one-line error and a non-zero exit for bad input (never a bare traceback),
and Ctrl-C / SIGTERM unwind through the atomic output directories so nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from transferkit import __version__


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) buries the real output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def build_parser() -> argparse.ArgumentParser:
    from export.cli import add_export_parser, add_predict_parser
    from service.cli import add_serve_parser
    from training.cli import add_data_parser, add_train_parser

    parser = argparse.ArgumentParser(
        prog="transferkit",
        description="Fine-tune Keras transfer-learning image classifiers, export them to SavedModel/ONNX, serve "
                    "them with BentoML and benchmark them.",
    )
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    add_predict_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_tensorflow()
    from transferkit.core.errors import TransferkitError

    # SIGTERM -> SystemExit, so `with` blocks (atomic output directories) clean up like on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except TransferkitError as exc:
        print(f"transferkit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"transferkit {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
