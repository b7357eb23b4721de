"""Each config key is documented once, at its field (ffscale/config.py), and docs/config.md and the
resume-change policy (ffscale/run/changes.py) are checked against the fields."""

import dataclasses

from ffscale import config
from ffscale.run import changes
from ffscale.tools import config_ref


def test_docs_config_md_is_what_the_fields_generate():
    # a field added, renamed or redocumented without `python -m ffscale.tools.config_ref --write` fails here
    assert config_ref.DOC.read_text() == config_ref.render(), (
        "run: python -m ffscale.tools.config_ref --write"
    )


def test_every_key_has_a_docstring_at_its_field():
    undocumented = [key for key, *_, text in config_ref.keys() if not text]
    assert not undocumented, f"fields without a docstring under them in ffscale/config.py: {undocumented}"
    sections = [name for name, _ in config_ref.sections()]
    assert sections == [
        "model",
        "data",
        "optim",
        "schedule",
        "deepspeed",
        "checkpoint",
        "distill",
        "run",
        "tracking",
    ]


def test_every_key_has_one_resume_policy_and_every_policy_entry_names_a_key():
    keys = [key for key, *_ in config_ref.keys()]
    for listed in (changes.FREE, changes.FIXED):
        for entry in listed:  # a renamed or removed field leaves no stale entry behind
            assert any(changes._matches(k, (entry,)) for k in keys), f"{entry!r} matches no config key"
        for key in keys:  # each key is named once per list: by itself or by one section prefix
            assert sum(changes._matches(key, (e,)) for e in listed) <= 1, key
    policies = {key: changes.policy(key) for key in keys}
    assert set(policies.values()) == {"free", "fixed", "allow", "ignored"}
    # what pending() compares is exactly what is not "ignored"
    stage = config.stages(config.load())[0]
    compared = {".".join(k.split(".")[:2]) for k in changes.flat(stage, config.RunCfg())}
    assert {k for k, p in policies.items() if p != "ignored"} == compared | {"deepspeed.extra"}
    assert changes.policy("model.compile") == "free" and changes.policy("model.dim") == "fixed"
    assert changes.policy("optim.base_lr") == "allow" and changes.policy("tracking.uri") == "ignored"


def test_the_reference_shows_defaults_as_yaml_writes_them():
    rows = {key: default for key, _, default, *_ in config_ref.keys()}
    assert rows["model.num_classes"] == "null" and rows["model.carry_token_mlp"] == "true"
    assert rows["optim.base_lr"] == "0.0005" and rows["schedule.warmup_lr"] == "1e-06"
    assert rows["data.scale"] == "[0.08, 1.0]" and rows["deepspeed.extra"] == "{}"
    assert len(rows) == sum(len(dataclasses.fields(c)) for _, c in config_ref.sections()) + 2
