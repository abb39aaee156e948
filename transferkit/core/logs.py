"""What a command's user sees: transferkit's own messages, not the libraries' chatter.

Library code logs through :mod:`logging` (``logging.getLogger(__name__)``); the CLI calls :func:`configure_logging`
once, which decides:

- records of ``transferkit.*`` loggers at INFO and above are printed as plain lines on stdout (warnings and errors
  prefixed), like the ``print`` calls they replace;
- every other library's records (TensorFlow's retracing warnings, absl, tf2onnx, Python warnings) go to the log
  file only, or to stderr as well with ``--verbose``;
- C++ log lines that TensorFlow, XLA and absl write straight to file descriptor 2 (``I0000 ... cudart_stub.cc``,
  ``E0000 ... cuda_platform.cc``, ``NodeDef mentions attribute use_unbounded_threadpool``) cannot be reached through
  :mod:`logging`, and ``TF_CPP_MIN_LOG_LEVEL`` does not stop those printed before absl is initialised: fd 2 is
  routed through a pipe whose reader sends such lines to the log file (and stderr with ``--verbose``) and passes
  every other line through unchanged.

Nothing happens at import; only the CLI's ``main`` installs this, so importing transferkit as a library never
touches the process' logging or file descriptors.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

# glog/absl line prefix: severity letter, MMDD, time (absl before InitializeLog: 00:00:<epoch seconds>), thread id,
# file:line]
_NATIVE_LINE = re.compile(r"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ ]+:\d+\]|WARNING: All log messages before "
                          r"absl::InitializeLog\(\) is called are written to STDERR)")
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_native_log_line(line: str) -> bool:
    """A line written by TensorFlow/XLA/absl C++ logging (not by transferkit or Python)."""
    return bool(_NATIVE_LINE.match(line))


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "transferkit" or record.name.startswith("transferkit.")
        return (ours and record.levelno >= logging.INFO) or (self.verbose and record.levelno >= logging.INFO)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        ours = record.name.startswith("transferkit")
        if not ours:
            return f"[{record.name}] {record.levelname.lower()}: {message}"
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class _NativeLogRouter:
    """Reads what is written to fd 2 and routes C++ log lines away from the terminal (see the module docstring)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.files: list[logging.FileHandler] = []  # written under each handler's own lock
        self._closed = False
        sys.stderr.flush()
        self._terminal = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._reader = os.fdopen(read_end, "rb", buffering=0)
        self._thread = threading.Thread(target=self._pump, name="native-log-router", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        pending = b""
        while True:
            chunk = self._reader.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._route(line + b"\n")
        if pending:
            self._route(pending)

    def _route(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        native = is_native_log_line(text)
        for handler in list(self.files):
            with handler.lock, contextlib.suppress(Exception):
                handler.stream.write(text)
                handler.stream.flush()
        if not native or self.verbose:
            os.write(self._terminal, raw)

    def close(self) -> None:
        """Restore fd 2 and let the reader drain (children still holding the pipe are not waited for long)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self._terminal, 2)  # fd 2 held the pipe's only write end: the reader now sees EOF
        self._thread.join(timeout=2)


_router: _NativeLogRouter | None = None
_file_handlers: list[logging.Handler] = []


def configure_logging(verbose: bool = False, log_file: Path | None = None) -> None:
    """Set up what the user sees for a CLI process (call once, before TensorFlow is imported)."""
    global _router
    if _router is not None:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if log_file else logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(_ConsoleFilter(verbose))
    console.setFormatter(_ConsoleFormatter())
    root.addHandler(console)
    logging.captureWarnings(True)  # Python warnings become records of "py.warnings": file, or --verbose
    if _router is None:
        _router = _NativeLogRouter(verbose)
    if log_file is not None:
        attach_log_file(Path(log_file))


CHATTY_LIBRARIES = ("PIL", "h5py", "matplotlib")


def attach_log_file(path: Path) -> None:
    """Also write every record (all loggers, DEBUG up) and every C++ log line to ``path`` (appended)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.DEBUG:
        # Keep the console's threshold: it filters by itself (INFO), so lowering the root only feeds the file.
        root.setLevel(logging.DEBUG)
    for name in CHATTY_LIBRARIES:
        # Pillow logs two DEBUG lines per PNG chunk read, matplotlib ~60 font-scoring lines per text size: thousands
        # of lines per run, nothing to act on.
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.INFO)
    _file_handlers.append(handler)
    if _router is not None:
        _router.files.append(handler)


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[Path]:
    """:func:`attach_log_file` for the duration of a block (the demo keeps a complete log beside its outputs)."""
    attach_log_file(path)
    handler = _file_handlers[-1]
    try:
        yield path
    finally:
        if _router is not None and handler in _router.files:
            _router.files.remove(handler)
        logging.getLogger().removeHandler(handler)
        _file_handlers.remove(handler)
        handler.close()
