"""Probe: frame-to-frame flicker (safefm.eval.metrics.flicker) of float vs int8 graphs on one clip.

    PYTHONPATH=. python research/probe_int8_flicker.py liveportrait_d19 120

Needs the int8 graphs cached (run anything with --int8 all once; since session 15 they are
*.int8v2.onnx: ReLUs folded, the decoder's latent and pixel convolutions float). Session 10: d19, 120 frames:
float 2.75, decoder-only int8 3.39, velocity-only int8 4.93 (docs/results.md).
"""
import sys, numpy as np
from safefm.config import load_runtime_config
from safefm.engine import build_engine
from safefm.media import VideoReader
from safefm.eval.metrics import flicker
from safefm.face.landmarks import face_box
clip = sys.argv[1]; N = int(sys.argv[2])
frames=[]
with VideoReader(f"/work/shared/data/videos/{clip}.mp4") as r:
    for i,(f,t) in enumerate(r):
        if i>=N: break
        frames.append((f,t))
def run(int8, names=None):
    import safefm.generator as G
    eng = build_engine(load_runtime_config(runtime="onnx", int8=False), video=True)
    if int8:
        be = eng.gen.backend
        import onnxruntime as ort
        for n in names:
            s = ort.InferenceSession(str(be._folder / f"{n}.int8v2.onnx"), be._opts, providers=be._providers)
            setattr(be, "_" + n, s)
    outs=[]; boxes=[]
    for f,t in frames:
        r = eng.process(f, timestamp=t); outs.append(r.image)
        b = r.faces[0].box if r.faces else (0,0,f.shape[1],f.shape[0]); boxes.append(b)
    eng.close()
    return outs, boxes
ins=[f for f,_ in frames]
base, boxes = run(False)
print("fp32", round(flicker(ins, base, boxes),3), flush=True)
for names in (["decoder"], ["velocity"]):
    o,_ = run(True, names)
    print(names, round(flicker(ins, o, boxes),3), "mean abs vs fp32", round(float(np.mean([np.abs(a.astype(float)-b.astype(float)).mean() for a,b in zip(o,base)])),3), flush=True)
