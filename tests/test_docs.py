"""The documentation follows the code: the command reference is regenerated from the parsers, and every flag the
README and the docs pages name exists."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import subprocess
from pathlib import Path

import pytest

from phi3v_tune.cli import build_parser, main
from phi3v_tune.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference" / "cli.md"

# Flags of other programs that the pages show (launchers, installers, schedulers, the original recipe's scripts).
OTHER_TOOLS = {
    # torchrun
    "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
    "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
    # accelerate launch
    "--config_file", "--num_processes",
    # hf download, mkdocs, pytest + hypothesis
    "--local-dir", "--strict", "--hypothesis-show-statistics",
    # vllm serve
    "--trust-remote-code", "--max-model-len", "--limit-mm-per-prompt",
    # benchmarks/bench_multigpu.py (a script, not a phi3v-tune command)
    "--parallel", "--runs", "--two-node",
    # SLURM batch directives
    "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--output",
    # the original recipe's scripts, named where we compare
    "--use_lora",
}  # fmt: skip
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "scripts" / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    unique: dict[str, argparse.ArgumentParser] = {}
    for name, sub in subs.choices.items():  # an alias (merge -> export) points at its command's parser
        if all(sub is not other for other in unique.values()):
            unique[name] = sub
    return unique


def _help_text(command: str) -> str:
    """What `phi3v-tune COMMAND --help` prints (for a command that parses its own flags)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def _known_flags() -> set[str]:
    flags = set()
    for name, sub in _commands(build_parser()).items():
        options = [s for a in sub._actions for s in a.option_strings]
        flags.update(options)
        if not sub.add_help and not options:  # `bench`: its flags come from its own parser
            flags.update(FLAG.findall(_help_text(name)))
    return flags


def test_command_reference_is_current():
    """docs/reference/cli.md is what the generator writes from today's parsers; a stale page names the fix."""
    expected = _generator().render(build_parser())
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
    assert committed == expected, (
        "docs/reference/cli.md is stale (a flag, default or help text changed): run `python scripts/gen_cli_reference.py`"
        " and commit the result"
    )


def _row(page: str, command: str, flag: str) -> str:
    """The reference's table row of `flag` in `command`'s section."""
    section = page.split(f"## `phi3v-tune {command}`", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| `{flag}`"))


def test_command_reference_lists_every_command_and_flag_with_its_default():
    page = _generator().render(build_parser())
    for name, sub in _commands(build_parser()).items():
        assert f"## `phi3v-tune {name}`" in page
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in _row(page, name, action.option_strings[0]), f"{name} {option} missing"
    assert TrainConfig().learning_rate == 4e-05 and " | 4e-05 | " in _row(page, "train", "--learning-rate")
    assert " | 64 | " in _row(page, "train", "--batch-size")
    assert "one of `full`, `freeze-vision`, `lora`, `qlora`" in _row(page, "train", "--method")
    assert " | required | " in _row(page, "export", "--model") and "`--adapter`" in _row(page, "export", "--model")
    assert " | train for --eval-holdout rows, else test | " in _row(page, "eval", "--split")


def test_reference_does_not_depend_on_the_terminal_width(monkeypatch):
    gen = _generator()
    monkeypatch.setenv("COLUMNS", "40")
    narrow = gen.render(build_parser())
    monkeypatch.setenv("COLUMNS", "300")
    assert gen.render(build_parser()) == narrow


def test_markup_in_help_texts_is_escaped():
    gen = _generator()
    assert gen._escape("<|endoftext|> after <s> and a_b *x*") == r"&lt;\|endoftext\|&gt; after &lt;s&gt; and a\_b \*x\*"
    assert gen._escape("as `accelerate launch --config_file x_y`") == "as `accelerate launch --config_file x_y`"


def _pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "configs").rglob("*.sbatch"))]
    return [p for p in pages if p != REFERENCE]


def test_pages_name_only_flags_that_exist():
    """Every --flag in the README, the docs pages and the shipped job scripts is one a phi3v-tune command takes (or
    belongs to a tool the page shows), so a renamed or removed flag cannot linger in the docs."""
    known = _known_flags() | OTHER_TOOLS
    unknown = []
    for page in _pages():
        for lineno, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
            unknown += [f"{page.relative_to(ROOT)}:{lineno}: {f}" for f in FLAG.findall(line) if f not in known]
    assert not unknown, "flags no command has:\n" + "\n".join(unknown)


def test_readme_quick_start_is_exactly_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert all((ROOT / c.split()[1]).is_file() for c in commands)


def test_slurm_script_is_valid_bash_that_launches_train_with_resume():
    script = ROOT / "configs" / "slurm" / "train_2nodes_8gpus.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    assert "#SBATCH --nodes=2" in text and "--nproc_per_node 8" in text
    assert "-m phi3v_tune train" in text and "--resume" in text


def test_readme_links_point_at_files_that_exist():
    """The README is read outside the site (no strict build checks it): each relative link must resolve."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t]
    assert targets, "the README links to the docs pages"
    assert [t for t in targets if not (ROOT / t).exists()] == []
