"""Probe: where a live frame's latency goes, stage by stage (session 14).

Runs ``safefm-bench``'s live measurement (the real ``Pipeline``, pipelined, d3 looped as a 30 fps
camera, the camera's runtime defaults) and times every frame through each stage: waiting for the
prepare stage, prepare (landmarks, retargeting, heatmaps), waiting, generate (generator and
decoder), waiting, finish (paste), waiting for the output to send it. Medians and means in ms.

    .venv/bin/python research/probe_live_trace.py --pace on --threads 1
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pace", choices=("on", "off"), default="on")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: library default)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clip", default="liveportrait_d3")
    args = ap.parse_args()

    from safefm.config import load_runtime_config
    from safefm.engine import build_engine
    from safefm.eval import benchmark as bench
    from safefm.live import pipeline as pl
    from safefm.paths import shared_data_dir

    cfg = replace(load_runtime_config(None), steps=2, identity_repel=0.0, detail_min_px=0, match_grain=False,
                  runtime="onnx", threads=args.threads)
    eng = build_engine(cfg, video=True)
    eng.warmup()
    rec: dict[float, dict] = {}
    sent: dict[float, float] = {}
    prepare, generate, finish, send = pl.Pipeline._prepare, eng.generate, eng.finish, bench._RecordingSink.send

    def traced_prepare(self, engine, pkt):
        t0 = time.monotonic()
        w = prepare(self, engine, pkt)
        rec[pkt.t_capture] = {"p0": t0, "p1": time.monotonic()}
        if w.plan is not None:
            w.plan.t_capture = pkt.t_capture
        return w

    def traced(fn, a, b):
        def run(plan):
            t0 = time.monotonic()
            out = fn(plan)
            rec[plan.t_capture].update({a: t0, b: time.monotonic()})
            return out
        return run

    def traced_send(self, frame):
        if frame.fresh and frame.t_capture is not None:
            sent[frame.t_capture] = time.monotonic()
        send(self, frame)

    pl.Pipeline._prepare = traced_prepare
    eng.generate, eng.finish = traced(generate, "g0", "g1"), traced(finish, "f0", "f1")
    bench._RecordingSink.send = traced_send
    res = bench.bench_live(eng, shared_data_dir() / "videos" / f"{args.clip}.mp4", args.pace == "on", args.seconds, 5)
    rows = np.array([[r["p0"] - tc, r["p1"] - r["p0"], r["g0"] - r["p1"], r["g1"] - r["g0"], r["f0"] - r["g1"],
                      r["f1"] - r["f0"], sent[tc] - r["f1"], sent[tc] - tc]
                     for tc, r in rec.items() if tc in sent and "f1" in r][10:]) * 1e3
    print(f"end-to-end {res['e2e_fps']:.1f} FPS, {len(rows)} frames traced")
    names = ("wait, prepare", "prepare", "wait, generate", "generate", "wait, finish", "finish", "wait, output",
             "capture -> sink")
    for name, col in zip(names, rows.T):
        print(f"{name:16s} p50 {np.median(col):6.1f}  mean {col.mean():6.1f} ms")


if __name__ == "__main__":
    main()
