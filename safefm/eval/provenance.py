"""Where and with what a measurement was made, as ``safefm-eval`` and ``safefm-bench`` record
it: :func:`machine_info` (platform, CPU, library versions), :func:`file_label` (a file's name
and the start of its sha256, so a figure names the exact weights or runtime file) and
:func:`runtime_settings_changed` (the runtime settings that differ from the built-in ones).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def file_label(path: Path | None, default: Path | None) -> str:
    """``name sha256:<12 hex>`` of ``path`` (``default`` when None), or ``name (missing)``."""
    from ..checkpoint import sha256_file   # imports torch: only when a label is made

    p = Path(path or default)
    if not p.exists():
        return f"{p.name} (missing)"
    return f"{p.name} sha256:{sha256_file(p)[:12]}"


def machine_info() -> dict:
    """Platform, Python, CPU model and count, OMP_NUM_THREADS and the versions of the
    numeric libraries present."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for mod in ("torch", "onnxruntime", "mediapipe", "cv2", "dlib", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return info


def runtime_settings_changed(path: Path | None) -> dict:
    """The runtime settings of ``path`` (None: configs/runtime_default.toml) that differ from
    :class:`RuntimeConfig`'s built-in values, ``steps``/``runtime`` aside (set per run)."""
    from ..config import RuntimeConfig, load_runtime_config, to_dict

    base = to_dict(RuntimeConfig())
    return {k: v for k, v in to_dict(load_runtime_config(path)).items()
            if k not in ("steps", "runtime") and v != base[k]}
