"""``safefm-audit``: check an anonymized photo, folder or video against its original.

    safefm-audit ORIGINAL ANONYMIZED [--json FILE] [--stride N] [--threshold D]
                 [--pixel-threshold P] [--upsample N]

Per frame and per tracked face: whether a face is present in the output where the original had
one, the recogniser (dlib) distance to the original person (the mean embedding of their track)
and to the same frame's original face, the frames under the match threshold with timestamps,
the frames where the original face was left uncovered (the output's inner face is the
original's pixels), and held / placeholder counts (holds are known only to
``safefm-anonymize --audit``, which runs this audit on its own output).

Prints a short summary and writes the full report as JSON (default: ANONYMIZED.audit.json).
Exit status: 0 when no frame matches the original person and none is uncovered, 3 when some
do, 1 on an error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import EXIT_OK, add_logging_args, cli_main


def add_audit_args(ap: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--stride --threshold --pixel-threshold --upsample`` (shared with ``safefm-anonymize --audit``)."""
    from ..audit import AuditConfig

    d = AuditConfig()
    g = ap.add_argument_group("audit")
    g.add_argument("--stride", type=int, default=d.stride, metavar="N",
                   help=f"run the recogniser on every N-th video frame (default {d.stride}; pixels: every frame)")
    g.add_argument("--threshold", type=float, default=d.threshold, metavar="D",
                   help=f"dlib distance under which a face is the original person (default {d.threshold})")
    g.add_argument("--pixel-threshold", type=float, default=d.pixel_threshold, metavar="P",
                   help="mean absolute difference (0-255) of the inner face under which the output "
                        f"is the original's pixels: uncovered (default {d.pixel_threshold})")
    g.add_argument("--upsample", type=int, default=None, metavar="N",
                   help="dlib detector upsampling, 0-3 (default 1 for photos, 0 for video; 1 finds "
                        "faces down to ~40 px, 0 down to ~80 px)")
    return g


def audit_config_from_args(args: argparse.Namespace):
    from ..audit import AuditConfig

    return AuditConfig(threshold=args.threshold, pixel_threshold=args.pixel_threshold,
                       stride=args.stride, upsample=args.upsample)


def finish(rep: dict, json_path: Path) -> int:
    """Write the JSON report, print the summary; the exit status of the verdict."""
    from ..audit import EXIT_FOUND, write_report

    write_report(rep, json_path)
    print("\n".join(rep["summary"]))
    print(f"  report: {json_path}")
    return EXIT_OK if rep["passed"] else EXIT_FOUND


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="safefm-audit", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("original", type=Path, help="original photo, folder or video")
    ap.add_argument("anonymized", type=Path, help="its anonymized photo, folder or video")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="where to write the JSON report (default: ANONYMIZED.audit.json)")
    add_audit_args(ap)
    add_logging_args(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    def run(args):
        from ..audit import audit_paths, report_path

        cfg = audit_config_from_args(args)
        rep = audit_paths(args.original, args.anonymized, cfg)
        return finish(rep, args.json or report_path(args.anonymized))

    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
