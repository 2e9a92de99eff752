"""``safefm-batch``: anonymize a video corpus on a Ray cluster, resumable and exactly once.

- :mod:`.manifest`: the (input, output) pairs of a folder or a CSV/JSONL manifest.
- :mod:`.ledger`: the SQLite ledger (state, attempts, checksum and figures per input).
- :mod:`.worker`: one warm engine, one video per call (no Ray; the ``safefm-anonymize`` path).
- :mod:`.actor`: that worker as a Ray actor.
- :mod:`.runner`: the driver: workers, queue, retries, progress, summary.

Ray is optional (``pip install 'safefm[scale]'``); only :mod:`.actor` and :mod:`.runner` use it,
and import it when a job starts.
"""
