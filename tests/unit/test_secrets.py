"""One redaction for everything ffscale writes or prints (ffscale/util/secrets.py)."""

from __future__ import annotations

import argparse

import pytest

from ffscale import config as C
from ffscale.errors import ConfigError
from ffscale.util.secrets import MASK, redact, scrub


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("https://mlflow.example.com/?token=abc123&x=1", "https://mlflow.example.com/?token=***&x=1"),
        ("s3://b/k?X-Amz-Signature=ff00&sig=aa", "s3://b/k?X-Amz-Signature=***&sig=***"),
        ("host=db password=hunter2 dbname=m", "host=db password=*** dbname=m"),
        ("tracking.uri=http://u:p@h:5000 model.token_hidden=384", "tracking.uri=http://***@h:5000 model.token_hidden=384"),
        ("http://***@h", "http://***@h"),
    ],
)  # fmt: skip
def test_credentials_in_uris_queries_and_keywords_are_masked_once(text, want):
    assert redact(text) == want and redact(want) == want


def test_credential_variables_are_masked_wherever_they_appear_but_not_the_working_directory(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-value-1")
    monkeypatch.setenv("PWD", "/home/user/project")
    assert (
        redact("login with s3cr3t-value-1 in /home/user/project")
        == f"login with {MASK} in /home/user/project"
    )
    assert scrub({"tracking": {"api_key": "k", "uri": "http://a:b@h"}, "model": {"token_hidden": 384}}) == {
        "tracking": {"api_key": MASK, "uri": "http://***@h"},
        "model": {"token_hidden": 384},
    }


def test_config_yaml_carries_no_credential_and_render_refuses_one(tmp_path):
    from ffscale.tools import cluster

    cfg = C.load(None, ["tracking.uri=https://u:canary-1234@mlflow.example.com?token=canary-5678"])
    text = C.to_yaml(cfg)
    assert "canary" not in text and "https://***@mlflow.example.com?token=***" in text
    C.save(cfg, tmp_path / "config.yaml")
    assert "canary" not in (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        cluster.render(cfg, text, cluster.ClusterOpts(nodes=1, gpus_per_node=8))
    assert "tracking.uri holds a credential" in str(e.value) and "canary" not in str(e.value)


def test_train_hands_a_credential_uri_to_the_ranks_in_the_environment_not_the_command_line():
    from ffscale.cli.train import _uri_to_env

    a = argparse.Namespace(overrides=["run.name=x", "tracking.uri=http://u:pw-canary@h:5000"])
    env: dict = {}
    _uri_to_env(a, env)
    assert a.overrides == ["run.name=x", "tracking.uri=null"]
    assert env["MLFLOW_TRACKING_URI"] == "http://u:pw-canary@h:5000"
