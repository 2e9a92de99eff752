"""Start-up time of ``safefm-cam``: seconds from the process's start to the first anonymized
frame reaching the sink (a benchmark figure, not a test).

    python scripts/startup_time.py                      # 3 runs, median, with a timeline each
    python scripts/startup_time.py --runs 5 --imports   # + where the import time goes
    python scripts/startup_time.py -- --runtime torch   # extra safefm-cam options after --

Each run starts ``safefm-cam --source CLIP --no-vcam --record /dev/null --no-tray -v`` (a video file
played like a camera) and stamps every log line as it arrives; the run ends at the line
"first anonymized frame sent". The timeline shows where the seconds went (engine build, warm-up,
first frame); ``--imports`` adds one run under ``python -X importtime`` and lists the packages
that took longest to import (with what each pulled in, first import only).

Measure with a warm disk cache (one run first, not counted: ``--discard 1``, the default) and
say how loaded the machine was (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from safefm.paths import shared_data_dir

FIRST = "first anonymized frame sent"
TIMELINE = ("generator", "identity", "facemesh", "landmarks", "engine built", "warm-up",
            "engine ready", FIRST)


def cam_command(source: Path, extra: list[str], importtime: bool = False) -> list[str]:
    return [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "safefm.cli.cam",
            "--source", str(source), "--no-vcam", "--record", os.devnull, "--no-tray", "-v", *extra]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def one_run(cmd: list[str], timeout: float) -> tuple[float | None, float | None, list[tuple[float, str]]]:
    """(seconds to the first anonymized frame or None, CPU seconds the process had used by
    then (all its threads; less sensitive to a loaded machine than the wall time) or None,
    [(seconds, stderr line)])."""
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = cpu = None
    try:
        for line in proc.stderr:
            t = time.perf_counter() - t0
            lines.append((t, line.rstrip("\n")))
            if FIRST in line:
                first, cpu = t, cpu_seconds(proc.pid)
                break
            if t > timeout:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
        lines += [(time.perf_counter() - t0, x) for x in (rest or "").splitlines()]
    return first, cpu, lines


def import_summary(lines: list[str], top: int = 12) -> list[tuple[str, float]]:
    """Seconds of import per package the project pulls in, from ``-X importtime`` lines: each
    module's own time is charged to the first package outside ``safefm`` in the chain that
    imported it (torch's dependencies to torch, matplotlib under mediapipe to mediapipe)."""
    pat = re.compile(r"import time:\s+(\d+)\s+\|\s+\d+\s+\|( *)(\S+)")
    total: dict[str, float] = defaultdict(float)
    stack: list[tuple[int, str]] = []                 # (depth, owner) of the enclosing imports
    for line in reversed(lines):                      # a parent is printed after its children
        m = pat.match(line)
        if not m:
            continue
        depth, pkg = len(m.group(2)), m.group(3).split(".")[0]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        owner = pkg if not stack or stack[-1][1] == "safefm" else stack[-1][1]
        total[owner] += int(m.group(1)) / 1e6
        stack.append((depth, owner))
    return sorted(total.items(), key=lambda kv: -kv[1])[:top]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=shared_data_dir() / "videos" / "liveportrait_d3.mp4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--discard", type=int, default=1, help="warm-up runs not counted (disk cache)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a run is given up")
    ap.add_argument("--imports", action="store_true", help="one more run under -X importtime")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.source.is_file():
        ap.error(f"no video at {args.source}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cpus: {os.cpu_count()}")
    cmd = cam_command(args.source, extra)
    print("command:", " ".join(cmd))
    times, cpus = [], []
    for i in range(args.discard + args.runs):
        first, cpu, lines = one_run(cmd, args.timeout)
        counted = i >= args.discard
        print(f"run {i + 1}{'' if counted else ' (not counted)'}: "
              f"{'no anonymized frame' if first is None else f'{first:.2f} s'}"
              f"{'' if cpu is None else f' (CPU {cpu:.2f} s)'}")
        for t, line in lines:
            if any(k in line for k in TIMELINE) or line.startswith("error"):
                print(f"  {t:6.2f} s  {line}")
        if counted and first is not None:
            times.append(first)
            cpus += [cpu] if cpu is not None else []
    if times:
        print(f"first anonymized frame: median {statistics.median(times):.2f} s over {len(times)} runs "
              f"({', '.join(f'{t:.2f}' for t in times)})"
              f"{f'; CPU median {statistics.median(cpus):.2f} s' if cpus else ''}; load average after: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.imports:
        _, _, lines = one_run(cam_command(args.source, extra, importtime=True), args.timeout)
        print("imports (cumulative seconds, under -X importtime, which slows them):")
        for name, s in import_summary([x for _, x in lines]):
            print(f"  {s:6.2f}  {name}")
    return 0 if len(times) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
