"""Run a child process whose hang, if it hangs, says where.

`subprocess.run(..., timeout=...)` kills a child that outlives its time and reports only that it
did. `run_watched` runs the child with Python's fault handler on and, past the timeout, sends it
(and the processes it started) SIGABRT first, so that the failure carries every thread's stack.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run_watched(args, timeout: float, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True, **kw) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGABRT)
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
            raise AssertionError(f"{args!r} ran past {timeout} s; its output:\n{out[-4000:]}\n"
                                 f"its stacks:\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(args, p.returncode, out, err)
