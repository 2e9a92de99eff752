#!/usr/bin/env python
"""Soak run of the live path: ``safefm-cam`` on a looped clip for N minutes, with FPS,
latency and resident memory logged once a second, then summarised and plotted.

    python scripts/soak.py --minutes 30 --log docs/soak.csv --plot docs/soak.png
    python scripts/soak.py --minutes 5 -- --no-pipeline --steps 3     # extra safefm-cam flags

Runs ``safefm-cam --source CLIP --loop --no-vcam --record /dev/null --no-tray --seconds S
--stats-log LOG`` in this process, then prints the summary as JSON
(:func:`safefm.live.stats.soak_summary`: RSS at the start / end and its largest departure
after the warm-up, FPS of the first and last quarter). Exit code 0, or 1 with ``--check``
when memory moved more than ``--rss-tolerance`` or FPS fell below ``--fps-floor`` x the start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def plot(rows: list[dict], summary: dict, path: Path, title: str) -> Path:
    """PNG of FPS, latency p50/p95 and RSS over time (matplotlib, a dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
    axes[0].plot(t, [r["fps_fresh"] for r in rows], lw=0.8)
    axes[0].set_ylabel("end-to-end FPS")
    for key, label in (("latency_p50_ms", "p50"), ("latency_p95_ms", "p95")):
        axes[1].plot(t, [r[key] if r[key] is not None else float("nan") for r in rows], lw=0.8, label=label)
    axes[1].set_ylabel("capture -> sink ms")
    axes[1].legend(fontsize=7)
    axes[2].plot(t, [r["rss_mb"] if r["rss_mb"] is not None else float("nan") for r in rows], lw=0.8)
    axes[2].set_ylabel("resident memory MiB")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.axvline((summary["first_fresh_s"] + summary["warmup_s"]) / 60, color="grey", lw=0.6)
    fig.suptitle(title, fontsize=8)
    cap = (f"after {summary['warmup_s']:.0f} s warm-up (grey line): RSS {summary['rss_start_mb']:.0f} -> "
           f"{summary['rss_end_mb']:.0f} MiB (largest move {100 * summary['rss_spread']:.1f} %), FPS "
           f"{summary['fps_start']:.1f} -> {summary['fps_end']:.1f}, latency p50/p95 "
           f"{summary['latency_p50_ms'] or 0:.0f}/{summary['latency_p95_ms'] or 0:.0f} ms")
    fig.text(0.01, 0.005, cap, fontsize=6.5)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None, engine_factory=None) -> int:
    """``engine_factory``: passed to :func:`safefm.cli.cam.main` (tests: a tiny engine)."""
    from safefm.cli import cam
    from safefm.live.stats import read_stats_log, soak_summary
    from safefm.paths import shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--source", default=None, help="clip (default: ../shared/data/videos/liveportrait_d3.mp4)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds left out of the summary (default 30)")
    ap.add_argument("--log", type=Path, default=Path("soak.csv"), help="stats log (CSV; default soak.csv)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of FPS, latency and RSS over time")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("--check", action="store_true", help="exit 1 when memory or FPS drifted")
    ap.add_argument("--rss-tolerance", type=float, default=0.05, help="largest RSS move allowed (default 0.05)")
    ap.add_argument("--fps-floor", type=float, default=0.9, help="last/first quarter FPS allowed (default 0.9)")
    ap.add_argument("cam_args", nargs="*", help="extra safefm-cam options, after --")
    args = ap.parse_args(argv)

    source = args.source or str(shared_data_dir() / "videos" / "liveportrait_d3.mp4")
    cam_argv = ["--source", source, "--loop", "--no-vcam", "--record", os.devnull, "--no-tray", "-q",
                "--seconds", f"{args.minutes * 60:g}", "--stats-log", str(args.log), *args.cam_args]
    code = cam.main(cam_argv, engine_factory=engine_factory)
    if code:
        return code
    rows = read_stats_log(args.log)
    summary = soak_summary(rows, args.warmup)
    summary.update({"source": source, "minutes": args.minutes, "cam_args": args.cam_args})
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.plot:
        plot(rows, summary, args.plot, f"safefm-cam soak: {Path(source).name} looped, "
                                       f"{args.minutes:g} min {' '.join(args.cam_args)}")
    ok = summary["rss_spread"] is not None and summary["rss_spread"] <= args.rss_tolerance and \
        summary["fps_ratio"] is not None and summary["fps_ratio"] >= args.fps_floor
    if args.check and not ok:
        print(f"soak: drifted (RSS moved {summary['rss_spread']}, FPS ratio {summary['fps_ratio']})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
