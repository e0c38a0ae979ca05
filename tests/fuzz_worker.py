"""A fuzz worker: `python tests/fuzz_worker.py ARGS_JSON CAP_MB` runs `mlx_llama ARGS -m PATH` in this
process for each PATH read from stdin and answers one JSON line per case: the exit status, stdout,
stderr, the seconds it took and its peak RSS above the worker's resting size.

It runs the command line as a user would (click's parsing, the error handler, the printing),
without paying an interpreter start per case. Memory is capped at CAP_MB above that (RLIMIT_DATA, set
after the first case): a blow-up fails the case with MemoryError instead of taking the machine.
The test kills a worker whose case runs past its time cap and starts another.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import time
import traceback
import warnings


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def run_case(cli, args: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # peak RSS measured from here
    rss0 = _status_kib("VmRSS")
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(args=args, prog_name="mlx_llama")
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:  # noqa: BLE001 - what a user would see as a traceback
            rc = "traceback"
            err.write(traceback.format_exc())
    return dict(rc=rc, stdout=out.getvalue(), stderr=err.getvalue(), seconds=time.perf_counter() - start,
                rss_mb=(_status_kib("VmHWM") - rss0) / 1024)


def main() -> int:
    args, cap_mb = json.loads(sys.argv[1]), int(sys.argv[2])
    import mlx.core as mx

    from mlx_llama.cli import main as cli

    warnings.simplefilter("always")  # a warning shows in every case it happens in, not the first only
    mx.set_cache_limit(0)  # freed buffers go back, so one case's peak is its own
    capped = False
    for line in sys.stdin:
        result = run_case(cli, [*args, "-m", line.rstrip("\n")])
        if not capped:  # after the first (base) case: the worker's resting size plus the cap
            limit = _status_kib("VmData") * 1024 + cap_mb * 2**20
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
            capped = True
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
