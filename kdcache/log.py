"""What the commands print of kdcache's log: each record's message on stderr, as the library printed it
before it logged. Library modules only log (logging.getLogger(__name__)); a program that imports kdcache
decides where the records go, and `kdcache`'s command line sends them here."""

import logging
import sys


class _StderrLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:   # sys.stderr looked up now: a caller that redirected it (contextlib.redirect_stderr) gets the lines
            print(record.getMessage(), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Print kdcache's records of `level` and above on stderr, one line each (idempotent)."""
    logger = logging.getLogger("kdcache")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
    logger.setLevel(level)
