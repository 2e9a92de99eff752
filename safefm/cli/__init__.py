"""Command-line tools (``safefm-anonymize``, ``safefm-identity``, ``safefm-cam``, ``safefm-eval``,
``safefm-bench``). Shared option groups and error handling live in :mod:`safefm.cli.common`."""
