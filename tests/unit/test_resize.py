"""Carrying an FF-only model to another image size (pipeline stages): token MLPs resampled on the
patch grid, heads re-initialised for other classes, the same function at the same size. That the
carried model stays useful is trained and measured in tests/e2e/test_resize_carry.py."""

import pytest
import torch

from ffscale.models import create_model
from ffscale.models.resize import adapt_state_dict


def small(size: int, classes: int = 10):
    return create_model(
        "ff_tiny", img_size=size, patch_size=7, dim=64, depth=3, num_classes=classes, drop_path=0
    )


@pytest.fixture(scope="module")
def ff28():
    """A model with weights of its own (these tests need no training: shapes and identities)."""
    torch.manual_seed(0)
    return small(28)


def test_head_reinitialised_when_classes_change_and_shapes_checked(ff28):
    other = small(28, classes=3)
    state = adapt_state_dict(ff28.state_dict(), other, log=lambda m: None)
    assert state["head.weight"].shape == (3, 64)
    assert torch.equal(
        state["blocks.0.mlp_tokens.fc1.weight"], ff28.state_dict()["blocks.0.mlp_tokens.fc1.weight"]
    )
    vit = create_model("vit_tiny", img_size=28, patch_size=7, dim=64, depth=3, num_classes=10, heads=2)
    with pytest.raises(ValueError, match="another architecture|do not fit"):
        adapt_state_dict(ff28.state_dict(), vit, log=lambda m: None)


def test_carry_is_function_preserving_for_the_same_size(ff28):
    same = small(28)
    same.load_state_dict(adapt_state_dict(ff28.state_dict(), same, log=lambda m: None))
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(same.eval()(x), ff28.eval()(x))


def test_resuming_a_checkpoint_of_another_model_names_the_tensor(tmp_path):
    import json

    from ffscale.engine.checkpoint import CheckpointMismatch, check_model, meta_of, model_signature

    old = create_model("ff_tiny", img_size=28, patch_size=7, dim=32, depth=2, num_classes=10)
    (tmp_path / "step8").mkdir()
    (tmp_path / "step8" / "ffscale.json").write_text(json.dumps({"params": model_signature(old)}))
    record = meta_of(tmp_path, "step8")  # read once, as the Checkpointer holds it
    check_model(record, tmp_path / "step8", old)  # the same model resumes
    new = create_model("ff_tiny", img_size=35, patch_size=7, dim=32, depth=2, num_classes=10)
    with pytest.raises(
        CheckpointMismatch, match=r"step8 holds another model: blocks\.0\.mlp_tokens\.fc1\.bias"
    ):
        check_model(record, tmp_path / "step8", new)
