"""Every Python snippet of README.md runs as written (each in a fresh interpreter, in an empty folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) == 5  # plain loop, QNTrainer, plain Trainer, Accelerate, PEFT


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(SNIPPETS[index])
    env = {**os.environ, "PYTHONPATH": str(README.parent), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"snippet {index} failed:\n{SNIPPETS[index]}\n{done.stderr[-3000:]}"
