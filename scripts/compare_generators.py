#!/usr/bin/env python
"""Flow matching against its diffusion twin, per solver and network evaluations (issue 16).

    python scripts/compare_generators.py --flow default --diffusion weights/safefm_twin.safetensors \
        --nfe 1,2,3,4,5,8,10,20,50 --people 40 --clips 3 --frames 60 --out runs/compare

Every configuration runs through ``safefm-eval``'s own code path (:func:`safefm.eval.run.run`:
the same photos, clips, metrics and baselines as the product's evaluation) on a subset of the
evaluation people and clips, once per (model, solver): the flow model with Euler and Heun, the
diffusion twin with DDIM, DPM-Solver++ and ancestral DDPM, each at every NFE the solver can
reach (Heun: two calls a step, so even NFE only); warm start (video only) for Euler, DDIM and
DPM-Solver++; the baselines (blur, pixelation, and the input itself: the ceiling) once. Identity
repel is off (it would double every network call): NFE is exactly the network evaluations a
face. ``--seeds`` repeats chosen points with other identity-noise seeds (the spread).

Writes ``<out>/compare.json`` (every figure), ``<out>/compare.md`` (the tables) and
``<out>/*.png`` (quality, flicker and time against NFE). Resumable: finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from safefm.config import DIFFUSION_SOLVERS
from safefm.sampler import CALLS_PER_STEP

FLOW_SOLVERS = ("euler", "heun")   # the flow solvers compared (midpoint: tested, not swept)
WARM_SOLVERS = ("euler", "ddim", "dpmpp")
INPUT_PIECES = ("privacy_gallery", "video_input_")   # method-independent pieces shared between runs


def int_list(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def calls_per_step(solver: str) -> int:
    return CALLS_PER_STEP.get(solver, 1)   # every diffusion solver: one call a step


def steps_for(solver: str, nfe: tuple[int, ...]) -> tuple[int, ...]:
    """Solver steps for each NFE the solver reaches exactly (1..50 steps)."""
    c = calls_per_step(solver)
    return tuple(n // c for n in nfe if n % c == 0 and 1 <= n // c <= 50)


def write_runtime(path: Path, solver: str, warm: bool) -> Path:
    path.write_text("[runtime]\n"
                    f'solver = "{solver}"\n'
                    f"warm_start = {'true' if warm else 'false'}\n"
                    "identity_repel = 0.0\n")
    return path


def seed_inputs(shared: Path, out: Path) -> None:
    """Copy the input-side pieces (gallery, clip analyses) of an earlier run into ``out``."""
    src, dst = shared / "partial", out / "partial"
    if not src.is_dir() or (dst / "signature.json").exists():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "signature.json" or f.name.startswith(INPUT_PIECES):
            shutil.copy2(f, dst / f.name)


def eval_run(out: Path, *, methods, steps, model, runtime_config, a, parts=("privacy", "video"),
             seed=None, shared: Path | None = None) -> dict:
    from safefm.eval.options import EvalOptions
    from safefm.eval.run import run

    done = out / "report.json"
    if done.exists():
        return json.loads(done.read_text())
    if shared is not None:
        seed_inputs(shared, out)
    opts = EvalOptions(out=out, methods=tuple(methods), steps=tuple(steps), model=model,
                       runtime_config=runtime_config, max_people=a.people, max_clips=a.clips,
                       max_frames=a.frames, parts=tuple(parts), resume=True, seed=seed,
                       command=" ".join(sys.argv))
    t0 = time.time()
    rep = run(opts)
    print(f"  {out.name}: {time.time() - t0:.0f} s", flush=True)
    return rep


def _mean(*xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def figures(rep: dict, label: str) -> dict:
    """The compared figures of one evaluated configuration (method label in the report)."""
    out = {}
    p = rep.get("privacy", {}).get("methods", {}).get(label)
    if p:
        col = p["realism"]["colour"]
        out.update(photo_sharpness=col["sharpness"], photo_tone_gap=col["tone_gap"], rank1=p["rank1"],
                   verification=p["verification"], photo_ms=p["engine"]["ms_per_frame"],
                   photo_generator_ms=p["engine"]["stage_ms"].get("generator"))
    v = rep.get("video", {}).get("methods", {}).get(label)
    if v:
        o = v["overall"]
        fid, d68 = o["fidelity"], o.get("fidelity_dlib68", {})
        r = lambda d, k: d.get(k, {}).get("pearson")   # noqa: E731
        out.update(clip_sharpness=o["realism"]["sharpness"], clip_tone_gap=o["realism"]["tone_gap"],
                   mp_mouth=r(fid, "mouth_open"), mp_eyes=_mean(r(fid, "eye_open_l"), r(fid, "eye_open_r")),
                   mp_mean_r=o["fidelity_mean_pearson"], dlib_mouth=r(d68, "mouth_open"),
                   dlib_eyes=_mean(r(d68, "eye_open_l"), r(d68, "eye_open_r")),
                   dlib_mean_r=o.get("fidelity_dlib68_mean_pearson"), leak=o["leak_rate"],
                   consistency=o["identity_consistency"]["mean"], flicker=o["flicker"],
                   video_ms=v["engine"]["ms_per_frame"], generator_ms=v["engine"]["stage_ms"].get("generator"))
    return out


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """``rows`` merged into the rows already in ``path`` (one row per model, solver, NFE, warm,
    seed; the new one wins), written back; returns the merged list. Runs with other models or
    solvers in the same --out add to one comparison."""
    key = lambda r: (r["model"], r["solver"], r["nfe"], r["warm"], r["seed"])   # noqa: E731
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    order = {"input": 0, "blur": 1, "pixelate": 2}
    out = sorted(merged.values(), key=lambda r: (order.get(r["model"], 3), r["model"], r["solver"], r["warm"],
                                                  r["seed"] is not None, r["seed"] or 0, r["nfe"]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": out}, indent=1))
    tmp.replace(path)
    return out


def _label(steps: tuple[int, ...], s: int) -> str:
    return "safefm" if len(steps) == 1 else f"safefm@{s}"


COLUMNS = [("photo_sharpness", "photo sharp.", 2), ("clip_sharpness", "clip sharp.", 2),
           ("clip_tone_gap", "tone gap", 2), ("dlib_mouth", "dlib mouth r", 2), ("dlib_eyes", "dlib eyes r", 2),
           ("mp_mean_r", "MP mean r", 2), ("rank1", "rank-1", 3), ("verification", "verif.", 3),
           ("leak", "leak", 3), ("consistency", "consist.", 3), ("flicker", "flicker", 2),
           ("generator_ms", "gen. ms", 0)]


def _cell(v, digits):
    return "-" if v is None else f"{v:.{digits}f}"


def write_report(out: Path, rows: list[dict]) -> None:
    """compare.md (one table per warm setting, rows by model / solver / NFE) and the plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = "| model | solver | NFE | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * (3 + len(COLUMNS))
    lines = []
    for warm in (False, True):
        sel = [r for r in rows if r["warm"] == warm and r["seed"] is None and (r["nfe"] > 0 or not warm)]
        if not sel:
            continue
        lines += [f"### {'warm start (video only)' if warm else 'cold start (every frame from noise)'}", "",
                  head, sep]
        lines += ["| " + " | ".join([r["model"], r["solver"], str(r["nfe"] or "-")]
                                    + [_cell(r.get(k), d) for k, _, d in COLUMNS]) + " |" for r in sel]
        lines.append("")
    seeded = [r for r in rows if r["seed"] is not None]
    if seeded:
        lines += ["### other identity-noise seeds", "", "| model | solver | NFE | seed | "
                  + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * (4 + len(COLUMNS))]
        lines += ["| " + " | ".join([r["model"], r["solver"], str(r["nfe"]), str(r["seed"])]
                                    + [_cell(r.get(k), d) for k, _, d in COLUMNS]) + " |" for r in seeded]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    refs = {r["model"]: r for r in rows if r["nfe"] == 0}
    for fname, keys in (("quality_vs_nfe.png", ("photo_sharpness", "clip_sharpness", "clip_tone_gap", "dlib_mouth",
                                                 "dlib_eyes", "mp_mean_r", "leak", "consistency")),
                        ("flicker_vs_nfe.png", ("flicker",)), ("time_vs_nfe.png", ("generator_ms",))):
        ncol = min(4, len(keys))
        nrow = (len(keys) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol + (2.5 if ncol == 1 else 0), 3.4 * nrow),
                                 squeeze=False)
        for ax, key in zip(axes.ravel(), keys):
            for warm in (False, True):
                for (model, solver) in sorted({(r["model"], r["solver"]) for r in rows if r["nfe"] > 0}):
                    pts = sorted((r["nfe"], r.get(key)) for r in rows if r["model"] == model and r["solver"] == solver
                                 and r["warm"] == warm and r["seed"] is None and r.get(key) is not None)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=3, ls="--" if warm else "-",
                                label=f"{model} {solver}{' warm' if warm else ''}")
            for name, style in (("input", "k:"), ("blur", "r:"), ("pixelate", "m:")):
                if refs.get(name, {}).get(key) is not None:
                    ax.axhline(refs[name][key], color=style[0], ls=":", lw=1, label=name)
            ax.set_xscale("log")
            ax.set_xlabel("network evaluations (NFE)")
            ax.set_title(key)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)


