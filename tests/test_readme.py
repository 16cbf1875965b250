"""The README's Python code blocks run as written, and its commands match .ci/run."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TL_SECTION = re.search(r"\n## Coming from TransformerLens\n.*?(?=\n## )", README, flags=re.S).group(0)
# "Scaling out" needs a process group: tests/test_distributed_fsdp.py runs it on 2 gloo processes
SCALING_SECTION = re.search(r"\n## Scaling out\n.*?(?=\n## )", README, flags=re.S).group(0)
BLOCKS = re.findall(r"```python\n(.*?)```", README.replace(TL_SECTION, "").replace(SCALING_SECTION, ""), flags=re.S)
TL_BLOCKS = re.findall(r"```python\n(.*?)```", TL_SECTION, flags=re.S)


def test_python_blocks_run_in_order():
    """The blocks outside the TL section, in order in one namespace, like a notebook (one test, so
    no test selection or worker split can run a block without the ones before it)."""
    assert BLOCKS
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)


def test_coming_from_transformer_lens_runs():
    """The section's blocks in order, with ``path`` a saved GPT-2 and its (locally trained)
    tokenizer, as `save_pretrained` writes them."""
    from helpers import make_gpt2
    from tokenizers_local import gpt2_tokenizer, save_pretrained

    tokenizer = gpt2_tokenizer()
    namespace = {"path": save_pretrained(make_gpt2(vocab_size=len(tokenizer), n_positions=64), tokenizer)}
    assert len(TL_BLOCKS) >= 2
    for index, block in enumerate(TL_BLOCKS):
        exec(compile(block, f"README.md 'Coming from TransformerLens' block {index}", "exec"), namespace)


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert first_block[0].endswith("python -m functional_bridge")
    assert re.match(r"^pip install .*python -m pytest( -n \d+)?$", first_block[1])
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
