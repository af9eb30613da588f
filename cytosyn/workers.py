"""Process pools whose workers end with the run that started them.

A ``ProcessPoolExecutor`` worker outlives a main process that is killed with SIGKILL (the OOM killer,
``scancel``, a node going down): nothing tells it, so it finishes its task and keeps writing into a
work folder that a rerun is about to clean or reuse. Every pool of the data stages comes from
:func:`worker_pool`, whose workers

* ask Linux to send them SIGKILL when their parent dies (``PR_SET_PDEATHSIG``; with the forkserver
  context the parent is the fork server, which exits as soon as the main process is gone), and
* watch the main process themselves (a daemon thread, every half second) and exit when it is gone:
  portable, and it also covers a parent that died before the first check could be armed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (pid reused): treat the run as gone
        return False
    return True


def _watch(main_pid: int) -> None:
    while True:
        time.sleep(_POLL_SECONDS)
        if not _alive(main_pid) or os.getppid() == 1:
            os._exit(1)


def die_with(main_pid: int) -> None:
    """Pool initializer: end this worker when ``main_pid`` (the run) ends."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass  # the watchdog below still works
    if not _alive(main_pid):
        os._exit(1)
    threading.Thread(target=_watch, args=(main_pid,), daemon=True, name="cytosyn-die-with-run").start()


def worker_pool(workers: int, context: BaseContext) -> ProcessPoolExecutor:
    """A process pool of ``workers`` processes (``context``: spawn, forkserver, ...) tied to this process."""
    return ProcessPoolExecutor(workers, mp_context=context, initializer=die_with, initargs=(os.getpid(),))
