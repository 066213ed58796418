"""Small-file writes that a kill -9 cannot leave half done: readers see the old file or the new one."""

import os
from pathlib import Path


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
