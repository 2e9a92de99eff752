"""Shared by the int8 decoder probes: a clip's first frames, and the engine's output on them.

Not a probe itself (``research/README.md``)."""
from __future__ import annotations


def read_clip(name: str, frames: int) -> list:
    """[(frame (H, W, 3) uint8 RGB, time s)] of the shared clip ``name``'s first ``frames``."""
    from safefm.media import VideoReader
    from safefm.paths import shared_data_dir

    out = []
    with VideoReader(shared_data_dir() / "videos" / f"{name}.mp4") as r:
        for i, ft in enumerate(r):
            if i >= frames:
                break
            out.append(ft)
    return out


def run_clip(cfg, frames: list, decoder=None) -> tuple[list, list]:
    """(output frames, face boxes (None: no face, flicker skips the pair)) of a fresh video engine
    built from ``cfg`` on ``frames`` (:func:`read_clip`); ``decoder``: an onnxruntime session run
    instead of the engine's own decoder graph."""
    from safefm.engine import build_engine

    e = build_engine(cfg, video=True)
    if decoder is not None:
        e.gen.backend._decoder = decoder
    outs, boxes = [], []
    for f, t in frames:
        res = e.process(f, timestamp=t)
        outs.append(res.image)
        boxes.append(res.faces[0].box if res.faces else None)
    e.close()
    return outs, boxes
