"""Checkpoints on shared storage: damaged files are found before anything loads them, an older
intact checkpoint is resumed instead, planted pickles and other versions stop with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ffscale.engine import checkpoint as ck
from ffscale.engine import ckpt_files
from ffscale.errors import CheckpointDamaged, CheckpointMismatch, UntrustedFile


def _write(ckpt_dir: Path, step: int, **meta) -> Path:
    """A checkpoint as ffscale writes one: torch files, then ffscale.json listing them."""
    root = ckpt_dir / f"step{step}"
    root.mkdir(parents=True)
    files = {}
    for name, n in (
        ("mp_rank_00_model_states.pt", 1000),
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 3000),
    ):
        torch.save({"module": {"w": torch.full((n,), float(step))}, "global_steps": step}, root / name)
        files |= ckpt_files.record(root / name, root)
    (root / ck.META).write_text(json.dumps({"format": ck.FORMAT, **ck.versions(), "files": files, **meta}))
    return root


class Planted:
    """A pickle that runs a command when loaded with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_older_one_resumed(tmp_path, capsys):
    for step in (100, 200, 300):
        _write(tmp_path, step)
    f = tmp_path / "step300" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[:5000])  # the node died while the storage still cached the file
    assert ck.select(tmp_path, 0, 1) == "step200" == ck.latest_tag(tmp_path)
    out = capsys.readouterr().out
    assert "step300 is damaged (zero_pp_rank_0_mp_rank_00_optim_states.pt: 5,000 bytes," in out
    assert "moved to step300.damaged-" in out and "resuming from" in out
    (aside,) = tmp_path.glob("step300.damaged-*")
    assert (aside / ck.META).is_file()  # kept for a look, never deleted
    g = tmp_path / "step200" / "mp_rank_00_model_states.pt"  # same size, other bytes: the hash says
    data = bytearray(g.read_bytes())
    data[-40] ^= 0xFF
    g.write_bytes(bytes(data))
    assert ck.select(tmp_path, 0, 1) == "step100"
    assert "sha256 differs" in capsys.readouterr().out


def test_when_every_checkpoint_is_damaged_resume_stops_naming_them(tmp_path):
    """Nothing is moved then, so a rerun (the storage back, or not) meets the same checkpoints and
    never starts the stage afresh over them."""
    for step in (100, 200):
        (_write(tmp_path, step) / "mp_rank_00_model_states.pt").unlink()
    for _ in range(2):
        with pytest.raises(
            CheckpointDamaged,
            match=r"no intact checkpoint .*step200: mp_rank_00_model_states.pt: missing; step100",
        ):
            ck.select(tmp_path, 0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step100", "step200"]
    for step in (100, 200):  # set aside by an earlier resume: still no fresh start
        (tmp_path / f"step{step}").rename(tmp_path / f"step{step}.damaged-20261203T000000")
    with pytest.raises(
        CheckpointDamaged, match=r"only step100.damaged-\S+, step200.damaged-\S+ \(set aside\) remain"
    ):
        ck.select(tmp_path, 0, 1)


def test_a_planted_pickle_stops_the_resume_and_runs_nothing(tmp_path):
    root = _write(tmp_path, 100)
    marker = tmp_path / "pwned"
    target = root / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": Planted(marker)}, target)
    meta = json.loads((root / ck.META).read_text())  # whoever planted it also rewrote the record
    meta["files"] |= ckpt_files.record(target, root)
    (root / ck.META).write_text(json.dumps(meta))
    with pytest.raises(UntrustedFile, match=r"mp_rank_00_model_states.pt: the pickle holds posix.system"):
        ck.select(tmp_path, 0, 1)
    assert not marker.exists() and root.is_dir()
    from ffscale.engine.ckpt_engine import SafeCheckpointEngine

    engine = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    with pytest.raises(UntrustedFile, match="posix.system"):  # DeepSpeed's own loads go through this
        engine.load(str(target))
    assert not marker.exists()


def test_a_checkpoint_of_another_deepspeed_or_torch_stops_with_one_line(tmp_path):
    here = ck.versions()
    assert ck.incompatible({**here, "deepspeed": here["deepspeed"].rsplit(".", 1)[0] + ".99"}) is None
    _write(tmp_path, 100, deepspeed="0.14.4")
    with pytest.raises(CheckpointMismatch, match=r"step100: deepspeed 0.14.4 wrote it, this is deepspeed"):
        ck.select(tmp_path, 0, 1)
    assert ck.incompatible({**here, "torch": "1.13.1"}).startswith("torch 1.13.1 wrote it")
    assert "newer checkpoint format" in ck.incompatible({**here, "format": ck.FORMAT + 1})
    format1 = {"world_size": 2, "zero_stage": 2, "params": {}}  # no versions, no files: no longer read
    assert "checkpoint format 1" in ck.incompatible(format1)


def test_ffscale_verify_checks_a_runs_checkpoints_as_a_resume_would(tmp_path, capsys):
    from ffscale.cli import main

    stage = tmp_path / "run" / "train" / "checkpoints"
    for step in (100, 200):
        _write(stage, step)
    assert main(["verify", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.count("2 files, 0.0 MiB, sizes and sha256 as recorded") == 2
    f = stage / "step200" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["verify", str(tmp_path / "run")]) == 2
    assert "step200: DAMAGED: mp_rank_00_model_states.pt: 100 bytes" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2

    # a run killed while writing its first checkpoint, and one killed before any: listed, not errors
    first = tmp_path / "first" / "train" / "checkpoints" / "step8"
    first.mkdir(parents=True)
    (tmp_path / "first" / "config.yaml").write_text("{}")
    assert main(["verify", str(tmp_path / "first")]) == 0
    assert "step8: incomplete (no ffscale.json: a write that was interrupted)" in capsys.readouterr().out
    (tmp_path / "none" / "train").mkdir(parents=True)
    (tmp_path / "none" / "config.yaml").write_text("{}")
    assert main(["verify", str(tmp_path / "none")]) == 0
    assert "a run without checkpoints yet" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "none" / "train")]) == 0  # its stage directory too
    (tmp_path / "plain").mkdir()
    assert main(["verify", str(tmp_path / "plain")]) == 2  # neither shards nor a run


def test_the_checkpointer_holds_the_checkpoint_it_chose_and_decides_when_to_save(tmp_path):
    """Chosen once at start: a checkpoint written later on the disk is not the one this run resumes.
    Saves follow the cadence, and a step already saved is never saved again."""
    from ffscale.config import CheckpointCfg
    from ffscale.engine.checkpointer import Checkpointer
    from ffscale.util.cadence import itstime

    for step in (100, 200):
        _write(tmp_path, step, world_size=2, zero_stage=2)
    ckpt = Checkpointer(tmp_path, CheckpointCfg(every_steps=50, every_epochs=2), epochs=5, rank=0, world=1)
    assert ckpt.last == tmp_path / "step200" and ckpt.needs_reshard  # 2 ranks' ZeRO-2 shards, 1 rank here
    _write(tmp_path, 300)
    assert ckpt.last == tmp_path / "step200"
    ckpt.saved_step = 200  # as loading it leaves it
    assert not ckpt.maybe_save(200, "stop")  # already saved at this step
    assert not ckpt.maybe_save(201, "step") and not ckpt.maybe_save(201, "epoch", epoch=3)
    with pytest.raises(ValueError, match="reason 'later'"):
        ckpt.maybe_save(201, "later")
    assert [epoch for epoch in range(1, 6) if itstime(epoch, 2, last=5)] == [2, 4, 5]
    assert not itstime(7, 0) and itstime(150, 50)
