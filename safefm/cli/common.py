"""Helpers shared by the ``safefm-*`` commands.

- :func:`add_runtime_args` / :func:`runtime_config_from_args`: the ``--identity --steps --seed
  --device --runtime --config`` group, turned into a :class:`~safefm.config.RuntimeConfig`.
- :func:`add_logging_args` / :func:`setup_logging`: ``-v`` / ``-q``.
- :func:`int_list` / :func:`name_list`: argparse types for comma lists (``--steps 1,2,4``).
- :func:`cli_main`: parse, run, and turn errors into one ``error: <message>`` line on stderr
  plus an exit code (:data:`EXIT_ERROR`, :data:`EXIT_INTERRUPTED`); tracebacks only with ``-v``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Mapping, Sequence

from ..config import INT8_MODES, RuntimeConfig, load_runtime_config
from ..errors import SafeFMError, first_line

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

log = logging.getLogger("safefm")


def add_runtime_args(parser: argparse.ArgumentParser, identity: bool = True, identity_auto: bool = False):
    """Add the engine options group; returns the group (for extra options). ``identity_auto``:
    ``--identity`` also takes ``auto`` (one identity per face), its default."""
    g = parser.add_argument_group("engine")
    if identity and identity_auto:
        g.add_argument("--identity", metavar="auto|FILE", default="auto",
                       help="auto (default): each person gets their own synthetic identity, drawn from the "
                            "identity sampler; FILE: every face wears that identity file")
    elif identity:
        g.add_argument("--identity", metavar="FILE", default=None,
                       help="synthetic identity file (default: the shipped default identity)")
        g.add_argument("--identity-guard", type=float, default=None, metavar="D",
                       help="wear another shipped identity when the real face is within dlib distance D "
                            "of the chosen one, e.g. 0.75 (default from the runtime config: 0 = off)")
    g.add_argument("--identity-repel", type=float, default=None, metavar="R",
                   help="guide the face away from the real person's own (their dlib embedding, taken once "
                        "per face, in memory only; a second network call on each pushed step), e.g. 1; 0 = off "
                        "(default from the runtime config: 1.5)")
    g.add_argument("--steps", type=int, default=None, metavar="N",
                   help="Euler steps per frame (default from the runtime config: 2)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="noise seed of the face (default: the identity's own)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="compute device (auto, the default: a GPU when the runtime has one)")
    g.add_argument("--runtime", choices=("auto", "torch", "onnx"), default=None,
                   help="inference runtime (auto: onnxruntime when installed)")
    add_int8_args(g, "default from the runtime config: off")
    g.add_argument("--config", metavar="FILE", default=None,
                   help="runtime TOML (default: configs/runtime_default.toml)")
    return g


def add_int8_args(group, default_note: str) -> None:
    """``--int8 off|decoder|all`` and ``--no-int8`` (off), into ``args.int8``. The mode is required:
    an optional one would swallow a command's next word (``--int8 photo.jpg``)."""
    group.add_argument("--int8", choices=INT8_MODES, default=None, metavar="off|decoder|all",
                       help="onnxruntime's int8 convolutions on the CPU: 'decoder' (the image decoder only: half "
                            "its time, the face moves by well under a grey level), 'all' (the generator's too: more "
                            f"flicker, measured), 'off'; calibrated once per model on first use, cached ({default_note})")
    group.add_argument("--no-int8", dest="int8", action="store_const", const="off", help="same as --int8 off")


def runtime_config_from_args(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None,
                             **extra) -> RuntimeConfig:
    """RuntimeConfig: built-in defaults, then the command's own ``defaults``, then ``--config``,
    then the options the user gave (and ``extra``); see :func:`safefm.config.load_runtime_config`."""
    overrides = {"steps": getattr(args, "steps", None), "device": getattr(args, "device", None),
                 "runtime": getattr(args, "runtime", None), "seed": getattr(args, "seed", None),
                 "identity_guard": getattr(args, "identity_guard", None),
                 "identity_repel": getattr(args, "identity_repel", None),
                 "detail_min_px": getattr(args, "detail_min_px", None), "int8": getattr(args, "int8", None),
                 **extra}
    return load_runtime_config(getattr(args, "config", None), defaults=defaults, **overrides)


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: ``"1,2,3"`` -> ``(1, 2, 3)``; at least one integer."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one value")
    return vals


def name_list(text: str) -> tuple[str, ...]:
    """argparse type: ``"a, b,"`` -> ``("a", "b")``."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug); tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar, only warnings and errors")


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Send the ``safefm`` loggers to stderr: warnings by default, info with -v, debug with
    -vv, errors only with -q. Calling it again replaces the previous set-up."""
    levels = (logging.WARNING, logging.INFO, logging.DEBUG)
    level = logging.ERROR if quiet else levels[min(verbose, 2)]
    for h in [h for h in log.handlers if getattr(h, "_safefm_cli", False)]:
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler._safefm_cli = True
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def report_error(exc: BaseException, verbose: int = 0) -> int:
    """Print one ``error: ...`` line (traceback too when ``verbose``); return the exit code."""
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if verbose:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, (SafeFMError, OSError)):
        print(f"error: {first_line(exc)}", file=sys.stderr)
    else:
        print(f"error: internal error ({type(exc).__name__}: {first_line(exc)}); "
              "rerun with -v for the traceback", file=sys.stderr)
    return EXIT_ERROR


def cli_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, set up logging, call ``run(args)``; errors become one line + exit code."""
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    setup_logging(verbose, getattr(args, "quiet", False))
    try:
        code = run(args)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI boundary
        return report_error(exc, verbose)
    return EXIT_OK if code is None else int(code)
