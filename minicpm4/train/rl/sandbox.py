"""Run an untrusted Python program (a model's code) under limits, for the code reward.

The MiniCPM4 report runs code in a Firejail sandbox; this is the same idea with the standard library only. The
program runs in a fresh temporary directory, in a new session (its whole process group is killed at the end), from
a small launcher that, before it execs the program's interpreter:

- sets resource limits (resource.setrlimit): CPU seconds (RLIMIT_CPU: SIGXCPU, then SIGKILL a second later),
  address space (RLIMIT_AS: allocation fails with MemoryError), file size (RLIMIT_FSIZE: stdout and stderr go to
  files, so a flood of output is cut off by SIGXFSZ), open files, no core dumps;
- cuts the network where the OS allows: unshare(CLONE_NEWNET) (as root), or CLONE_NEWUSER | CLONE_NEWNET
  (unprivileged user namespaces): the new network namespace has only a loopback device, and it is down, so every
  connect fails, even to 127.0.0.1. Where unshare is refused, the program runs with the network and the result
  says so (RunResult.isolation);
- forbids new processes: RLIMIT_NPROC = 0 after switching to an unprivileged uid (nobody, 65534) when running as
  root (root ignores RLIMIT_NPROC), so fork() fails with EAGAIN; when root's interpreter is not executable by
  nobody, python3 from PATH runs instead;
- a wall-clock timeout (a program blocked in sleep or I/O uses no CPU) after which the process group is killed.

What it does not do: hide the filesystem (the program can read world-readable files and write where nobody may,
e.g. /tmp, within RLIMIT_FSIZE), or limit syscalls (no seccomp). Run it on machines where that is acceptable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARK = "#sandbox "  # the launcher's first stderr line: what isolation it got

_LAUNCHER = r"""
import ctypes, json, os, resource, shutil, sys
cfg = json.loads(sys.argv[1])
def limit(what, n):
    resource.setrlimit(what, (n, n))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
limit(resource.RLIMIT_AS, cfg["memory_bytes"])
limit(resource.RLIMIT_FSIZE, cfg["output_bytes"])
limit(resource.RLIMIT_NOFILE, cfg["open_files"])
limit(resource.RLIMIT_CORE, 0)
root = os.geteuid() == 0
libc = ctypes.CDLL(None, use_errno=True)
net = libc.unshare(0x40000000 if root else 0x10000000 | 0x40000000) == 0  # CLONE_NEWNET (| CLONE_NEWUSER)
uid = os.geteuid()
if root:
    os.setgroups([]); os.setgid(65534); os.setuid(65534); uid = 65534
limit(resource.RLIMIT_NPROC, 0)  # after setuid: set before, the kernel would refuse the exec below
py = sys.executable if os.access(sys.executable, os.X_OK) else shutil.which("python3", path="/usr/bin:/bin")
sys.stderr.write("#sandbox " + json.dumps({"network_cut": net, "uid": uid, "fork_blocked": uid != 0}) + "\n")
sys.stderr.flush()
os.execv(py, [py, "-I", "-S", "main.py"])
"""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 2
    wall_s: float = 5.0
    memory_bytes: int = 512 << 20
    output_bytes: int = 1 << 20
    open_files: int = 64


@dataclass
class RunResult:
    returncode: int | None  # None: killed by the wall timeout
    stdout: str
    stderr: str
    timed_out: bool
    signal: str | None  # the signal that ended it (SIGXCPU: CPU limit, SIGKILL: hard CPU limit or timeout, ...)
    isolation: dict  # {"network_cut": bool, "uid": int, "fork_blocked": bool}; {} if the launcher never ran

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            return "wall timeout"
        if self.signal:
            return f"killed by {self.signal}"
        if self.returncode:
            last = self.stderr.strip().splitlines()[-1:] or [""]
            return f"exit {self.returncode}: {last[0][:160]}"
        return "ok"


def run_python(source: str, stdin: str = "", limits: Limits = Limits()) -> RunResult:
    """Run `source` as main.py under `limits` with `stdin`; never raises for anything the program does."""
    tmp = Path(tempfile.mkdtemp(prefix="minicpm4-sandbox-"))
    try:
        (tmp / "main.py").write_text(source)
        (tmp / "stdin").write_text(stdin)
        if os.geteuid() == 0:
            os.chown(tmp, 65534, 65534)
        tmp.chmod(0o755)
        (tmp / "main.py").chmod(0o644)
        cfg = json.dumps({k: getattr(limits, k) for k in ("cpu_s", "memory_bytes", "output_bytes", "open_files")})
        with open(tmp / "stdin") as fin, open(tmp / "stdout", "wb") as fout, open(tmp / "stderr", "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, cfg], stdin=fin, stdout=fout,
                                    stderr=ferr, cwd=tmp, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also any child that escaped the fork limit
            proc.wait()
        out = (tmp / "stdout").read_bytes()[:limits.output_bytes].decode("utf-8", "replace")
        err = (tmp / "stderr").read_bytes()[:limits.output_bytes].decode("utf-8", "replace")
        isolation = {}
        if err.startswith(MARK):
            first, _, err = err.partition("\n")
            isolation = json.loads(first[len(MARK):])
        rc = None if timed_out else proc.returncode
        sig = signal.Signals(-rc).name if rc is not None and rc < 0 else None
        return RunResult(rc, out, err, timed_out, sig, isolation)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
