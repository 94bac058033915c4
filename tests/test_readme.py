"""README.md is what a new user follows: its option reference and its CI command must match the product."""

from __future__ import annotations

import subprocess
from pathlib import Path

from distillkit.cli.reference import options_markdown, readme_block

ROOT = Path(__file__).resolve().parents[1]


def test_every_option_of_every_subcommand_is_in_the_readme_reference():
    block = readme_block((ROOT / "README.md").read_text())
    assert block is not None, "README.md lost its option-reference markers"
    assert block.strip() == options_markdown().strip(), "run: python -m distillkit.cli.reference --write README.md"


def test_the_reference_lists_every_option_with_its_help():
    text = options_markdown()
    for needle in ("--damp", "--symmetric", "--opset", "--dtype", "--decode-tokens", "--eval-samples"):
        assert f"`{needle}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 150
    assert all(not line.rstrip().endswith("|  |") for line in rows), "an option without --help text"


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    after = readme.split("**Set up and pass the tests**", 1)[1]
    command = after.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert "python3 -m venv .venv" in command and "python -m pytest" in command
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in command  # the CPU torch build, anywhere
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run takes the command out of README.md with this awk program; run it and compare
    awk = ci.split("cmd=$(", 1)[1].split(" README.md)", 1)[0]
    extracted = subprocess.run(["bash", "-c", f"{awk} README.md"], cwd=ROOT, capture_output=True, text=True).stdout
    assert extracted.strip() == command.strip()
