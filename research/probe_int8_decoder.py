"""Probe: which decoder convolutions can be int8 without adding flicker? (session 14)

Quantizes the decoder graph (static QDQ, as ``safefm.quantize`` does) in variants that keep the
first and/or last convolutions in float, times each (one thread) and runs one clip through the
engine with each: ``flicker`` (``safefm.eval.metrics``) against the float decoder's, and the mean
absolute difference of the output frames. Calibration: ``safefm.quantize.calibration_feeds``
(the shipped identities' own faces, no data).

    .venv/bin/python research/probe_int8_decoder.py --path camera --calibration Percentile
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from clip_runs import read_clip, run_clip

VARIANTS = {"every": 0, "all_but_last": 1, "first_and_last_float": 2, "first_two_and_last_float": 3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", default="liveportrait_d19")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--path", choices=("camera", "files"), default="camera",
                    help="camera: no repel, no detail stage, no grain; files: the built-in defaults")
    ap.add_argument("--calibration", choices=("MinMax", "Percentile", "Entropy"), default="MinMax")
    ap.add_argument("--seeds", type=int, default=3, help="calibration draws per shipped identity")
    ap.add_argument("--out", default="runs/probe_int8_decoder")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import safefm.quantize as Q
    from safefm.config import load_runtime_config
    from safefm.engine import build_engine
    from safefm.eval.metrics import flicker
    from safefm.identity import load_identity
    from safefm.paths import identities_dir

    eng = build_engine(load_runtime_config(runtime="onnx", threads=1), video=True)
    gen = eng.gen
    folder = gen.backend._folder
    Q.SEEDS_PER_IDENTITY = args.seeds
    shipped = [load_identity(p, gen.model_cfg.identity_dim) for p in sorted(identities_dir().glob("*.pt"))]
    feeds = Q.calibration_feeds(gen, shipped)["decoder"]
    convs = [n.name for n in onnx.load(str(folder / "decoder.onnx")).graph.node if n.op_type == "Conv"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = out / "decoder.pre.onnx"
    quant_pre_process(str(folder / "decoder.onnx"), str(pre), skip_symbolic_shape=True)
    kept = {n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"}
    assert {convs[0], convs[1], convs[-1]} <= kept, "pre-processing renamed the convolutions"

    def excluded(kind: int) -> list[str]:
        return {0: [], 1: convs[-1:], 2: [convs[0], convs[-1]], 3: [convs[0], convs[1], convs[-1]]}[kind]

    sessions = {}
    for name, kind in VARIANTS.items():
        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(feeds)

            def get_next(self):
                return next(self._it, None)
        dst = out / f"decoder.{name}.onnx"
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["Conv"], nodes_to_exclude=excluded(kind),
                        calibrate_method=getattr(CalibrationMethod, args.calibration),
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        sessions[name] = ort.InferenceSession(str(dst), gen.backend._opts, providers=["CPUExecutionProvider"])

    def ms(sess) -> float:
        for _ in range(5):
            sess.run(None, feeds[0])
        t = time.perf_counter()
        for _ in range(40):
            sess.run(None, feeds[0])
        return (time.perf_counter() - t) / 40 * 1e3

    times = {"float": ms(gen.backend._decoder), **{n: ms(s) for n, s in sessions.items()}}
    eng.close()

    frames = read_clip(args.clip, args.frames)
    cfg = load_runtime_config(runtime="onnx")
    if args.path == "camera":
        cfg = replace(cfg, identity_repel=0.0, detail_min_px=0, match_grain=False)

    def run(sess=None):
        return run_clip(cfg, frames, sess)

    inputs = [f for f, _ in frames]
    base, boxes = run()
    print(f"| decoder | ms (1 thread) | flicker ({args.path} path, {args.clip}, {len(frames)} frames) | "
          "mean abs difference to float |")
    print("|---|---|---|---|")
    print(f"| float | {times['float']:.1f} | {flicker(inputs, base, boxes):.3f} | 0 |")
    for name, sess in sessions.items():
        o, _ = run(sess)
        diff = float(np.mean([np.abs(a.astype(float) - b.astype(float)).mean() for a, b in zip(o, base)]))
        print(f"| int8 {name} ({args.calibration}, {len(feeds)} inputs) | {times[name]:.1f} | "
              f"{flicker(inputs, o, boxes):.3f} | {diff:.3f} |", flush=True)


if __name__ == "__main__":
    main()
