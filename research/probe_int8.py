"""Probe: onnxruntime static int8 (QDQ) for the velocity and decoder graphs of the default model.

Calibration: the graphs' real inputs, recorded while the engine anonymizes photos of LFW
*training* people (never the evaluation people), single-image mode, repel off. Then, on other
training photos: per-call speed (1 thread) and the output images' difference (PSNR of the
pasted frame, fp32 vs int8).

    PYTHONPATH=. python research/probe_int8.py --calib 24 --test 12 --out runs/int8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


class Recorder:
    """Wraps an onnxruntime session: records the feeds of every run."""

    def __init__(self, sess, store: list):
        self._s, self.store = sess, store

    def run(self, out, feeds):
        self.store.append({k: np.array(v) for k, v in feeds.items()})
        return self._s.run(out, feeds)

    def __getattr__(self, name):
        return getattr(self._s, name)


def photos(n: int, offset: int) -> list[np.ndarray]:
    from safefm.media import read_image
    from safefm.train.data import eval_identities
    from safefm.paths import shared_data_dir

    lfw = shared_data_dir() / "lfw"
    held = eval_identities()
    people = sorted(p for p in lfw.iterdir() if p.is_dir() and p.name not in held)
    rng = np.random.default_rng(7)
    pick = rng.permutation(len(people))[offset:offset + n]
    return [read_image(sorted(people[i].glob("*.jpg"))[0]) for i in pick]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=24)
    ap.add_argument("--test", type=int, default=12)
    ap.add_argument("--out", default="runs/int8")
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--skip-decoder", action="store_true")
    ap.add_argument("--ops", default="", help="comma list of op types to quantize (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from safefm.config import load_runtime_config
    from safefm.engine import build_engine

    cfg = load_runtime_config(runtime="onnx", identity_repel=0.0, threads=1, detail_min_px=0)
    eng = build_engine(cfg, video=False)
    be = eng.gen.backend
    rec_v, rec_d = [], []
    be._velocity, be._decoder = Recorder(be._velocity, rec_v), Recorder(be._decoder, rec_d)
    for img in photos(args.calib, 0):
        eng.reset()
        eng.process(img)
    print("calibration feeds:", len(rec_v), "velocity,", len(rec_d), "decoder")
    v_path = Path(be._velocity._model_path) if hasattr(be._velocity, "_model_path") else None

    from safefm.paths import cache_dir
    folder = sorted((cache_dir() / "onnx").glob("22f3c8db18767d35-g5-*"))[-1]

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    q = {}
    for name, feeds in (("velocity", rec_v), ("decoder", rec_d)):
        if name == "decoder" and args.skip_decoder:
            continue
        src = folder / f"{name}.onnx"
        pre = out / f"{name}.pre.onnx"
        dst = out / f"{name}.int8.onnx"
        t0 = time.time()
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=args.per_channel,
                        op_types_to_quantize=[o for o in args.ops.split(",") if o] or None,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        print(name, "quantized in", round(time.time() - t0, 1), "s")
        q[name] = (src, dst, feeds)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    report = {}
    for name, (src, dst, feeds) in q.items():
        s32 = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        s8 = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"])
        sample = feeds[: min(len(feeds), 40)]
        for s in (s32, s8):
            s.run(None, sample[0])
        tt = {}
        for tag, s in (("fp32", s32), ("int8", s8)):
            t0 = time.perf_counter()
            for f in sample:
                s.run(None, f)
            tt[tag] = 1000 * (time.perf_counter() - t0) / len(sample)
        errs = [float(np.abs(s32.run(None, f)[0] - s8.run(None, f)[0]).mean()) for f in sample[:10]]
        scale = [float(np.abs(s32.run(None, f)[0]).mean()) for f in sample[:10]]
        report[name] = {"ms_fp32": tt["fp32"], "ms_int8": tt["int8"], "mean_abs_err": float(np.mean(errs)),
                        "mean_abs_out": float(np.mean(scale))}
        print(name, report[name])

    # whole-frame comparison on other training photos: swap the sessions in the engine
    def frames(sess_v, sess_d):
        be._velocity = sess_v
        if sess_d is not None:
            be._decoder = sess_d
        res = []
        for img in photos(args.test, args.calib):
            eng.reset()
            res.append(eng.process(img).image)
        return res

    s32v = ort.InferenceSession(str(q["velocity"][0]), opts, providers=["CPUExecutionProvider"])
    s8v = ort.InferenceSession(str(q["velocity"][1]), opts, providers=["CPUExecutionProvider"])
    s32d = ort.InferenceSession(str(folder / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    s8d = (ort.InferenceSession(str(q["decoder"][1]), opts, providers=["CPUExecutionProvider"])
           if "decoder" in q else s32d)
    a = frames(s32v, s32d)
    b = frames(s8v, s32d)
    c = frames(s8v, s8d)

    def psnr(x, y):
        mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
        return 10 * np.log10(255 ** 2 / max(mse, 1e-9))

    report["psnr_frame_int8_velocity"] = float(np.mean([psnr(x, y) for x, y in zip(a, b)]))
    report["psnr_frame_int8_both"] = float(np.mean([psnr(x, y) for x, y in zip(a, c)]))
    print(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    import cv2
    strip = np.concatenate([np.concatenate([x, y, z], axis=1) for x, y, z in zip(a[:4], b[:4], c[:4])], axis=0)
    cv2.imwrite(str(out / "strip.jpg"), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
