"""``safefm-bench``: FPS, latency and per-stage time of the live path, per runtime and steps.

    safefm-bench                                   # steps 1..5, every runtime present
    safefm-bench --steps 4 --runtimes onnx-cpu --pacing on --json bench.json

Prints a table on stderr and the JSON result on stdout (``--json FILE`` also writes it).
Warm-up frames are run first and excluded from every number (see ``--warmup``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_logging_args, cli_main, int_list, name_list


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safefm-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--source", type=Path, default=None,
                    help="video file fed as a camera (default: shared videos/liveportrait_d3.mp4)")
    ap.add_argument("--model", type=Path, default=None, help="weights file, or a shipped model by name: default, large")
    ap.add_argument("--identity", type=Path, default=None, help="identity file (default: the shipped one)")
    ap.add_argument("--steps", type=int_list, default=(1, 2, 3, 4, 5), help="comma list (default 1,2,3,4,5)")
    ap.add_argument("--runtimes", type=name_list, default=None,
                    help="comma list of torch-cpu, onnx-cpu (int8 as the path's runtime defaults: the camera's "
                         "decoder int8), onnx-cpu-float (no int8), onnx-cpu-int8 (int8 all), torch-cuda, onnx-cuda, "
                         "onnx-tensorrt (default: every one present)")
    ap.add_argument("--pacing", type=name_list, default=("on", "off"), help="on,off (default both)")
    ap.add_argument("--frames", type=int, default=30, help="frames timed per configuration (default 30)")
    ap.add_argument("--warmup", type=int, default=8, help="engine warm-up frames, not timed (default 8)")
    ap.add_argument("--live-seconds", type=float, default=6.0, help="length of each live run (default 6)")
    ap.add_argument("--live-warmup", type=int, default=5,
                    help="fresh frames not counted at the start of each live run (default 5)")
    ap.add_argument("--solver", default=None,
                    help="solver (euler, heun, midpoint for a flow model; ddim, dpmpp, ddpm for the diffusion twin)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: library default)")
    ap.add_argument("--path", choices=("live", "files"), default="live",
                    help="runtime defaults timed: live = safefm-cam's (no identity repel, no detail stage; "
                         "default), files = safefm-anonymize's")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="live runs process each frame's stages one after another (default: overlapped, "
                         "as safefm-cam runs)")
    ap.add_argument("--tiny-model", action="store_true", help="time the seeded tiny random model")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="also write a PNG of FPS vs steps here")
    add_logging_args(ap)
    return ap


def main(argv: list[str] | None = None, engine_factory=None) -> int:
    """Entry point; ``engine_factory`` (RuntimeConfig) -> engine is for tests."""
    def run(args):
        from ..eval.benchmark import BenchOptions, format_table, plot_fps
        from ..eval.benchmark import run as run_bench
        from ..errors import ConfigError

        bad = [p for p in args.pacing if p not in ("on", "off")]
        if bad:
            raise ConfigError(f"--pacing takes on and/or off, got {', '.join(bad)}")
        if args.frames < 1 or args.warmup < 0 or args.live_seconds <= 0:
            raise ConfigError("--frames must be >= 1, --warmup >= 0, --live-seconds > 0")
        log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
        opts = BenchOptions(source=args.source, steps=args.steps, runtimes=args.runtimes,
                            pacing=args.pacing, frames=args.frames, warmup=args.warmup,
                            live_seconds=args.live_seconds, live_warmup=args.live_warmup,
                            model=args.model, identity=args.identity, threads=args.threads, path=args.path,
                            pipelined=not args.no_pipeline, solver=args.solver,
                            model_label="tiny random model (safefm.tiny)" if args.tiny_model else None,
                            log=log)
        factory = engine_factory
        if factory is None and args.tiny_model:
            from ..tiny import tiny_engine

            factory = lambda cfg: tiny_engine(cfg, seed=0, video=True)  # noqa: E731
        result = run_bench(opts, factory)
        if result["runtimes_missing"]:
            print(f"note: runtime(s) not present here: {', '.join(result['runtimes_missing'])}",
                  file=sys.stderr)
        print(format_table(result), file=sys.stderr)
        text = json.dumps(result, indent=1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text)
        if args.plot:
            plot_fps(result, args.plot)
        print(text)
        return 0

    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
