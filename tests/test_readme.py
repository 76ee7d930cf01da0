"""The README's Python examples run exactly as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


SCRIPTS = ("train.py", "eval.py", "predict.py", "landscape.py")
COMMANDS = [
    line
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    for line in block.splitlines()
    if line.startswith("python ") and line.split()[1] in SCRIPTS
]


def first_of_each_sweep(arguments: list[str]) -> list[str]:
    """A multirun's first job: ``-m`` dropped and every ``key=a,b`` swept value cut to ``a``."""
    out = []
    for argument in arguments:
        if argument == "-m":
            continue
        key, equals, value = argument.partition("=")
        if equals and "," in value and not value.startswith("["):
            argument = f"{key}={value.split(',')[0]}"
        out.append(argument)
    return out


def test_the_readme_shows_the_cli():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes_as_written(command, tmp_path):
    """Every ``python <script>.py ...`` line of the README's shell blocks composes its config, as the script would
    before it runs (a multirun line: its first job)."""
    import shlex

    from omegaconf import OmegaConf

    from lit_deltasam.app import console, schema

    script, *arguments = shlex.split(command, comments=True)[1:]
    arguments = first_of_each_sweep(arguments)
    if script == "train.py":
        console.check_override_keys(arguments, schema.TYPED_GROUPS)
    cfg = schema.compose(README.parent / "conf", arguments, tmp_path, config_name=script.removesuffix(".py"))
    OmegaConf.to_container(cfg, resolve=True)
