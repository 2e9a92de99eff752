"""``safefm-anonymize``: replace every face in an image, a folder of images, or a video.

    safefm-anonymize INPUT -o OUTPUT [--identity auto|FILE] [--match gender,age|gender|age|none]
                     [--steps N] [--seed S] [--device cpu|cuda] [--runtime auto|torch|onnx]
                     [--model FILE] [--overwrite]

- INPUT image  -> OUTPUT image of the same size (OUTPUT may be a folder: same file name).
- INPUT folder -> OUTPUT folder, same file names; only the folder's own images are processed,
  other entries are skipped and listed. Images without faces are copied unchanged and listed.
- INPUT video  -> OUTPUT video with the same resolution and frame rate, audio kept.

``--identity auto`` (the default): each person gets their own synthetic identity, drawn from the
identity sampler and kept for as long as they are tracked; with ``--match`` (default
``gender,age``) it is drawn from the sampler group of the person's estimated gender and age group,
so those two attributes survive; ``--match none`` keeps neither. ``--identity FILE``: every face
wears that identity file (``--match`` does not apply).

Every output is written to a temporary file and renamed when complete, so an error or Ctrl-C
never leaves a half-written file. Existing outputs are only replaced with ``--overwrite``; an
output that would replace its input is always refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from ..errors import ConfigError, IdentityFileError, InputError, WeightsError
from ..identity_assign import parse_match
from ..media import (IMAGE_EXTS, VIDEO_EXTS, VideoReader, VideoWriter, copy_file_atomic, is_image,
                     is_video, read_image, write_image)
from ..results import ANONYMIZED, HELD, PLACEHOLDER, FrameResult
from .common import EXIT_ERROR, EXIT_OK, add_logging_args, add_runtime_args, cli_main, \
    runtime_config_from_args

log = logging.getLogger("safefm.anonymize")

EngineFactory = Callable[..., object]
"""``factory(runtime_cfg, model_path=None, identity_path=None, video=True) -> Engine``
(:func:`safefm.engine.build_engine`; tests pass one around ``safefm.tiny.tiny_engine``)."""

_MAX_LISTED = 5


# ------------------------------------------------------------------------------ planning

@dataclass
class Job:
    """What one invocation does: ``kind`` is ``"image"``, ``"folder"`` or ``"video"``;
    ``items`` are the (input, output) file pairs; ``skipped`` the folder entries left out."""
    kind: str
    input: Path
    output: Path
    items: list[tuple[Path, Path]]
    skipped: list[str] = field(default_factory=list)


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _exists_error(path: Path, more: int = 0) -> InputError:
    extra = f" (and {more} more)" if more else ""
    return InputError(f"output exists: {path}{extra}; pass --overwrite to replace")


def _plan_file(kind: str, src: Path, output: Path, overwrite: bool) -> Job:
    dst = output / src.name if output.is_dir() else output
    ok = is_image(dst) if kind == "image" else is_video(dst)
    if not ok:
        exts = IMAGE_EXTS if kind == "image" else VIDEO_EXTS
        raise InputError(f"output {dst} must be {'an image' if kind == 'image' else 'a video'} "
                         f"file for {kind} input ({', '.join(exts)})")
    if _same_file(src, dst):
        raise InputError(f"output {dst} is the input file; choose another output")
    if dst.exists() and not overwrite:
        raise _exists_error(dst)
    return Job(kind, src, dst, [(src, dst)])


def _plan_folder(src: Path, output: Path, overwrite: bool) -> Job:
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} is a file; a folder input needs an output folder")
    if _same_file(src, output):
        raise InputError(f"output folder {output} is the input folder; choose another folder")
    items, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and is_image(p):
            items.append((p, output / p.name))
        else:
            skipped.append(p.name + ("/" if p.is_dir() else ""))
    if not items:
        raise InputError(f"no images in folder {src} (looked for {', '.join(IMAGE_EXTS)})")
    for s, d in items:
        if _same_file(s, d):  # e.g. OUTPUT is a link to INPUT
            raise InputError(f"output {d} would overwrite the input {s}; choose another folder")
    existing = [d for _, d in items if d.exists()]
    if existing and not overwrite:
        raise _exists_error(existing[0], len(existing) - 1)
    return Job("folder", src, output, items, skipped)


def plan_job(input_path, output_path, overwrite: bool = False) -> Job:
    """Check INPUT/OUTPUT (nothing is written). Raises :class:`InputError` with one line."""
    src, output = Path(input_path), Path(output_path)
    if not src.exists():
        raise InputError(f"input not found: {src}")
    if src.is_dir():
        return _plan_folder(src, output, overwrite)
    if is_image(src):
        return _plan_file("image", src, output, overwrite)
    if is_video(src):
        return _plan_file("video", src, output, overwrite)
    raise InputError(f"unsupported input {src}: expected an image ({', '.join(IMAGE_EXTS)}), "
                     f"a video ({', '.join(VIDEO_EXTS)}) or a folder")


# ------------------------------------------------------------------------------ summary

def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


@dataclass
class Summary:
    """Counts for the end-of-run report. ``failed`` faces were covered (held or placeholder)
    instead of anonymized."""
    kind: str
    output: Path
    files: int = 0
    frames: int = 0
    frames_without_faces: int = 0
    faces: int = 0
    anonymized: int = 0
    held: int = 0
    placeholder: int = 0
    no_face_files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.held + self.placeholder

    def add(self, res: FrameResult) -> None:
        self.frames += 1
        self.faces += len(res.faces)
        self.frames_without_faces += not res.faces
        for f in res.faces:
            self.anonymized += f.status == ANONYMIZED
            self.held += f.status == HELD
            self.placeholder += f.status == PLACEHOLDER

    def lines(self) -> list[str]:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        what = "video" if self.kind == "video" else f"{self.files} image{'s' * (self.files != 1)}"
        out = [f"wrote {what} -> {self.output}",
               f"  frames: {self.frames} ({self.frames_without_faces} without faces), "
               f"{self.seconds:.1f} s, {fps:.1f} FPS",
               f"  faces: {self.faces} ({self.anonymized} anonymized, {self.failed} failed: "
               f"{self.held} held, {self.placeholder} placeholder)"]
        if self.no_face_files:
            out.append(f"  no faces, copied unchanged ({len(self.no_face_files)}): "
                       f"{_names(self.no_face_files)}")
        if self.skipped:
            out.append(f"  skipped, not images ({len(self.skipped)}): {_names(self.skipped)}")
        if self.unreadable:
            out.append(f"  unreadable, not written ({len(self.unreadable)}): "
                       f"{_names(self.unreadable)}")
        return out


# ------------------------------------------------------------------------------ running

def _checked_image(res: FrameResult, frame) -> object:
    """The result image, after checking it can be written in place of ``frame``."""
    img = res.image
    if img is None or img.shape != frame.shape or img.dtype != frame.dtype:
        raise RuntimeError(f"engine returned an image of shape "
                           f"{getattr(img, 'shape', None)} for a frame of shape {frame.shape}")
    if not res.anonymized:
        raise RuntimeError("engine returned a frame with anonymization paused")
    return img


def _check_model_files(args) -> None:
    if args.identity and args.identity != "auto" and not Path(args.identity).is_file():
        raise IdentityFileError(f"identity file not found: {args.identity}")
    if args.model and not Path(args.model).is_file():
        raise WeightsError(f"model file not found: {args.model}")


def _progress(args, hide: bool = False, **kw) -> tqdm:
    """A progress bar on stderr (hidden with -q, or when stderr is not a terminal)."""
    return tqdm(disable=True if (args.quiet or hide) else None, leave=False, dynamic_ncols=True,
                **kw)


def _run_images(job: Job, args, engine, summary: Summary, first=None) -> None:
    """Anonymize each (src, dst) pair; unreadable folder images are listed, not fatal."""
    if job.kind == "folder":
        job.output.mkdir(parents=True, exist_ok=True)
    with _progress(args, hide=job.kind == "image", total=len(job.items), unit="file") as bar:
        for src, dst in job.items:
            if first is not None:
                img, first = first, None
            else:
                try:
                    img = read_image(src)
                except InputError as exc:
                    log.warning("%s", exc)
                    summary.unreadable.append(src.name)
                    bar.update()
                    continue
            engine.reset()  # unrelated images: no tracking or warm start across them
            t0 = time.perf_counter()
            res = engine.process(img)
            out = _checked_image(res, img)
            summary.seconds += time.perf_counter() - t0
            summary.add(res)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not res.faces:
                summary.no_face_files.append(src.name)
                if src.suffix.lower() == dst.suffix.lower():
                    copy_file_atomic(src, dst)
                else:
                    write_image(dst, img)
            else:
                write_image(dst, out)
            summary.files += 1
            bar.update()


def anonymize_video(engine, reader: VideoReader, dst: Path, summary: Summary,
                    on_frame: Callable[[], None] | None = None) -> None:
    """Anonymize the opened video ``reader`` into ``dst`` (same size and rate, audio kept,
    written atomically); the counts go to ``summary``, ``on_frame()`` runs after each frame.
    Also the per-file step of ``safefm-batch``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    audio = reader.path if reader.has_audio else None
    t0 = time.perf_counter()
    with VideoWriter(dst, reader.rate, reader.size, audio_from=audio) as writer:
        for frame, t in reader:
            res = engine.process(frame, timestamp=t)
            writer.write(_checked_image(res, frame))
            summary.add(res)
            if on_frame is not None:
                on_frame()
    summary.seconds = time.perf_counter() - t0
    summary.files = 1