def strip(path: Path, models: dict, points: list[str], clip: Path, frame_index: int) -> Path:
    """One whole frame of ``clip``: the input, then each ``model:solver:NFE`` point, side by side
    at full size with a label (cold start, the comparison's settings)."""
    import cv2
    import numpy as np

    from safefm.config import load_runtime_config
    from safefm.engine import build_engine
    from safefm.eval.benchmark import load_frames

    frames, _ = load_frames(clip, frame_index + 1)
    frame = frames[frame_index]
    tiles = [("input", frame)]
    for point in points:
        model, solver, nfe = point.split(":")
        cfg = load_runtime_config(steps=int(nfe) // calls_per_step(solver), solver=solver, identity_repel=0.0)
        engine = build_engine(cfg, model_path=models[model], video=False)
        try:
            tiles.append((f"{model} {solver} NFE {nfe}", engine.process(frame, 0.0).image))
        finally:
            engine.close()
    out = []
    for label, img in tiles:
        img = np.ascontiguousarray(img[:, :, ::-1])   # BGR for OpenCV
        cv2.putText(img, label, (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(img, label, (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
        out.append(img)
    cols = 4
    rows = [np.hstack(out[i:i + cols] + [np.zeros_like(out[0])] * (cols - len(out[i:i + cols])))
            for i in range(0, len(out), cols)]
    cv2.imwrite(str(path), np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 88])
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flow", default="default", help="flow-matching model (name or .safetensors)")
    ap.add_argument("--flow-label", default="flow", help="how rows and run folders name the flow model "
                    "(e.g. reflow, for a reflowed model compared in the same --out)")
    ap.add_argument("--diffusion", default="twin", help="diffusion twin (default weights/safefm_twin.safetensors)")
    ap.add_argument("--nfe", type=int_list, default=(1, 2, 3, 4, 5, 8, 10, 20, 50))
    ap.add_argument("--warm-nfe", type=int_list, default=(2, 4, 8))
    ap.add_argument("--people", type=int, default=40)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--seeds", type=int_list, default=(), help="extra identity-noise seeds for --seed-points")
    ap.add_argument("--seed-points", default="euler:4,ddim:4,dpmpp:4,ddim:8,dpmpp:8",
                    help="solver:NFE points repeated with each --seeds value")
    ap.add_argument("--solvers", default=",".join(FLOW_SOLVERS + DIFFUSION_SOLVERS))
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--strip", default="", help="only render whole frames of --strip-clip for these "
                    "model:solver:NFE points (e.g. flow:euler:4,diffusion:ddim:4) to <out>/strip.jpg")
    ap.add_argument("--strip-clip", type=Path, default=None, help="default: the shared liveportrait_d3.mp4")
    ap.add_argument("--strip-frame", type=int, default=40)
    ap.add_argument("--reflow", default=None, help="--strip: the model a 'reflow:...' point uses")
    a = ap.parse_args(argv)

    from safefm.paths import resolve_model_path

    a.out.mkdir(parents=True, exist_ok=True)
    models = {"flow": resolve_model_path(a.flow), "diffusion": resolve_model_path(a.diffusion)}
    if a.strip:
        from safefm.paths import shared_data_dir

        clip = a.strip_clip or shared_data_dir() / "videos" / "liveportrait_d3.mp4"
        if a.reflow:
            models["reflow"] = resolve_model_path(a.reflow)
        print(f"wrote {strip(a.out / 'strip.jpg', models, a.strip.split(','), clip, a.strip_frame)}")
        return 0
    wanted = [s for s in a.solvers.split(",") if s]
    rows, shared = [], a.out / "baselines"
    print("baselines (blur, pixelate, input)", flush=True)
    base = eval_run(shared, methods=("none", "blur", "pixelate"), steps=(4,), model=models["flow"],
                    runtime_config=None, a=a)
    for m in ("none", "blur", "pixelate"):
        rows.append({"model": "input" if m == "none" else m, "solver": "-", "nfe": 0, "warm": False,
                     "seed": None, **figures(base, m)})

    def configs():
        for model, solvers in (("flow", FLOW_SOLVERS), ("diffusion", DIFFUSION_SOLVERS)):
            for solver in solvers:
                if solver in wanted:
                    yield model, solver, False, steps_for(solver, a.nfe), ("privacy", "video"), None
                    if solver in WARM_SOLVERS:
                        yield model, solver, True, steps_for(solver, a.warm_nfe), ("video",), None
        for point in a.seed_points.split(","):
            solver, nfe = point.split(":")
            model = "flow" if solver in FLOW_SOLVERS else "diffusion"
            if solver in wanted:
                for seed in a.seeds:
                    yield model, solver, False, steps_for(solver, (int(nfe),)), ("privacy", "video"), seed

    for model, solver, warm, steps, parts, seed in configs():
        if not steps:
            continue
        label = a.flow_label if model == "flow" else model
        name = (f"{label}-{solver}" + ("-warm" if warm else "")
                + (f"-seed{seed}-nfe{steps[0] * calls_per_step(solver)}" if seed is not None else ""))
        print(f"{name}: steps {steps}", flush=True)
        out = a.out / name
        out.mkdir(parents=True, exist_ok=True)
        cfg = write_runtime(out / "runtime.toml", solver, warm)
        rep = eval_run(out, methods=("safefm",), steps=steps, model=models[model], runtime_config=cfg, a=a,
                       parts=parts, seed=seed, shared=shared)
        for s in steps:
            rows.append({"model": label, "solver": solver, "nfe": s * calls_per_step(solver), "warm": warm,
                         "seed": seed, **figures(rep, _label(steps, s))})
        rows = merge_rows(a.out / "compare.json", rows)
    rows = merge_rows(a.out / "compare.json", rows)
    write_report(a.out, rows)
    print(f"wrote {a.out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
