"""What every command-line front end shares: leaving quietly when the reader of its output leaves.

``python -m pipeline.predict ... | head -1`` closes the pipe after one line; the next write raises
BrokenPipeError, and Python would print a traceback (and "Exception ignored" at exit, when it
flushes stdout). ``run_main`` turns that into the convention of every Unix tool killed by SIGPIPE:
no message, exit status 141 (128 + SIGPIPE), which a shell pipeline reports only under
``set -o pipefail``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE (13), what a shell reports for a writer killed by SIGPIPE


def run_main(main: Callable[[], int]) -> int:
    """``main()``'s exit status, or ``EXIT_BROKEN_PIPE`` without a traceback when stdout's reader has
    gone. stdout is pointed at /dev/null afterwards, so the interpreter's final flush is silent."""
    try:
        code = main()
        sys.stdout.flush()  # inside the try: output still buffered would fail at exit, outside it
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
