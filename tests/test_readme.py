"""The README's Python examples run as written (a reader copies them first)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python block"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    if "check_module" in BLOCKS[index]:      # the gradient-check table it prints says every tensor passed
        rows = [line for line in printed.splitlines() if line.split()[:1] in (["input"], ["weight"], ["bias"])]
        assert len(rows) == 3 and all(line.rstrip().endswith("yes") for line in rows), printed
