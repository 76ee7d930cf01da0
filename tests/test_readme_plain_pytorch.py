"""The README's plain-PyTorch example prints what shows the method at work: a sharpness above zero."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def example(heading: str = "plain PyTorch") -> str:
    """The first Python block under the README's heading that names ``heading``."""
    text = README.read_text()
    start = re.search(rf"^#+ .*{re.escape(heading)}.*$", text, flags=re.M | re.I)
    assert start, f"README.md has no heading naming {heading!r}"
    block = re.search(r"```python\n(.*?)```", text[start.end() :], flags=re.S)
    assert block, f"no Python block under {start.group(0)!r}"
    return block.group(1)


def test_the_plain_pytorch_example_prints_a_sharpness_above_zero(tmp_path):
    """Under CosineAnnealingLR the LR, and with rho_schedule='follow_lr' rho, end at 0: the last step's sharpness
    is 0 whatever the method does, so the example must print one that is not the last step's alone."""
    script = tmp_path / "example.py"
    script.write_text(example())
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = re.search(r"sharpness (-?\d+\.\d+(?:e-?\d+)?)", run.stdout)
    assert printed, run.stdout
    assert float(printed.group(1)) > 0, run.stdout
