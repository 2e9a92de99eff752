"""Research: does the pasted face meet the real forehead in a step where the mask cuts across it?

At frame N of each clip the product runs as shipped with the default identity (one identity for
every clip, so only the paste differs between the columns; a per-person identity is chosen by
renders that go through the paste, so a changed paste would change the face as well). The last
``composite.paste`` call's inputs are kept and pasted twice: as shipped, and with the forehead
seam (``composite._forehead_seam``) left out.

The *step* is read column by column over the middle half of the mask: CIELAB ΔE76 between the
mean colour 4-8 px inside the mask's top edge (where the frame is all generated) and 4-8 px
outside it (the real frame), on the output and on the input. Columns where the input itself
changes by more than 8 ΔE there (hair at the mask's top, not a forehead running on) are skipped;
clips with fewer than 20 such columns are left out of the mean. The input's own figure is the
forehead's natural gradient over those 8 px: an output at or under it shows no seam.
Clips are MIT-licensed (LivePortrait); nothing is written out.

    .venv/bin/python research/probe_forehead_step.py --clips d0,d3,d6,d9,d10,d11,d12,d14,d18,d19,d20 --frame 40
"""
from __future__ import annotations

import argparse

import cv2
import numpy as np

SKIN = 8.0     # ΔE the input may change across the edge and still be one forehead
NEAR, WIDE = 4, 4   # px: the bands read start this far from the edge and are this wide


def lab(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> float32 CIELAB (L 0-100, a and b signed)."""
    out = cv2.cvtColor(img, cv2.COLOR_RGB2Lab).astype(np.float32)
    out[..., 0] *= 100 / 255
    out[..., 1:] -= 128
    return out


def forehead_step(output: np.ndarray, frame: np.ndarray, mask: np.ndarray) -> tuple[float, float, int]:
    """(the input's step, the output's step, columns read) across the top edge of ``mask``
    (``(H, W) float32``, 1 where the frame is generated), mean ΔE76 over the columns where the
    input is one forehead (:data:`SKIN`); NaN and 0 when there is none."""
    out_lab, in_lab = lab(output), lab(frame)
    full = mask >= 1.0
    xs = np.nonzero(full)[1]
    steps = []
    for x in range(int(np.percentile(xs, 25)), int(np.percentile(xs, 75))):
        rows = np.flatnonzero(full[:, x])
        if rows.size == 0 or rows[0] - NEAR - WIDE < 0:
            continue
        inside, outside = slice(rows[0] + NEAR, rows[0] + NEAR + WIDE), slice(rows[0] - NEAR - WIDE, rows[0] - NEAR)
        real = float(np.linalg.norm(in_lab[inside, x].mean(0) - in_lab[outside, x].mean(0)))
        if real > SKIN:
            continue
        steps.append((real, float(np.linalg.norm(out_lab[inside, x].mean(0) - out_lab[outside, x].mean(0)))))
    if not steps:
        return float("nan"), float("nan"), 0
    real, out = np.mean(steps, axis=0)
    return float(real), float(out), len(steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", default="d0,d3,d10,d19", help="liveportrait_<name> clips, comma list")
    ap.add_argument("--frame", type=int, default=40, help="frame index read on each clip")
    args = ap.parse_args()

    from safefm import engine as E
    from safefm.config import RuntimeConfig
    from safefm.engine import build_engine
    from safefm.paths import shared_data_dir

    paste, seam = E.composite.paste, E.composite._forehead_seam
    kept: dict = {}

    def keep(frame, crop, M_inv, mask, **kw):   # the engine's last paste: its inputs, then as shipped
        kept.update(args=(frame.copy(), crop.copy(), np.array(M_inv), mask.copy()),
                    kw={k: v for k, v in kw.items() if k != "out"})
        return paste(frame, crop, M_inv, mask, **kw)

    E.composite.paste = keep
    rows = []
    for clip in args.clips.split(","):
        engine = build_engine(RuntimeConfig(), video=True)
        cap = cv2.VideoCapture(str(shared_data_dir() / "videos" / f"liveportrait_{clip}.mp4"))
        for _ in range(args.frame + 1):
            ok, bgr = cap.read()
            if not ok:
                raise SystemExit(f"liveportrait_{clip}: fewer than {args.frame + 1} frames")
            engine.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        frame, mask = kept["args"][0], kept["args"][3]
        shipped = paste(*kept["args"], **kept["kw"])
        E.composite._forehead_seam = lambda face_side, *a, **k: np.zeros_like(face_side)
        without = paste(*kept["args"], **kept["kw"])
        E.composite._forehead_seam = seam
        real, before, n = forehead_step(without, frame, mask)
        _, after, _ = forehead_step(shipped, frame, mask)
        print(f"{clip}: {n} columns, step input {real:.2f}, without the seam fix {before:.2f}, shipped {after:.2f}",
              flush=True)
        if n >= 20:
            rows.append((real, before, after))
    if rows:
        real, before, after = np.mean(rows, axis=0)
        print(f"mean over {len(rows)} clips: input {real:.2f}, without {before:.2f}, shipped {after:.2f}")


if __name__ == "__main__":
    main()
