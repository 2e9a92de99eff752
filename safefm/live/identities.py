"""The identity files the live controls (tray, preview hotkey) can switch between."""

from __future__ import annotations

from pathlib import Path


def list_identities(folder: str | Path) -> list[Path]:
    """Sorted ``*.pt`` files in ``folder`` (empty when it does not exist)."""
    folder = Path(folder)
    return sorted(p.resolve() for p in folder.glob("*.pt")) if folder.is_dir() else []


def next_identity(paths: list[Path], current: Path | None) -> Path | None:
    """The identity after ``current`` in ``paths``, wrapping round; None when there is none."""
    if not paths:
        return None
    cur = Path(current).resolve() if current else None
    if cur in paths:
        return paths[(paths.index(cur) + 1) % len(paths)]
    return paths[0]
