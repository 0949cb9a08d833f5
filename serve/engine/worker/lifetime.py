"""vLLM's processes die with their owner.

vLLM's engine core (which on CPU with TP=1 also hosts the worker) has no parent-death handling: when the process
that started it crashes or is SIGKILLed, it keeps running (and polling) as an orphan. `install()` (called from the
plugin's `register()`, which vLLM runs in every process it starts) makes every multiprocessing child of a process
with the plugin loaded ask Linux for SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`); one whose parent
died before that exits at once. Spawned children run `register()` themselves; forked ones inherit the parent's
loaded plugins (vLLM does not run them again), so they are covered by multiprocessing's after-fork hook.

Linux caveat: the signal comes when the *thread* that started the child exits, not the process. vLLM starts its
engine core from the thread that constructs AsyncLLM, which lives as long as its owner: the main thread in scripts
and tests, Ray Serve's long-lived user-code thread in a replica; the engine core starts its workers from its main
thread. No-op outside Linux and in processes that multiprocessing did not start.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _Token:
    """What multiprocessing's after-fork registry holds (weakly) for us; the module keeps it alive."""


_TOKEN = _Token()
_installed = False


def die_with_parent() -> None:
    """If this process is a multiprocessing child on Linux: SIGKILL when its parent dies, or exit now if it has."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: the process just keeps vLLM's behaviour
    if os.getppid() != parent.pid:  # the parent died before prctl: nobody will signal us
        os._exit(1)


def _after_fork(_token: _Token) -> None:
    die_with_parent()


def install() -> None:
    """Apply to this process (a spawned child) and to every child multiprocessing forks from it later."""
    global _installed
    if _installed:
        return
    _installed = True
    die_with_parent()
    multiprocessing.util.register_after_fork(_TOKEN, _after_fork)  # runs in forked children, parent_process() set
