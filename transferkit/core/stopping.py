"""Ctrl-C and SIGTERM for the CLIs: raised where they land, and remembered.

The handlers raise (KeyboardInterrupt, or SystemExit(128 + signum) for SIGTERM) so ``with`` blocks such as the atomic
output directories unwind. Raising is not enough on its own: Python runs a handler wherever the main thread is, and
when that is a ``__del__`` (garbage collection in the middle of tf2onnx's conversion, seen in a test) the exception is
printed as "Exception ignored in ..." and dropped, so the export went on and published its bundle. A handler that
lands in code called back from C++ can come out as another exception instead (a CI run exited 4, a ConversionError,
after its SIGTERM). So the signal is also recorded: long jobs call :func:`raise_if_stop_requested` at their
checkpoints (before publishing an output directory, before registering in the store, after each training batch),
and the CLI reports a stop, not the exception it happened to turn into.
"""

from __future__ import annotations

import signal
import sys

_received: int | None = None


def _on_sigterm(signum: int, frame) -> None:
    global _received
    _received = signum
    raise SystemExit(128 + signum)


def _on_sigint(signum: int, frame) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt


def _unraisable(unraisable) -> None:
    """Drop the "Exception ignored in ..." traceback of a stop that a ``__del__`` swallowed: it is handled."""
    if _received is not None and issubclass(unraisable.exc_type, (SystemExit, KeyboardInterrupt)):
        return
    sys.__unraisablehook__(unraisable)


def install() -> None:
    """Handle SIGTERM, and SIGINT unless it is ignored (a job started with ``&`` by a script inherits it ignored)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.unraisablehook = _unraisable
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def stop_exit_code() -> int | None:
    """128 + the signal number once SIGINT or SIGTERM has arrived (130, 143), else None."""
    return None if _received is None else 128 + _received


def stop_signal_name() -> str:
    return signal.Signals(_received).name if _received is not None else ""


def raise_if_stop_requested() -> None:
    """Raise what the handler raised, in case that exception was swallowed or turned into another one."""
    if _received == signal.SIGINT:
        raise KeyboardInterrupt
    if _received is not None:
        raise SystemExit(128 + _received)
