"""TensorFlow imported with its native start-up notices moved to the DEBUG log.

Imported only where TensorFlow is about to be needed, so that a run with
nothing to do (a cron tick over an archive already done) never pays for it.
"""

from __future__ import annotations

import os
import sys
import threading

_IMPORTING = threading.Lock()  # the stderr swap is process-wide: two at once would leave it swapped

# What TensorFlow's native code prints at import whatever TF_CPP_MIN_LOG_LEVEL says: absl's preamble (which
# ends without a newline, so the next line follows on the same one) and informational (I-severity) lines such as
# the oneDNN and "no CUDA drivers" notices.
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_IMPORT_NOTICE = r"I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \w+\.cc:\d+\] "

# A separate process reads the import's stderr, so that what it must show (a fatal "this CPU lacks AVX" line
# before an abort) reaches the terminal even when the import kills this process.  It ignores Ctrl-C (it ends
# when the import's stderr closes) and hands the notices back through a file, for the DEBUG log.
_STDERR_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
preamble, notice = sys.argv[1].encode(), re.compile(sys.argv[2].encode())
with open(int(sys.argv[3]), "ab", closefd=False) as notices:
    for line in sys.stdin.buffer:
        line = line.replace(preamble, b"")
        if notice.match(line):
            notices.write(line)
        elif line.strip():
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
"""


_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")  # Keras 3's, each the name of its package


def check_backend() -> None:
    """Refuses a KERAS_BACKEND that Keras could not import (mistyped, or not installed) before anything is
    made: Keras says so with a traceback, at the first model, after OUTPUT and its journal."""
    import importlib.util

    from batchsr.errors import ConfigError

    name = os.environ.get("KERAS_BACKEND")
    if not name:  # Keras ignores it empty too
        return
    if name not in _BACKENDS:
        raise ConfigError(f"KERAS_BACKEND = {name!r} is not a Keras backend (one of {', '.join(_BACKENDS)}; "
                          "unset, Keras uses tensorflow)")
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"KERAS_BACKEND = {name!r}: {name} is not installed in this environment (install it, "
                          "or unset KERAS_BACKEND)")


def import_tensorflow() -> None:
    """Imports TensorFlow with its native start-up notices moved to the DEBUG log, so that cron mails and
    journals hold batchsr's own lines; anything else written to stderr meanwhile passes through."""
    import importlib.util

    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:  # training may run on JAX alone
        return
    with _IMPORTING:
        if "tensorflow" not in sys.modules:
            _import_filtered()


def _import_filtered() -> None:
    import subprocess
    import tempfile

    from loguru import logger

    sys.stderr.flush()
    with tempfile.TemporaryFile() as notices:  # no name: a kill during the import leaves nothing in /tmp
        read_end, write_end = os.pipe()
        try:
            reader = subprocess.Popen([sys.executable, "-c", _STDERR_FILTER, _ABSL_PREAMBLE, _IMPORT_NOTICE, str(notices.fileno())],
                                      stdin=read_end, pass_fds=(notices.fileno(),))
        finally:
            os.close(read_end)
        saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)  # the last writer gone: the reader ends
            os.close(saved)
            reader.wait()
            notices.seek(0)
            for line in notices.read().decode("utf-8", "replace").splitlines():
                logger.debug("tensorflow: {}", line)
