"""The README's first command must work for someone who has only the repository."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _first_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    line = next(ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#"))
    return shlex.split(line.split("&&", 1)[1])


def test_the_first_command_reads_a_clip_that_ships_with_the_repository():
    from safefm.media import VideoReader

    cmd = _first_command()
    assert cmd[0] == ".venv/bin/safefm-anonymize"
    clip = ROOT / cmd[1]
    assert clip.is_file() and ROOT in clip.resolve().parents and "shared" not in clip.parts
    assert clip.stat().st_size <= 1_000_000                     # the data README's limit
    assert (clip.parent / "CREDITS.md").is_file()               # LivePortrait, MIT: credited
    with VideoReader(clip) as reader:
        n = sum(1 for _ in reader)
        assert 0 < n / reader.fps <= 5.0


def test_the_readme_stays_short_and_shows_the_test_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 130
    assert "python -m pytest" in text
