"""The README's Python examples run as written, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_python_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_ci_runs_the_readme_test_command() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert lines[-1] == "make test"
    assert "make test" in README


def test_readme_own_model_example_runs(tmp_path: Path) -> None:
    """The "Your own model" bash example, as written, in a fresh directory."""
    import os
    import subprocess
    import sys

    found = re.search(r"<!-- readme-example: own-model -->\n```bash\n(.*?)```", README, re.S)
    assert found, "the own-model example is gone from the README"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = found.group(1).rstrip() + " --quiet"
    done = subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout
    (result,) = (tmp_path / "runs").glob("*/result.json")
    assert '"label": "mymodels.tiny:build-synthetic-fts-s0.9-seed0"' in result.read_text()
