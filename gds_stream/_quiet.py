"""The command line's one-line rule: where log records, Python warnings and native libraries'
own stderr writes go while a command runs.

Loud (``-v``/``--debug``): everything is shown as it happens. Quiet (the default):

* gds-stream's own warnings (``gds_stream.*`` loggers, WARNING and above) are held and shown
  when the command ends, unless it ends in a refusal (:meth:`Held.drop`), which is one line;
* other libraries' log records (laspy's ``ERROR laspy.lasreader: …``) and Python warnings
  (numpy's ``RuntimeWarning``\\ s) are not shown;
* what native code writes to file descriptor 2 itself (a Rust panic message from lazrs) is
  captured in a temporary file and replayed when the command succeeds, dropped on a refusal.

Python's own ``sys.stderr`` (the progress bar, the error line) still reaches the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

_FORMAT = "%(levelname)s %(name)s: %(message)s"


class Held(logging.Handler):
    """Keeps gds-stream's WARNING records until :meth:`show` (or :meth:`drop`)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.dropped = False
        self.setFormatter(logging.Formatter(_FORMAT))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "gds_stream" or record.name.startswith(("gds_stream.", "fallback",
                                                                       "bench"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def drop(self) -> None:
        """The command is refusing: show nothing but its one line."""
        self.dropped = True
        self.records.clear()

    def show(self, stream) -> None:
        for r in self.records:
            stream.write(self.format(r) + "\n")
        self.records.clear()


@contextlib.contextmanager
def quiet_stderr(*, debug: bool = False, verbose: bool = False):
    """Configure logging for a command and apply the one-line rule unless loud; yields the
    :class:`Held` handler (quiet) or ``None`` (loud)."""
    if debug or verbose:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=_FORMAT,
                            stream=sys.stderr, force=True)
        yield None
        return
    held = Held()
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers[:] = [held]
    root.setLevel(logging.WARNING)
    old_stderr, saved, capture = sys.stderr, None, None
    try:
        sys.stderr.flush()
        if sys.stderr.fileno() != 2:  # stderr replaced (a test's capture): leave fd 2 alone
            raise ValueError("sys.stderr is not file descriptor 2")
        saved = os.dup(2)
        capture = tempfile.TemporaryFile()
        os.dup2(capture.fileno(), 2)
        sys.stderr = open(saved, "w", encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                          errors="backslashreplace", buffering=1, closefd=False)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: leave it as it is
        if capture is not None:
            capture.close()
        if saved is not None:
            os.close(saved)
        saved = capture = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield held
    finally:
        replay = b""
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sys.stderr.close()
            sys.stderr = old_stderr
            if not held.dropped:
                capture.seek(0)
                replay = capture.read(1 << 20)
            capture.close()
        if replay:
            sys.stderr.write(replay.decode("utf-8", "backslashreplace"))
        held.show(sys.stderr)
        sys.stderr.flush()
        root.handlers[:] = old_handlers
        root.setLevel(old_level)
