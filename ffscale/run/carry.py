"""A stage's starting weights held to its model before any rank starts (the job's preflight).

An earlier stage's weights do not exist until it finishes, so both models are built from their
stages' configs on the meta device (shapes only: no initialisation) and the earlier one's state dict
goes through the carry rules that will load it (ffscale/models/resize.py, `adapt_state_dict`). The
rules run on uninitialised CPU storage of those shapes (`torch.empty`: pages never written are never
committed), not on meta tensors: torch runs meta `cat`, `interpolate` and `empty_like` through Python
references that import torch._dynamo and sympy, seconds before launch. A mismatch (a ViT's
weights into an FF model, say) is one line naming the stage, the first differing tensor and the
fix, exit 2, instead of a traceback on every rank once the earlier stage has trained. torch is
imported only for a pipeline that carries weights between its stages.
"""

from __future__ import annotations

from ffscale import config
from ffscale.data.manifest import load_manifest
from ffscale.errors import ConfigError


def carried_pairs(pipeline: list[config.Stage]) -> list[tuple[config.Stage, config.Stage]]:
    """(earlier stage, stage starting from its weights) for every stage that carries weights."""
    by_name = {s.name: s for s in pipeline}
    pairs = []
    for i, stage in enumerate(pipeline):
        kind, ref = config.starting_weights(stage.cfg, [s.name for s in pipeline[:i]])
        if kind == "stage":
            pairs.append((by_name[ref], stage))
    return pairs


def check(pipeline: list[config.Stage]) -> None:
    """Every stage's starting weights, when an earlier stage's, fit its model; one line, exit 2."""
    for source, stage in carried_pairs(pipeline):
        problem = _misfit(source.cfg, stage.cfg)
        if problem:
            how = f"init_from={source.name}" if stage.cfg.init_from else "by default, the previous stage's"
            raise ConfigError(
                f"stages.{stage.name}: its starting weights ({how}: stage {source.name}, "
                f"{source.cfg.model.name}) do not fit its model ({stage.cfg.model.name}): {problem}; set "
                f"stages.{stage.name}.init_from=scratch to train it from scratch"
            )


def _misfit(source: config.StageCfg, target: config.StageCfg) -> str | None:
    """What keeps `source`'s weights from loading into `target`'s model, None when they fit."""
    import torch

    from ffscale.inference.build import build_model
    from ffscale.models.resize import adapt_state_dict

    with torch.device("meta"):
        earlier = build_model(source, _num_classes(source))
        model = build_model(target, _num_classes(target))
    weights = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in earlier.state_dict().items()}
    model.load_state_dict(
        {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}, assign=True
    )
    try:
        adapt_state_dict(weights, model, lambda _: None, target.model.carry_token_mlp)
    except ValueError as e:
        return str(e).removeprefix("weights do not fit this model: ")
    return None


def _num_classes(stage_cfg: config.StageCfg) -> int:
    return stage_cfg.model.num_classes or load_manifest(stage_cfg.data.train)[0].num_classes
