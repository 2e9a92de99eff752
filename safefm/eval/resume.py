"""Resuming a stopped ``safefm-eval`` run. :class:`ResumeCache` pickles each finished piece
of a run (the privacy gallery, each clip's input analysis, each method on each part or clip)
under ``out/partial/``; with ``--resume`` a piece is read back instead of recomputed when the
run's data settings are unchanged, otherwise every piece is cleared. SAFE-FM pieces are also
keyed by a tag of the model, identity, seed and runtime, so a new model re-runs SAFE-FM only.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

from .report import jsonable


class ResumeCache:
    """Finished pieces of a run, pickled under ``folder``; reused with ``resume`` when the
    data ``signature`` (data folder, subset sizes, stride) matches the saved one, else cleared.
    :meth:`key` adds ``safefm_tag`` to SAFE-FM pieces only."""

    def __init__(self, folder: Path, signature: dict, resume: bool, log: Callable[[str], None],
                 safefm_tag: str = ""):
        self.dir, self.log = Path(folder), log
        self.safefm_tag = safefm_tag
        self.reused: list[str] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        sig_path = self.dir / "signature.json"
        old = json.loads(sig_path.read_text()) if sig_path.exists() else None
        sig = json.loads(json.dumps(jsonable(signature)))
        self.enabled = resume and old == sig
        if resume and old is not None and old != sig:
            log("resume: the run's settings differ from the saved ones; starting afresh")
        if not self.enabled:
            for f in [*self.dir.glob("*.pkl"), *self.dir.glob("*.note.json")]:
                f.unlink()
        sig_path.write_text(json.dumps(sig))

    def get_or(self, key: str, compute: Callable[[], object]):
        path = self.dir / (key.replace("@", "-").replace("/", "_") + ".pkl")
        if self.enabled and path.exists():
            with open(path, "rb") as f:
                self.log(f"resume: reusing {key}")
                self.reused.append(key)
                return pickle.load(f)
        value = compute()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(value, f)
        tmp.replace(path)
        return value

    def note(self, name: str, value=None):
        """Save a small JSON value (``value`` given) or read it back (None if absent)."""
        path = self.dir / f"{name}.note.json"
        if value is not None:
            path.write_text(json.dumps(value))
            return value
        return json.loads(path.read_text()) if path.exists() else None

    def key(self, part: str, method: str, steps: int) -> str:
        return f"{part}_{method}" + (f"_s{steps}_{self.safefm_tag}" if method == "safefm" else "")
