"""One exception type for every user-facing failure: the CLI prints its message and exits 2."""


class KdcacheError(Exception):
    """Bad input or an incompatible artefact. The message names the file, sample or setting."""
