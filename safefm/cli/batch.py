"""``safefm-batch``: anonymize every video of a folder or a manifest on a Ray cluster.

    safefm-batch INPUT -o OUTPUT [--workers N] [--address ADDR] [--cpus-per-worker C]
                 [--gpus-per-worker G] [--max-attempts N] [--ledger FILE] [--root DIR]
                 [--overwrite] [--model FILE] [--identity auto|FILE] [engine options]
    safefm-batch status LEDGER [--events]

INPUT is a folder (every video under it) or a .csv/.jsonl manifest (column ``path``, optional
``identity`` and ``output``); OUTPUT is a folder that mirrors the input tree. One task per video
on long-lived workers that load the model once. Ray starts locally unless --address names a
cluster. A ledger (default OUTPUT.ledger.sqlite, beside the output folder) records every input's
state, attempts, output checksum and figures: a rerun skips what is done and retries what
failed, up to --max-attempts. Outputs are renamed into place only when complete.
Docs: docs/batch.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..batch.ledger import Ledger, default_ledger_path, format_status
from ..batch.manifest import plan_job
from ..errors import ConfigError, IdentityFileError, WeightsError
from ..paths import resolve_model_path
from .common import EXIT_ERROR, EXIT_OK, add_logging_args, add_runtime_args, cli_main, \
    runtime_config_from_args


def _engine_spec(args, gpus: float, cpus: float):
    """The workers' engine: the same options and identity rule as ``safefm-anonymize``."""
    from ..batch.worker import EngineSpec
    from ..identity_assign import parse_match

    auto = args.identity in (None, "auto")
    if args.match is not None and not auto:
        raise ConfigError("--match applies to --identity auto (one identity per person), not to an identity file")
    if not auto and not Path(args.identity).is_file():
        raise IdentityFileError(f"identity file not found: {args.identity}")
    model = resolve_model_path(args.model) if args.model else None
    if model is not None and not model.is_file():
        raise WeightsError(f"model file not found: {model}")
    device = args.device or ("cuda" if gpus > 0 else None)
    cfg = runtime_config_from_args(args, identity_per_track=auto, device=device,
                                   threads=max(1, int(cpus)),
                                   identity_match=None if args.match is None else parse_match(args.match))
    return EngineSpec(cfg, str(model) if model else None, "auto" if auto else str(Path(args.identity).resolve()))


def run(args: argparse.Namespace, engine_factory=None) -> int:
    from ..batch.runner import BatchJob, BatchSettings, check_overwrite, import_ray

    settings = BatchSettings(args.workers, args.cpus_per_worker, args.gpus_per_worker, args.address,
                             args.max_attempts, progress=not args.quiet, verbose=args.verbose)
    import_ray()   # one line and no work when Ray is missing
    plan = plan_job(args.input, args.output, args.root)
    spec = _engine_spec(args, settings.gpus_per_worker, settings.cpus_per_worker)
    with Ledger(args.ledger or default_ledger_path(plan.output), lock=True) as ledger:
        check_overwrite(plan, ledger, args.overwrite)
        ledger.set_meta(input=plan.input, output=plan.output)
        ledger.add(plan.items)
        job = BatchJob(plan, ledger, spec, settings, engine_factory)
        try:
            outcome = job.run()
        finally:
            job.close()
    print("\n".join(outcome.lines()))
    return EXIT_OK if outcome.ok else EXIT_ERROR


def status(args: argparse.Namespace) -> int:
    with Ledger(args.ledger, create=False) as ledger:
        print("\n".join(format_status(ledger, events=args.events)))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="safefm-batch", description="Anonymize every video of a folder or a manifest on a Ray cluster.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("input", help="folder of videos, or a .csv/.jsonl manifest")
    ap.add_argument("-o", "--output", required=True, help="output folder (mirrors the input tree)")
    ap.add_argument("--ledger", metavar="FILE", default=None,
                    help="ledger file (default: OUTPUT.ledger.sqlite beside the output folder)")
    ap.add_argument("--root", metavar="DIR", default=None,
                    help="manifest: the folder whose tree the output mirrors (default: the manifest's)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace existing output files the ledger does not know")
    ap.add_argument("--max-attempts", type=int, default=3, metavar="N",
                    help="attempts per input over all runs (default 3); a rerun retries failed inputs")
    r = ap.add_argument_group("ray")
    r.add_argument("--address", default=None,
                   help="existing Ray cluster (auto, HOST:6379, ray://HOST:10001); default: a local instance")
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="workers, each with its own engine (default: CPUs / --cpus-per-worker, or the cluster's)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                   help="CPUs reserved per worker, also its torch threads (default 1)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="GPUs per worker, e.g. 1 or 0.25 (default 0); > 0 runs the engine on CUDA")
    ap.add_argument("--model", metavar="FILE", default=None, help="weights file, or a shipped model by name: default, large (default: the default model)")
    g = add_runtime_args(ap, identity_auto=True)
    g.add_argument("--match", metavar="LIST", default=None,
                   help="with --identity auto: gender,age (default), gender, age or none")
    add_logging_args(ap)
    return ap


def build_status_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safefm-batch status", description="Print a safefm-batch ledger.")
    ap.add_argument("ledger", help="ledger file (OUTPUT.ledger.sqlite)")
    ap.add_argument("--events", action="store_true", help="also every attempt and transition")
    add_logging_args(ap)
    return ap


def main(argv: Sequence[str] | None = None, engine_factory=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return cli_main(build_status_parser(), status, argv[1:])
    return cli_main(build_parser(), lambda args: run(args, engine_factory), argv)


if __name__ == "__main__":
    sys.exit(main())
