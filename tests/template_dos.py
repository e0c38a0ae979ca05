"""Hostile chat templates, run one after another by `python tests/template_dos.py` (the test starts
it in a process of its own, with a memory cap), one JSON line per case: how long it ran, the
memory it took (Python's allocations and the process's peak RSS above its start), and how it
ended. Each must be refused or stopped by the render limits (1 s, 1 MB by default)."""

from __future__ import annotations

import json
import sys
import time
import tracemalloc

S = "{% set s = 'a' * 1000000 %}"  # the largest string the limits allow, for cases that multiply it
NS = "{% set ns = namespace(s='ab', l=[], n=3) %}"

# name → template source; "time": must be stopped by the time limit, else refused by a size check
CASES = {
    "nested range loops": ("time", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    "nested loops writing": ("time", "{% for i in range(100000) %}{% for j in range(100000) %}{% if j < 0 %}x{% endif %}"
                                     "{% endfor %}{% endfor %}"),
    "exponential macro recursion": ("time", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                                            "{{ f(60) }}"),
    "lipsum": ("time", "{{ lipsum(1000000) }}"),
    "wordwrap of 1 MB": ("time", "{{ ('a ' * 500000)|wordwrap(1) }}"),
    "9**(9**9)": ("size", "{{ (9 ** (9 ** 9)) > 0 }}"),
    "2**100000": ("size", "{{ 2 ** 100000 }}"),
    "squaring in a loop": ("size", NS + "{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n > 0 }}"),
    "'a' * 10**9": ("size", "{{ 'a' * 10 ** 9 }}"),
    "[1] * 10**9": ("size", "{{ ([1] * 10 ** 9)|length }}"),
    "tojson(indent=10**8)": ("size", "{{ messages|tojson(indent=10 ** 8) }}"),
    "tojson with a 1 MB indent string": ("size", S + "{{ messages|tojson(indent=s) }}"),
    "indent(10**9)": ("size", "{{ 'a\nb\nc'|indent(10 ** 9) }}"),
    "center filter": ("size", "{{ 'a'|center(10 ** 9) }}"),
    "str.center": ("size", "{{ 'a'.center(10 ** 9) }}"),
    "str.ljust": ("size", "{{ 'a'.ljust(999999999) }}"),
    "str.zfill": ("size", "{{ '1'.zfill(999999999) }}"),
    "str.expandtabs": ("size", "{{ ('\t' * 1000).expandtabs(10 ** 6) }}"),
    "str.format width": ("size", "{{ '{:>999999999}'.format('a') }}"),
    "str.format nested width": ("size", "{{ '{:>{w}}'.format('a', w=999999999) }}"),
    "str.format_map width": ("size", "{{ '{:{w}}'.format_map({'w': 999999999}) }}"),
    "printf width": ("size", "{{ '%999999999d' % 1 }}"),
    "printf * width": ("size", "{{ '%*d' % (999999999, 1) }}"),
    "format filter width": ("size", "{{ '%999999999s'|format('a') }}"),
    "~ doubling": ("size", NS + "{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"),
    "+ doubling": ("size", NS + "{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}"),
    "set-block doubling": ("size", NS + "{% for i in range(64) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}"
                                        "{% endfor %}{{ ns.s|length }}"),
    "macro doubling": ("size", "{% macro d(x) %}{{ x }}{{ x }}{% endmacro %}" + NS
                               + "{% for i in range(64) %}{% set ns.s = d(ns.s) %}{% endfor %}{{ ns.s|length }}"),
    "str.replace('', s)": ("size", "{% set s = 'a' * 100000 %}{{ s.replace('', s)|length }}"),
    "replace filter": ("size", "{% set s = 'a' * 100000 %}{{ (s|replace('', s))|length }}"),
    "join filter of 1000 × 1 MB": ("size", S + "{{ ([s] * 1000)|join|length }}"),
    "str.join of 1000 × 1 MB": ("size", S + "{{ ''.join([s] * 1000)|length }}"),
    "batch padding": ("size", "{{ range(3)|batch(10 ** 9, 'x')|list|length }}"),
    "slice count": ("size", "{{ range(3)|slice(10 ** 9)|list|length }}"),
    "10 MB of output": ("size", "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"),
    "1 MB strings kept in a list": ("size", NS + S + "{% for i in range(100000) %}{% set ns.l = ns.l + [s ~ i] %}"
                                                     "{% endfor %}{{ ns.l|length }}"),
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def run(name: str, source: str) -> dict:
    from mlx_llama.chat_template import ChatTemplate
    from mlx_llama.errors import ChatTemplateError

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak RSS starts again from here
    rss0 = _rss_kib("VmRSS")
    tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        ChatTemplate(source).render([{"role": "user", "content": "Hello"}])
        outcome, error = "rendered", ""
    except ChatTemplateError as e:
        outcome, error = type(e).__name__, str(e)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dict(case=name, seconds=seconds, cpu_seconds=cpu, python_mb=python_peak / 2**20,
                rss_mb=(_rss_kib("VmHWM") - rss0) / 1024, outcome=outcome, error=error)


def main() -> int:
    if sys.argv[1:2] == ["--cap-data"]:  # the caller's memory cap, set here (not in a preexec_fn)
        import resource

        cap = int(sys.argv[2])
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    for name, (_, source) in CASES.items():
        print(json.dumps(run(name, source)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
