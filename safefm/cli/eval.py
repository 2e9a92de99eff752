"""``safefm-eval``: privacy, fidelity, realism and stability of SAFE-FM next to the baselines.

    safefm-eval --quick --out runs/eval-quick            # CI subset, < 2 min on a 2-core CPU
    safefm-eval --out runs/eval                          # everything (see docs/results.md for the time)
    safefm-eval --steps 1,2,3,4,5 --methods safefm,none  # one SAFE-FM row per step count
    safefm-eval --attacker --parts privacy               # + a trained attacker and clip linkage

Writes ``report.json``, ``report.md`` and PNG plots (numbers only, no faces) to ``--out``.
Data: ``$SAFEFM_SHARED_DATA`` (``lfw/EVAL_IDENTITIES.txt`` people, ``videos/*.mp4``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..config import RuntimeConfig
from .common import add_logging_args, cli_main, int_list, name_list


def build_parser() -> argparse.ArgumentParser:
    from ..eval.options import METHODS, PARTS, QUICK

    ap = argparse.ArgumentParser(prog="safefm-eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, default=Path("runs/eval"), help="output folder (default runs/eval)")
    ap.add_argument("--model", type=Path, default=None,
                    help="weights file, or a shipped model by name: default, large")
    ap.add_argument("--identity", type=Path, default=None, help="identity file (default: the shipped one)")
    ap.add_argument("--steps", type=int_list, default=(RuntimeConfig().steps,),
                    help=f"Euler steps; a comma list runs each (default {RuntimeConfig().steps}: the runtime default)")
    ap.add_argument("--seed", type=int, default=None,
                    help="identity noise seed (default: the identity file's)")
    ap.add_argument("--runtime", choices=("auto", "torch", "onnx"), default="auto")
    ap.add_argument("--config", type=Path, default=None,
                    help="runtime TOML (warm start, compositing, ...; default configs/runtime_default.toml)")
    ap.add_argument("--methods", type=name_list, default=METHODS,
                    help=f"comma list of {','.join(METHODS)} (default all)")
    ap.add_argument("--parts", type=name_list, default=PARTS, help="privacy,video (default both)")
    ap.add_argument("--max-people", type=int, default=None, help="LFW eval people (default all 400)")
    ap.add_argument("--max-clips", type=int, default=None, help="video clips (default all)")
    ap.add_argument("--max-frames", type=int, default=None, help="frames per clip (default all)")
    ap.add_argument("--embed-stride", type=int, default=None,
                    help="dlib-embed every n-th video frame for identity/leak metrics (default 3)")
    ap.add_argument("--attacker", action="store_true",
                    help="also a trained attacker (a re-identification head trained on anonymized photos of "
                         "other people) and clip linkage, next to the plain recogniser (adds minutes)")
    ap.add_argument("--attacker-photos", type=int, default=None,
                    help="training photos the attacker's head sees per method (default 800)")
    ap.add_argument("--quick", action="store_true",
                    help="CI subset: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    ap.add_argument("--resume", action="store_true",
                    help="reuse the finished parts saved in OUT/partial/ by an interrupted run "
                         "with the same settings")
    ap.add_argument("--replot", action="store_true",
                    help="only re-render report.md and the plots from OUT/report.json")
    ap.add_argument("--tiny-model", action="store_true",
                    help="SAFE-FM = the seeded tiny random model (pipeline check without weights)")
    add_logging_args(ap)
    return ap


def options_from_args(args: argparse.Namespace, argv=None):
    from ..eval.options import QUICK, EvalOptions

    sizes = {k: getattr(args, k) for k in QUICK}
    if args.quick:
        sizes = {k: QUICK[k] if v is None else v for k, v in sizes.items()}
    if sizes["embed_stride"] is None:
        sizes["embed_stride"] = 3
    cmd = "safefm-eval " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return EvalOptions(out=args.out, methods=args.methods, steps=args.steps, seed=args.seed,
                       model=args.model, identity=args.identity, runtime=args.runtime,
                       runtime_config=args.config,
                       parts=args.parts, quick=args.quick, resume=args.resume, command=cmd,
                       attacker=args.attacker,
                       model_label="tiny random model (safefm.tiny)" if args.tiny_model else None,
                       **sizes)


def main(argv: list[str] | None = None, engine_factory=None) -> int:
    """Entry point; ``engine_factory`` (method, steps, video) -> engine is for tests."""
    def run(args):
        from ..errors import ConfigError
        from ..eval.report import rewrite_report
        from ..eval.run import run as run_eval
        from ..eval.run import tiny_engine_factory

        if args.replot:
            written = rewrite_report(args.out)
            print(f"rewrote {args.out / 'report.md'} and {len(written)} plots", file=sys.stderr)
            return 0
        try:
            opts = options_from_args(args, argv)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        factory = engine_factory or (tiny_engine_factory(opts) if args.tiny_model else None)
        report = run_eval(opts, factory)
        secs = report["meta"]["seconds"]
        print(f"wrote {opts.out / 'report.json'}, report.md and {len(report['meta'].get('plots', []))} "
              f"plots in {secs['total_with_report']:.0f} s", file=sys.stderr)
        return 0

    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
