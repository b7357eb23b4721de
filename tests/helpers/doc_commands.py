"""The shell commands that README.md and docs/training.md show in ```bash blocks, and what the tests do
with each: run it here with the replacements that fit this machine (tests/e2e/test_readme.py), or skip
it for the reason given. tests/unit/test_readme_commands.py holds the docs and this plan to each other,
so a command added to, changed in or dropped from the docs fails until the plan says what to do."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/training.md")


@dataclass(frozen=True)
class Run:
    """Run the command from a directory that links the checkout's configs/, ffscale/ and scripts/,
    each documented text in `replace` swapped for what fits a 2-core host without GPUs."""

    name: str
    replace: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    why: str


FF_TINY = "ffscale train --nproc 8 --config configs/ff_tiny.yaml"
PLAN: dict[str, Run | Skip] = {
    # README.md
    "bash scripts/demo.sh": Skip(
        "creates .venv, installs Debian's dataset and trains the whole demo (minutes): "
        "`ffscale bench demo --record` runs it in a fresh clone (docs/results/demo.json)"
    ),
    "bash scripts/test.sh": Skip("it runs this suite"),
    FF_TINY: Run("ff_tiny", {"--nproc 8": "--nproc 2"}),
    "ffscale shard cluttered-fashion-mnist --out data/cluttered-fashion-mnist": Run("cluttered"),
    "ffscale train --nproc 2 --config configs/table1_small.yaml": Run("table1_small"),
    "bash scripts/table1_small.sh": Skip("the whole matrix, 3 seeds of each config (hours on a CPU)"),
    # docs/training.md
    ". .venv/bin/activate": Skip("the suite runs inside the virtual environment"),
    "ffscale train --nproc 8 --config configs/ff_tiny.yaml data.train=/data/shards/train "
    "data.val=/data/shards/val": Run("ff_tiny", {"--nproc 8": "--nproc 2"}),
    "deepspeed --num_gpus 8 ffscale/train.py --config configs/ff_tiny.yaml deepspeed.zero_stage=3": Skip(
        "tests/e2e/test_train.py's reference pipeline (ZeRO-2, then ZeRO-3) launches through this command "
        "(helpers/launch.py launch_cmd with runner: `deepspeed --num_gpus 2 ffscale/train.py ...`)"
    ),
    "ffscale train --nproc 8 --nnodes 4 --node-rank $RANK --master-addr node0 --config configs/ff_tiny.yaml": Skip(
        "two nodes of `ffscale train` on this machine run in tests/e2e/test_nodes.py (helpers/launch.py "
        "node_cmd, these flags: tests/unit/test_readme_commands.py)"
    ),
    "printf 'node%d slots=8\\n' 0 1 2 3 > hosts": Run("hostfile"),
    "deepspeed --hostfile hosts --no_ssh --node_rank $RANK --master_addr node0 --num_nodes 4 --num_gpus 8 "
    "ffscale/train.py --config configs/ff_tiny.yaml": Run(
        "two_nodes",
        {
            "--master_addr node0": "--master_addr 127.0.0.1",
            "--num_nodes 4": "--num_nodes 2",
            "--num_gpus 8": "--num_gpus 1",
        },
    ),
    "deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 ffscale/train.py --config configs/ff_tiny.yaml": Skip(
        "needs passwordless ssh to every node in the hostfile (none here)"
    ),
    "ffscale doctor --config configs/ff_base.yaml --json doctor.json": Skip(
        "tests/e2e/test_doctor.py runs this command on configs/demo.yaml and the tests' shards"
    ),
    "ffscale import linear-tiny-checkpoint.pth --out models/ff-tiny-paper data.val=/data/imagenet/shards/val": Skip(
        "the paper's released checkpoint and ImageNet (not here, offline): scripts/gpu_check.sh runs them "
        "given PAPER_CHECKPOINTS and IMAGENET_VAL; tests/integration/test_import.py imports that layout"
    ),
    "ffscale eval --run models/ff-tiny-paper": Skip(
        "evaluates the import above on ImageNet (scripts/gpu_check.sh)"
    ),
    "ffscale predict --model models/ff-tiny-paper cat.jpg": Skip(
        "reads the import above (scripts/gpu_check.sh)"
    ),
    "ffscale register models/ff-tiny-paper --name ff-tiny-paper --uri http://mlflow.example.com:5000": Skip(
        "needs the import above and a tracking server at that address; tests/e2e/test_register.py registers"
    ),
    "ffscale predict --model models:/ff-tiny-paper/1 cat.jpg": Skip("reads the registered model above"),
}


def documented(docs: tuple[str, ...] = DOCS) -> list[tuple[str, int, str]]:
    """(file, line number, command) of every command in a ```bash block, a trailing `# comment` dropped,
    lines continued with a backslash joined, a here-document's body left out, in the order shown."""
    out = []
    for doc in docs:
        inside, heredoc, pending = False, None, ""
        for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            if line.startswith("```"):
                inside = line.strip() == "```bash" if not inside else False
                continue
            if not inside:
                continue
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command.endswith("\\"):
                pending += command[:-1].strip() + " "
                continue
            command, pending = pending + command, ""
            if command and not command.startswith("#"):
                out.append((doc, n, command))
                marker = re.search(r"<<-?\s*'?(\w+)'?", command)
                heredoc = marker.group(1) if marker else None
    return out


def runnable(command: str) -> str:
    """The command as it runs here: the plan's replacements made (each must be found)."""
    plan = PLAN[command]
    assert isinstance(plan, Run), command
    for old, new in plan.replace.items():
        assert old in command, f"{old!r} is no longer in {command!r}"
        command = command.replace(old, new)
    return command


def runs(name: str) -> list[str]:
    """The documented commands the plan runs under `name` (one or more docs may show the same)."""
    return [c for c, p in PLAN.items() if isinstance(p, Run) and p.name == name]
