"""Static int8 for the onnxruntime graphs (``RuntimeConfig.int8``: ``decoder`` or ``all``).

The convolutions of the decoder graph (``all``: and of the velocity graph) are quantized (QDQ:
int8 weights per channel, uint8 activations with ranges calibrated once per model); a ReLU
right after a convolution is folded into that convolution's output quantization (its range
starts at 0: twice the resolution of the pre-ReLU range, and no ReLU to run); the decoder's
convolutions next to its latent input and its pixel output stay float (:func:`edge_convs`). Everything else (attention,
normalisation, other activations, residual sums) stays float32. Calibration needs no data: the model draws the
shipped identities' own faces (their rest shapes, lightly jittered, from their own noise)
through the Euler sampler, and the inputs the graphs see on the way are the calibration set
(:func:`calibration_feeds`). The quantized graphs are cached beside the float ones
(``decoder.int8v2.onnx`` ...), written atomically, so this runs once per model and machine.

Measured (research/probe_int8.py, default model, 1 thread): convolutions only, per channel:
decoder 12.1 -> 5.4 ms, velocity 3.7 -> 3.0 ms a call, output difference ~3-4 % of the
signal; quantizing every op as well (attention MatMuls) changed faces visibly (16 %): not done.
The detail stage stays float: its quantized residual left a visible dot pattern on the skin.
Session 15 (research/qat_decoder_check.py): with the ReLUs folded and the decoder's first and
last convolutions float, the decoder's error falls from 0.0050 to 0.0036 (images in [-1, 1]),
its error on the change between two nearby inputs (what flicker is made of) from 0.0063 to
0.0041, and it runs in 4.1 ms instead of 4.9 (float: 10.3 ms).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

GRAPHS = ("velocity", "decoder", "detail")
OPS = ("Conv", "Relu")     # op types quantized (a Relu after a quantized Conv folds into its output)
FLOAT_EDGES = {"decoder": ("z", "image")}   # per graph: the Convs nearest these inputs / outputs stay float
TAG = "int8v2"             # cache name of this scheme's graphs (session 10's Conv-only ones were .int8)
JITTER = 0.004             # std of the rest shapes' jitter (unit crop coordinates)
SEEDS_PER_IDENTITY = 3


class _Recorder:
    """Wraps an onnxruntime session; keeps a copy of the feeds of every run."""

    def __init__(self, sess, store: list):
        self._sess, self._store = sess, store

    def run(self, outputs, feeds):
        self._store.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self._sess.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self._sess, name)


def calibration_feeds(gen, identities) -> dict[str, list[dict]]:
    """The graphs' inputs while ``gen`` (a :class:`~safefm.generator.Generator` on the onnx
    runtime) draws ``identities`` (list of :class:`~safefm.identity.Identity`): for each, its rest
    shape and ``SEEDS_PER_IDENTITY - 1`` jittered copies, cold start, ``gen.cfg.steps`` steps,
    decoded, and refined when the model has a detail stage. Returns ``{graph: [feeds, ...]}``."""
    from .face import heatmaps
    from .face.context import face_context
    from .identity import Identity

    be = gen.backend
    store = {name: [] for name in GRAPHS}
    saved = be._velocity, be._decoder, be._detail
    be._velocity = _Recorder(be._velocity, store["velocity"])
    be._decoder = _Recorder(be._decoder, store["decoder"])
    if be._detail is not None:
        be._detail = _Recorder(be._detail, store["detail"])
    S, mc = gen.model_cfg.image_size, gen.model_cfg
    rng = np.random.default_rng(0)
    try:
        for ident in identities:
            tokens = gen.identity_tokens(ident.embedding)
            for k in range(SEEDS_PER_IDENTITY):
                shape = ident.shape + (rng.normal(0, JITTER, ident.shape.shape) if k else 0.0)
                heat = heatmaps.render_heatmaps((shape * S).astype(np.float32), S, mc.heatmap_size)
                noise = Identity(ident.embedding, ident.shape, int(ident.seed) + k).noise(mc.latent_shape)
                z = gen.generate(heat, tokens, noise, guidance=1.0)
                crop = gen.decode(z, heat)
                if gen.reads_context:   # a context model: also with a frame around the face (its own face as the scene)
                    context = face_context(crop[0], [shape * S], 0.1, mc.heatmap_size)
                    gen.decode(gen.generate(heat, tokens, noise, guidance=1.0, context=context), heat)
                if gen.has_detail:
                    gen.refine(crop)
    finally:
        be._velocity, be._decoder, be._detail = saved
    return store


def edge_convs(graph, names) -> list[str]:
    """Names of the Conv nodes of an ONNX ``graph`` that are first after a graph input in
    ``names`` (no other Conv between) or last before a graph output in ``names``."""
    consumers: dict[str, list] = {}
    producer = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    found: set[str] = set()

    def walk(start, step):
        seen, todo = set(), list(start)
        while todo:
            n = todo.pop()
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Conv":
                found.add(n.name)
                continue
            todo += step(n)
    walk([c for i in graph.input if i.name in names for c in consumers.get(i.name, [])],
         lambda n: [c for o in n.output for c in consumers.get(o, [])])
    walk([producer.get(o.name) for o in graph.output if o.name in names],
         lambda n: [producer.get(i) for i in n.input])
    return sorted(found)


def quantize_graph(src: Path, dst: Path, feeds: list[dict], float_edges: tuple[str, ...] = ()) -> None:
    """``src`` (float ONNX) -> ``dst`` with its convolutions in int8 (QDQ), calibrated on
    ``feeds``, but for the Convs nearest the graph inputs / outputs named in ``float_edges``
    (:func:`edge_convs`); written to a temporary name and renamed, so ``dst`` is complete or absent."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError(f"no calibration inputs for {src.name}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    pre = dst.with_name(dst.stem + f".{os.getpid()}.pre.onnx")
    tmp = dst.with_name(dst.stem + f".{os.getpid()}.tmp.onnx")
    try:
        import onnx

        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        keep = edge_convs(onnx.load(str(pre)).graph, float_edges)
        if float_edges and not keep:
            log.warning("int8: no convolution next to %s in %s; every one is quantized", ", ".join(float_edges), src.name)
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=list(OPS), nodes_to_exclude=keep,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        os.replace(tmp, dst)
    finally:
        for p in (pre, tmp):
            p.unlink(missing_ok=True)
        for p in dst.parent.glob(dst.stem + f".{os.getpid()}.*"):   # quantize_static's side files
            p.unlink(missing_ok=True)


def int8_paths(folder: Path, names) -> dict[str, Path]:
    return {name: folder / f"{name}.{TAG}.onnx" for name in names}


def ensure_int8(folder: Path, names, feeds_fn: Callable[[], dict[str, list[dict]]]) -> dict[str, Path]:
    """The int8 graphs of ``names`` in ``folder`` (``NAME.onnx`` -> ``NAME.int8v2.onnx``), made
    from ``feeds_fn()`` (called at most once, only when one is missing)."""
    paths = int8_paths(folder, names)
    missing = [n for n, p in paths.items() if not p.exists()]
    if missing:
        log.info("int8: calibrating and quantizing %s (once per model)", ", ".join(missing))
        feeds = feeds_fn()
        for name in missing:
            quantize_graph(folder / f"{name}.onnx", paths[name], feeds[name], FLOAT_EDGES.get(name, ()))
    return paths
