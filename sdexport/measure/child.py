"""Measure a piece of work in a fresh Python process: its wall time and its peak resident memory.

A fresh process, because a parent that already imported torch or opened models would add its own
memory to the figure. The child's code gets ``rss(field)`` (bytes, from /proc/self/status: "VmHWM:" is
the peak, "VmRSS:" the current value) and prints one JSON object as its last line, which is returned.
Cold starts of a pipeline have their own harness with phases: :mod:`sdexport.measure.cold_start`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]

PRELUDE = r"""
import json, sys, time
def rss(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
"""

EXPORT = PRELUDE + r"""
from sdexport.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:] + ["--quiet"])
if rc:
    sys.exit(rc)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": rss("VmHWM:")}))
"""


def run_child(code: str, *args) -> dict:
    """Run ``PRELUDE + code`` with ``args`` as sys.argv[1:]; the JSON object it printed last."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=_ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measured child failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_cost(*cli_args) -> dict:
    """``sdexport export *cli_args`` in a fresh process: ``seconds`` and ``peak_rss`` (bytes)."""
    return run_child(EXPORT, "export", *cli_args)
