"""Research: the decoder's onnxruntime int8 error and pair-change error (what flicker is made of),
for the shipped decoder weights or a fine-tuned set (``research/qat_decoder.py``).

    .venv/bin/python research/qat_decoder_check.py [--weights runs/qat/decoder_qat.safetensors]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from clip_runs import read_clip, run_clip  # noqa: E402
from qat_decoder import make_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--jitter", type=float, default=0.5)
    ap.add_argument("--keep", default=None, help="folder to keep the float / int8 decoder graphs in")
    ap.add_argument("--ops", default="Conv", help="op types quantized (comma-separated)")
    ap.add_argument("--float-last", type=int, default=1, help="last convolutions (graph order) left float")
    ap.add_argument("--calib", default="shipped", help="shipped: safefm.quantize's feeds; N: N training-landmark inputs")
    ap.add_argument("--method", default="MinMax")
    ap.add_argument("--only", default=None, help="quantize only the convolutions whose names contain one of these (comma list)")
    ap.add_argument("--no-flicker", action="store_true")
    ap.add_argument("--clips", default="liveportrait_d19,liveportrait_d3")
    ap.add_argument("--frames", type=int, default=120)
    args = ap.parse_args()
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import safefm.quantize as Q
    from safefm.checkpoint import load_model
    from safefm.config import load_runtime_config
    from safefm.engine import build_engine
    from safefm.generator import _Decoder, _export
    from safefm.identity import load_identity
    from safefm.paths import identities_dir

    eng = build_engine(load_runtime_config(runtime="onnx"), video=True)
    gen = eng.gen
    shipped = [load_identity(p, gen.model_cfg.identity_dim) for p in sorted(identities_dir().glob("*.pt"))]
    feeds = Q.calibration_feeds(gen, shipped)["decoder"]
    Z, H, Z2, H2 = make_inputs(gen, args.pairs, args.seed, args.jitter)
    if args.calib != "shipped":
        cz, ch, _, _ = make_inputs(gen, int(args.calib), args.seed + 100, args.jitter)
        feeds = [{"z": cz[i:i + 1].numpy(), "heat": ch[i:i + 1].numpy()} for i in range(len(cz))]
    teacher, _ = load_model("weights/safefm_default.safetensors")
    model, _ = load_model("weights/safefm_default.safetensors")
    if args.weights:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.weights), strict=False)
    folder = Path(args.keep or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    fp = folder / "decoder.onnx"
    _export(_Decoder(model).cpu(), (Z[:1], H[:1]), fp, ["z", "heat"], ["image"])
    convs = [n.name for n in onnx.load(str(fp)).graph.node if n.op_type == "Conv"]
    pre, q8 = folder / "decoder.pre.onnx", folder / "decoder.int8.onnx"
    quant_pre_process(str(fp), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)
    quantize_static(str(pre), str(q8), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=args.ops.split(","), nodes_to_exclude=[convs[0]] + convs[len(convs) - args.float_last:] + (
                        [c for c in convs if not any(k in c for k in args.only.split(","))] if args.only else []),
                    calibrate_method=getattr(CalibrationMethod, args.method),
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sf = ort.InferenceSession(str(fp), so, providers=["CPUExecutionProvider"])
    s8 = ort.InferenceSession(str(q8), so, providers=["CPUExecutionProvider"])
    run = lambda s, z, h: np.concatenate([s.run(None, {"z": z[i:i+1].numpy(), "heat": h[i:i+1].numpy()})[0] for i in range(len(z))])
    with torch.no_grad():
        T, T2 = teacher.decode(Z, H).numpy(), teacher.decode(Z2, H2).numpy()
    for name, s in (("float", sf), ("int8", s8)):
        y, y2 = run(s, Z, H), run(s, Z2, H2)
        print(f"{name:6s} err {np.abs(y - T).mean():.4f}  delta err {np.abs((y2 - y) - (T2 - T)).mean():.4f}"
              f"  (teacher delta {np.abs(T2 - T).mean():.4f})", flush=True)
    import time
    z1, h1 = {"z": Z[:1].numpy(), "heat": H[:1].numpy()}, None
    for name, s in (("float", sf), ("int8", s8)):
        for _ in range(5):
            s.run(None, z1 | {"heat": H[:1].numpy()})
        t = time.perf_counter()
        for _ in range(30):
            s.run(None, z1 | {"heat": H[:1].numpy()})
        print(f"{name} {1000 * (time.perf_counter() - t) / 30:.2f} ms (1 thread)")
    eng.close()
    if not args.no_flicker:
        flicker_table(args, {"float": None, "int8": s8})


def flicker_table(args, sessions: dict) -> None:
    """Camera path (no repel, no detail stage, no grain), each clip's first frames: the output's
    flicker (``safefm.eval.metrics.flicker``) with each decoder session (None: the engine's own)."""
    from dataclasses import replace

    from safefm.config import load_runtime_config
    from safefm.eval.metrics import flicker

    cfg = replace(load_runtime_config(runtime="onnx"), identity_repel=0.0, detail_min_px=0, match_grain=False)
    for clip in args.clips.split(","):
        frames = read_clip(clip, args.frames)
        base = None
        for name, sess in sessions.items():
            outs, boxes = run_clip(cfg, frames, sess)
            if base is None:
                base = outs
            diff = float(np.mean([np.abs(a.astype(float) - b.astype(float)).mean() for a, b in zip(outs, base)]))
            print(f"{clip} {name:6s} flicker {flicker([f for f, _ in frames], outs, boxes):.3f}  "
                  f"mean abs to first {diff:.3f}", flush=True)


if __name__ == "__main__":
    main()
