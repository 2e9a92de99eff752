"""Command-line tools (``safefm-anonymize``, ``safefm-identity``, ``safefm-cam``, ``safefm-eval``,
``safefm-bench``). Shared option groups and error handling live in :mod:`safefm.cli.common`."""

import os

# numpy's BLAS runs on one thread in SAFE-FM's commands (unless OPENBLAS_NUM_THREADS says
# otherwise), set here, before anything imports numpy: the per-frame linear algebra is tiny (6 x 6
# light fits, a 157-point spline), and OpenBLAS's second thread, waiting busily after every call,
# took the cores from onnxruntime, OpenCV and MediaPipe: safefm-bench's live path ran at 15.6 FPS
# with it and 23.1 without on a 2-core CPU (docs/results.md, session 32).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
