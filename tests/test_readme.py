"""The README's Python code blocks run as written, and its commands match .ci/run."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


NAMESPACE: dict = {}  # blocks run in order in one namespace, like a notebook


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), NAMESPACE)


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert first_block[0].endswith("python -m functional_bridge")
    assert re.match(r"^pip install .*python -m pytest$", first_block[1])
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
