"""README.md's and docs/training.md's commands are each run or skipped with a reason
(tests/helpers/doc_commands.py; tests/e2e/test_readme.py runs them), and every `ffscale` command they
show, and every one in the other docs and cluster/README.md, parses with ffscale's own parser."""

import shlex

import pytest
from helpers import doc_commands
from helpers.doc_commands import PLAN, ROOT, Run, documented

from ffscale.cli import build_parser


def test_every_documented_command_is_in_the_plan_and_every_planned_one_is_documented():
    shown = [command for _, _, command in documented()]
    unplanned = [f"{doc}:{n}: {c}" for doc, n, c in documented() if c not in PLAN]
    assert not unplanned, (
        "add these to tests/helpers/doc_commands.py PLAN (run or skip, and why):\n" + "\n".join(unplanned)
    )
    assert not [c for c in PLAN if c not in shown], "PLAN names commands the docs no longer show"
    for command, plan in PLAN.items():
        if isinstance(plan, Run):
            doc_commands.runnable(command)  # every replacement still finds its text


def test_every_documented_script_and_config_exists():
    for command in PLAN:
        for word in shlex.split(command):
            if word.startswith(("scripts/", "configs/")) or word == "ffscale/train.py":
                assert (ROOT / word).is_file(), f"{command}: {word} does not exist"


def test_the_multi_node_ffscale_command_is_the_one_test_nodes_runs():
    from helpers.launch import node_cmd

    (command,) = [c for c in PLAN if "--nnodes" in c]
    documented_args = vars(build_parser().parse_args(shlex.split(command.replace("$RANK", "1"))[1:]))
    tested = vars(build_parser().parse_args(node_cmd(1, 29500, ["--config", "configs/ff_tiny.yaml"])[1:]))
    keys = ("cmd", "nnodes", "node_rank", "config")
    assert {k: documented_args[k] for k in keys} == {**{k: tested[k] for k in keys}, "nnodes": 4}
    assert tested["nnodes"] == 2  # the same command with two nodes, node 0 at 127.0.0.1


def test_every_documented_training_command_names_a_config_that_loads():
    # the skipped launches too: their configs and overrides compose and validate (no torch, no launch)
    from ffscale import config

    for command in PLAN:
        words = shlex.split(command)
        if "train" in words[:2] or "ffscale/train.py" in words:
            files = [w for prev, w in zip(words, words[1:]) if prev == "--config"]
            config.load(
                [str(ROOT / f) for f in files], [w for w in words if "=" in w and not w.startswith("-")]
            )


def test_the_single_node_deepspeed_command_is_the_one_test_train_launches():
    from helpers.launch import launch_cmd

    (command,) = [c for c in PLAN if c.startswith("deepspeed --num_gpus")]
    tested = launch_cmd(["--config", "configs/ff_tiny.yaml"], nproc=2, runner=True)
    assert tested[0].endswith("/deepspeed") and tested[tested.index("--num_gpus") + 1] == "2"
    assert tested[-3].endswith("ffscale/train.py") and command.split()[:2] == ["deepspeed", "--num_gpus"]


EVERY_DOC = (
    "README.md",
    "cluster/README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
)
EVERYWHERE = [(doc, n, c) for doc, n, c in documented(EVERY_DOC) if c.startswith("ffscale ")]


@pytest.mark.parametrize("doc,line,command", EVERYWHERE, ids=[f"{d}:{n}" for d, n, _ in EVERYWHERE])
def test_every_ffscale_command_in_every_doc_parses(doc, line, command):
    # beyond README.md and docs/training.md nothing is run: a renamed command or flag still fails here
    args, extra = build_parser().parse_known_args(shlex.split(command.replace("$RANK", "0"))[1:])
    assert not [x for x in extra if "=" not in x], f"{doc}:{line}: {extra}"
    assert callable(args.fn)
