"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

A parent killed by `kill -9` runs no cleanup, so its children (datatrove's pool workers and multiprocessing
manager, the MCP servers of `serve --mcp` and `agent`) would run on as orphans. Linux's parent-death signal
(prctl PR_SET_PDEATHSIG) has the kernel send them SIGKILL instead. Two ways in:

- forked children (multiprocessing with the fork start method): `with forks_die_with_parent():` sets it in
  every child forked meanwhile (os.register_at_fork);
- executed commands: `wrap(argv)` runs argv through `python -m minicpm4.children PARENT_PID argv...`, which sets
  it and then execs argv (the setting survives exec).

The signal follows the thread that forked the child: a child forked by a thread that ends gets it then, so
fork from a thread that lives as long as the child is needed (the main thread, an event loop's thread).
Elsewhere than Linux these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from typing import Iterator

_PR_SET_PDEATHSIG = 1
_active = 0  # forks_die_with_parent() nesting depth
_forking_parent = 0  # pid of the process that is forking, seen by its child


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent (pid `parent`) dies; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the prctl took effect: nobody would signal us
        os._exit(1)


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    if _active:
        die_with_parent(_forking_parent)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def forks_die_with_parent() -> Iterator[None]:
    global _active
    _active += 1
    try:
        yield
    finally:
        _active -= 1


def wrap(argv: list[str]) -> list[str]:
    """argv run so that it dies with this process."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-m", "minicpm4.children", str(os.getpid()), *argv]


if __name__ == "__main__":
    die_with_parent(int(sys.argv[1]))
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:  # not found, not executable: one line, as the shell would say it
        print(f"minicpm4: cannot run {sys.argv[2]}: {e.strerror}", file=sys.stderr)
        sys.exit(127)
