"""What the commands print of kdcache's log: each record's message on stderr, as the library printed it
before it logged. Library modules only log (logging.getLogger(__name__)); a program that imports kdcache
decides where the records go, and `kdcache`'s command line sends them here."""

import logging
import sys


# A record logged with extra=RESULT is a command's result (a table a user may pipe), printed on stdout.
RESULT = {"kdcache_result": True}


class _StderrLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"kdcache: {record.levelname.lower()}: {message}"
        try:   # the streams looked up now: a caller that redirected them (contextlib.redirect_stderr) gets the lines
            stream = sys.stdout if getattr(record, "kdcache_result", False) else sys.stderr
            print(message, file=stream, flush=True)
        except Exception:
            self.handleError(record)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """Print kdcache's records of `level` and above, one line each (idempotent): on stderr, warnings and errors
    prefixed "kdcache: warning: " as the command's own; results (extra=RESULT) on stdout."""
    logger = logging.getLogger("kdcache")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
    logger.setLevel(level)
