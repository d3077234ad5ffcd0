"""The README's example runs as written and prints a digest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_seed_example_prints_a_digest() -> None:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "anyio.run(main)" in b)
    out = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=120, check=True
    )
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", out.stdout), out.stdout
