"""What a batch job processes: the (input video, output video) pairs of a folder or a manifest.

- A folder: every video under it (recursively; hidden files and folders skipped), each written to
  the same relative path under the output folder (the output mirrors the input tree).
- A manifest, ``.csv`` (with a header row) or ``.jsonl`` (one object a line), with the columns /
  keys ``path`` (required; relative paths are relative to the manifest's folder), ``identity``
  (optional: ``auto`` or an identity file, for this file instead of the run's ``--identity``) and
  ``output`` (optional: the output path relative to the output folder; default: ``path``
  relative to ``root``, the manifest's folder unless given).

Nothing here opens a video or needs Ray. Problems are one-line :class:`ConfigError` /
:class:`InputError` raised before anything runs.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError
from ..media import VIDEO_EXTS, is_video

MANIFEST_KEYS = ("path", "identity", "output")


@dataclass(frozen=True)
class Item:
    """One input video. ``key``: its output path relative to the output folder (unique in a job,
    the ledger's key); ``src`` / ``dst``: absolute paths; ``identity``: ``None`` (the run's),
    ``"auto"`` or an identity file."""
    key: str
    src: Path
    dst: Path
    identity: str | None = None


@dataclass
class Plan:
    """The items of a job and the entries left out (``skipped``: not videos, as relative paths)."""
    input: Path
    output: Path
    items: list[Item]
    skipped: list[str]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _item(src: Path, rel: str, output: Path, identity: str | None = None) -> Item:
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts or not rel_path.parts:
        raise ConfigError(f"output path {rel!r} must be relative and inside the output folder")
    if not is_video(rel_path):
        raise ConfigError(f"output {rel!r} must be a video file ({', '.join(VIDEO_EXTS)})")
    return Item(rel_path.as_posix(), src, output / rel_path, identity)


def plan_folder(folder: Path, output: Path) -> Plan:
    """Every video under ``folder`` -> the same relative path under ``output``."""
    items, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            src = Path(root) / name
            rel = src.relative_to(folder).as_posix()
            if is_video(src):
                items.append(_item(src, rel, output))
            else:
                skipped.append(rel)
    return Plan(folder, output, sorted(items, key=lambda it: it.key), sorted(skipped))


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (header row) or JSONL manifest."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    rows = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"manifest {path} line {n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"manifest {path} line {n}: expected an object with a \"path\"")
            rows.append((n, row))
    else:
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            if None in row:
                raise ConfigError(f"manifest {path} line {reader.line_num}: more cells than header columns")
            rows.append((reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items()
                                           if k is not None}))
    return rows


def plan_manifest(manifest: Path, output: Path, root: Path | None = None) -> Plan:
    """The rows of a CSV/JSONL ``manifest`` (see the module docstring)."""
    base = manifest.parent.resolve()
    root = (root or base).resolve()
    items = []
    for n, row in _read_rows(manifest):
        where = f"manifest {manifest} line {n}"
        unknown = sorted(set(row) - set(MANIFEST_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown column {unknown[0]!r} (columns: {', '.join(MANIFEST_KEYS)})")
        if not str(row.get("path") or "").strip():
            raise ConfigError(f"{where}: no path")
        src = (base / str(row["path"]).strip()).resolve()
        if not is_video(src):
            raise ConfigError(f"{where}: {src} is not a video file ({', '.join(VIDEO_EXTS)})")
        identity = str(row.get("identity") or "").strip() or None
        if identity not in (None, "auto"):
            ident_path = (base / identity).resolve()
            if not ident_path.is_file():
                raise ConfigError(f"{where}: identity file not found: {ident_path}")
            identity = str(ident_path)
        rel = str(row.get("output") or "").strip()
        if not rel:
            if not _inside(src, root):
                raise ConfigError(f"{where}: {src} is not under {root}; give --root or an output column")
            rel = src.relative_to(root).as_posix()
        items.append(_item(src, rel, output, identity))
    if not items:
        raise ConfigError(f"manifest {manifest} lists no videos")
    return Plan(manifest, output, items, [])


def plan_job(input_path, output_path, root=None) -> Plan:
    """Check INPUT (a folder or a .csv/.jsonl manifest) and OUTPUT (a folder); nothing is written.
    Raises a one-line :class:`InputError` / :class:`ConfigError`."""
    src, output = Path(input_path).resolve(), Path(output_path).resolve()
    if not src.exists():
        raise InputError(f"input not found: {src}")
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} is a file; safefm-batch writes a folder")
    if src.is_dir():
        if _inside(output, src) or _inside(src, output):
            raise InputError(f"output folder {output} and input folder {src} must not contain each other")
        plan = plan_folder(src, output)
        if not plan.items:
            raise InputError(f"no videos under {src} (looked for {', '.join(VIDEO_EXTS)})")
    elif src.suffix.lower() in (".csv", ".jsonl"):
        plan = plan_manifest(src, output, Path(root) if root else None)
    else:
        raise InputError(f"input {src} must be a folder or a .csv/.jsonl manifest")
    seen: dict[str, Item] = {}
    for it in plan.items:
        if it.key in seen:
            raise ConfigError(f"two inputs write {it.key}: {seen[it.key].src} and {it.src}")
        if _inside(it.src, output):
            raise InputError(f"input {it.src} is inside the output folder {output}")
        seen[it.key] = it
    return plan
