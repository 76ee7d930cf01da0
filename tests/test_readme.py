"""The README's code and commands do what the README says they do, run or composed exactly as written."""

import doctest
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", README, flags=re.S | re.M)
"""Every fenced block of the README, as (language, body), in order."""


def examples() -> list[tuple[str, str]]:
    """Each Python block with the output the README shows after it (a ``text`` block, ``...`` for what varies)."""
    pairs = []
    for i, (language, body) in enumerate(BLOCKS):
        if language == "python":
            following = BLOCKS[i + 1] if i + 1 < len(BLOCKS) else ("", "")
            assert following[0] == "text", f"the README's Python block {len(pairs) + 1} shows no output after it"
            pairs.append((body, following[1]))
    return pairs


EXAMPLES = examples()


def test_the_readme_has_both_quick_starts():
    """The Lightning quick start trains through the mixin, the plain one through DeltaSAMOptimizer."""
    codes = [code for code, _ in EXAMPLES]
    assert any("DeltaSAMMixin" in code and "trainer.fit(" in code for code in codes)
    assert any("DeltaSAMOptimizer(" in code and "optimizer.step(" in code for code in codes)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_prints_what_the_readme_shows(index, tmp_path):
    code, expected = EXAMPLES[index]
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = expected.rstrip("\n").splitlines()
    printed = [line.rstrip() for line in result.stdout.rstrip("\n").splitlines()][-len(shown) :]
    checker = doctest.OutputChecker()
    want, got = "\n".join(shown) + "\n", "\n".join(printed) + "\n"
    assert checker.check_output(want, got, doctest.ELLIPSIS), f"the README shows\n{want}but the example printed\n{got}"


def commands(program: str) -> list[str]:
    """The lines of the README's shell blocks that run ``program`` (comments kept)."""
    return [
        line
        for language, body in BLOCKS
        if language == "bash"
        for line in body.splitlines()
        if line.split(" ", 1)[0] == program
    ]


def dry_run(target: str) -> str:
    """What ``make <target>`` would run, set-up taken as done."""
    stamps = ["-o", ".venv/.installed", "-o", ".venv/.docs-installed"]
    # under `make test` (CI) the parent make's variables would make this one print "Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    command = ["make", "--no-print-directory", "-n", *stamps, "ARGS=", target]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    return run.stdout


def test_make_train_fine_tunes_what_its_comment_says(tmp_path):
    """``make train``: MiniLM on MR with δ-SAM on CPU, one epoch of the training split, whose size the comment
    gives; and the run the README quotes is the committed one."""
    from hydra.core.hydra_config import HydraConfig

    from lit_deltasam.app import schema
    from lit_deltasam.data import get_task

    (line,) = [line for line in commands("make") if line.split()[1] == "train"]
    assert "MiniLM on MR" in line and "δ-SAM on CPU" in line
    assert dry_run("train").strip().splitlines()[-1].split()[-1] == "train.py"
    cfg = schema.compose(ROOT / "conf", [], tmp_path)
    choices = HydraConfig.get().runtime.choices
    groups = {group: choices[group] for group in ("model", "task", "method", "trainer")}
    assert groups == {"model": "minilm", "task": "mr", "method": "deltasam", "trainer": "cpu"}
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_epochs == 1 and cfg.data.train_limit is None
    reviews = int(re.search(r"one epoch of ([\d,]+) reviews", line).group(1).replace(",", ""))
    assert len(get_task("mr").load()["train"]) == reviews

    run = json.loads((ROOT / "docs" / "results" / "make_train.json").read_text())
    plain = re.sub(r"<!-- /?q(:[\w.]+)? -->", "", README)  # the quote markers around the numbers
    quoted = re.search(r"it took ([\d.]+) minutes \(test accuracy ([\d.]+)%", plain)
    assert quoted, "the README quotes make train's time and accuracy"
    assert float(quoted.group(1)) == round(run["wall_s"] / 60, 1)
    assert float(quoted.group(2)) == round(100 * run["metrics"]["test/acc"], 2)


def test_make_test_lint_and_docs_run_what_the_comment_says():
    (line,) = [line for line in commands("make") if line.split()[1] == "test"]
    assert "-m pytest" in dry_run("test")
    if "`make lint` runs ruff and mypy" in line:
        lint = dry_run("lint")
        assert "ruff check" in lint and "mypy" in lint
    if "`make docs` builds the docs site" in line:
        assert "mkdocs build --strict" in dry_run("docs")


SCRIPTS = ("train.py", "eval.py", "predict.py", "landscape.py")
CLI = [line for line in commands("python") if line.split()[1] in SCRIPTS]


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


def test_the_readme_shows_the_command_line():
    assert {line.split()[1] for line in CLI} == set(SCRIPTS)


@pytest.mark.parametrize("command", CLI)
def test_readme_command_builds_the_config_it_asks_for(command, tmp_path):
    """Every ``python <script>.py ...`` line composes as the script would before it runs (a multirun line: its first
    job), each override lands where it says, and a training line's method settings make a valid DeltaSAMConfig
    that holds them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lit_deltasam.app import console, schema

    script, *arguments = shlex.split(command, comments=True)[1:]
    arguments = first_of_each_sweep(arguments)
    if script == "train.py":
        console.check_override_keys(arguments, schema.TYPED_GROUPS)
    cfg = schema.compose(ROOT / "conf", arguments, tmp_path, config_name=script.removesuffix(".py"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    choices = HydraConfig.get().runtime.choices
    for override in OverridesParser.create().parse_overrides(arguments):
        key, value = override.key_or_group, override.value()
        if key in choices:
            assert choices[key] == value, (key, choices[key])
        else:
            found = resolved
            for part in key.split("."):
                found = found[part]
            assert found == value, (key, found)
    if script == "train.py":
        method = instantiate(cfg.method)  # the DeltaSAMConfig train.py builds
        assert method.method == cfg.method.method
        for override in OverridesParser.create().parse_overrides(arguments):
            if override.key_or_group.startswith("method."):
                assert getattr(method, override.key_or_group.split(".", 1)[1]) == override.value()
