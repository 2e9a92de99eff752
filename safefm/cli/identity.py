"""``safefm-identity``: make and inspect synthetic identity files.

    safefm-identity new [--seed N] [--gender female|male] [--age child|young|adult|senior] -o id.pt
    safefm-identity show id.pt

A new identity's embedding is drawn from the identity sampler shipped with the weights (a
model of the training identities' embedding distribution, with samples too close to any real
training identity rejected); it is never computed from anyone's face. Its face shape is the
canonical template under a seeded smooth deformation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..errors import SafeFMError
from ..identity import describe, load_identity, save_identity
from ..identity_sampler import SAMPLER_NAME, new_identity, sampler_path  # noqa: F401 (shared with the engine)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="safefm-identity", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("new", help="make a new synthetic identity file")
    n.add_argument("-o", "--output", required=True, help="identity file to write (e.g. id.pt)")
    n.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    n.add_argument("--gender", choices=["female", "male"], default=None)
    n.add_argument("--age", choices=["child", "young", "adult", "senior"], default=None)
    n.add_argument("--name", default=None, help="a label stored in the file")
    n.add_argument("--overwrite", action="store_true", help="replace an existing file")
    s = sub.add_parser("show", help="print what is in an identity file")
    s.add_argument("path")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "new":
            out = Path(args.output)
            if out.exists() and not args.overwrite:
                raise SafeFMError(f"{out} exists; pass --overwrite to replace it")
            seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (2 ** 31))
            ident = new_identity(seed, args.gender, args.age, args.name)
            save_identity(ident, out)
            print(f"wrote {out}\n{describe(ident)}")
        else:
            print(describe(load_identity(args.path)))
    except SafeFMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