def _run_video(job: Job, args, engine, reader: VideoReader, summary: Summary) -> None:
    with _progress(args, total=reader.frame_count or None, unit="frame") as bar:
        anonymize_video(engine, reader, job.output, summary, on_frame=bar.update)


def run(args: argparse.Namespace, engine_factory: EngineFactory | None = None) -> int:
    """Run one ``safefm-anonymize`` invocation; returns the exit code (errors raise)."""
    job = plan_job(args.input, args.output, args.overwrite)
    _check_model_files(args)
    auto = args.identity in (None, "auto")
    if args.match is not None and not auto:
        raise ConfigError("--match applies to --identity auto (one identity per person), not to an identity file")
    cfg = runtime_config_from_args(args, identity_per_track=auto,
                                   identity_match=None if args.match is None else parse_match(args.match))
    if engine_factory is None:
        from ..engine import build_engine as engine_factory
    summary = Summary(job.kind, job.output, skipped=list(job.skipped))

    reader = VideoReader(job.input) if job.kind == "video" else None
    first = read_image(job.input) if job.kind == "image" else None  # fail before loading weights
    try:
        engine = engine_factory(cfg, model_path=args.model, identity_path=None if auto else args.identity,
                                video=job.kind == "video")
        if getattr(args, "audit", False):
            from ..audit import StatusRecorder

            engine = StatusRecorder(engine)   # keeps each frame's face statuses for the audit
        try:
            if reader is not None:
                _run_video(job, args, engine, reader, summary)
            else:
                _run_images(job, args, engine, summary, first)
        finally:
            engine.close()
    finally:
        if reader is not None:
            reader.close()

    print("\n".join(summary.lines()))
    code = EXIT_OK
    if getattr(args, "audit", False):
        from ..audit import audit_anonymized, report_path
        from .audit import finish

        done = [src for src, _ in job.items if src.name not in summary.unreadable]
        code = finish(audit_anonymized(job.kind, job.input, job.output, done, engine.frames),
                      report_path(job.output))
    if summary.unreadable:
        print(f"error: {len(summary.unreadable)} of {len(job.items)} images could not be read: "
              f"{_names(summary.unreadable)}", file=sys.stderr)
        return EXIT_ERROR
    return code


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="safefm-anonymize",
        description="Replace every face in an image, a folder of images, or a video.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("input", help="image, folder of images, or video")
    ap.add_argument("-o", "--output", required=True,
                    help="output image, folder or video (same kind as the input)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--audit", action="store_true",
                    help="then audit the output against the input (safefm-audit) and write OUTPUT.audit.json; "
                         "exit status 3 if a frame still matches the person or shows the raw face")
    ap.add_argument("--model", metavar="FILE", default=None,
                    help="weights file, or a shipped model by name: default, large (weights/safefm_NAME.safetensors)")
    g = add_runtime_args(ap, identity_auto=True)
    g.add_argument("--match", metavar="LIST", default=None,
                   help="with --identity auto: the person's attributes the identity is drawn to match, "
                        "gender,age (default), gender, age or none; they survive anonymization")
    add_logging_args(ap)
    return ap


def main(argv: Sequence[str] | None = None, engine_factory: EngineFactory | None = None) -> int:
    return cli_main(build_parser(), lambda args: run(args, engine_factory), argv)


if __name__ == "__main__":
    sys.exit(main())
