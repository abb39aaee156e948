"""SIGTERM / Ctrl-C that a library swallows or turns into another exception still stop the job (core/stopping.py).

A real signal, sent by the process to itself from inside a ``__del__``: Python runs the handler there and drops the
exception it raises ("Exception ignored in ..."), which is what tf2onnx's garbage collection did to an export's
SIGTERM (the bundle was published and registered, exit 0).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# Sends `SIG` to this process from a finalizer, so the handler's exception is raised inside __del__ and swallowed.
SWALLOW = """
import os, signal, sys
class Swallows:
    def __del__(self):
        os.kill(os.getpid(), signal.{sig})
        for _ in range(1000):  # bytecode after the kill: the handler runs here, inside __del__
            pass
def swallow_a_signal():
    Swallows()  # collected at once
"""


def run_python(code: str, sig: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SWALLOW.format(sig=sig) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120,
                          # a job started with `&` inherits SIGINT ignored; a user's Ctrl-C finds it at its default
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_swallowed_signal_does_not_publish_the_output_directory(tmp_path, sig, code):
    out = tmp_path / "out"
    result = run_python(f"""
        from transferkit.core import stopping
        from transferkit.core.atomic import atomic_output_dir
        stopping.install()
        try:
            with atomic_output_dir({str(out)!r}) as staging:
                (staging / "half.txt").write_text("x")
                swallow_a_signal()
                print("the block went on after the signal")
        except KeyboardInterrupt:
            sys.exit(130)
        print("published")
    """, sig)
    assert "the block went on after the signal" in result.stdout  # the exception really was swallowed
    assert "published" not in result.stdout.splitlines()
    assert result.returncode == code, result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "Exception ignored" not in result.stderr  # the swallowed stop's traceback is not shown to the user


@pytest.mark.parametrize(("swallowed", "code", "line"), [
    # The CI case: an export's SIGTERM came out as a ConversionError (exit 4). The CLI says it was stopped.
    (True, 143, "transferkit export: stopped by SIGTERM; nothing was written"),
    # Without a signal the same error keeps its own exit code and message.
    (False, 4, "transferkit export: error: tf2onnx could not convert the model"),
])
def test_a_signal_that_comes_out_as_another_error_is_reported_as_a_stop(swallowed, code, line):
    result = run_python(f"""
        import transferkit.export.cli as export_cli
        from transferkit.cli import main
        from transferkit.export.convert import ConversionError

        def run_export(args):
            if {swallowed}:
                swallow_a_signal()
            raise ConversionError("tf2onnx could not convert the model")
        export_cli.run_export = run_export
        sys.exit(main(["export", "some-run", "--out", "some-bundle"]))
    """, "SIGTERM")
    assert result.returncode == code, result.stderr
    assert [text for text in result.stderr.splitlines() if text.startswith("transferkit ")] == [line]
