"""Worker processes that die with the process that started them.

`kdcache prepare` forks a canonicalisation pool and, per split, FFCV's beton writers (plain
multiprocessing Processes, no initializer to hook). A writer inherits the pool's pipes, so after a
kill -9 of prepare neither it nor the pool saw EOF, and both stayed, holding the beton's shared memory.
Inside `children_die_with_this_process()`, every process forked by this one asks Linux to SIGKILL it
when its parent dies (prctl PR_SET_PDEATHSIG), then checks that the parent is still there (it may have
died before the prctl took effect).
"""

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_parent_pid = None          # inside the context: the process whose forked children must die with it
_hook_registered = False


def _after_fork_in_child() -> None:
    global _parent_pid
    if _parent_pid is None:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _parent_pid:   # the parent died before the prctl: nobody would ever wait for us
        os._exit(1)
    _parent_pid = os.getpid()         # a child's own children die with the child


@contextlib.contextmanager
def children_die_with_this_process():
    global _parent_pid, _hook_registered
    if not _hook_registered:          # os.register_at_fork has no unregister: one hook, switched by _parent_pid
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hook_registered = True
    previous, _parent_pid = _parent_pid, os.getpid()
    try:
        yield
    finally:
        _parent_pid = previous
