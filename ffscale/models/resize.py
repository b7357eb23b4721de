"""Carry weights into a model of another image size or class count (between pipeline stages).

- head: re-initialised when the class count changes (the model's own init is kept);
- pos_embed: the patch grid is resampled bicubically, cls kept (DeiT's fine-tune-at-384 method);
- the distillation token (DeiT's `dist_token`, `head_dist`) is one more prefix token: carried with
  the cls token; dropped for a model without one; for a model with one from weights without, it
  starts as a copy of the cls token, its position and head (so both heads agree at first);
- FF token MLP (the paper's model only works at its training sequence length): the token axis is
  prefix entries (cls, dist) plus an HxW grid, so every tensor indexed by token is resampled on
  that grid, and a new prefix entry copies the cls entry (an input column of fc1 starts at zero, so
  no hidden unit changes):
    * norm2 weight/bias, fc2 weight rows and bias: resampled (an output per new token is the
      interpolation of its neighbours' outputs);
    * fc1 weight columns: resampled and scaled by (H*W)/(H'*W'), so a hidden unit's pre-activation
      on an upsampled image equals its value on the original image;
    * hidden width 4*T -> 4*T': the old hidden units are kept; extra new units keep their random
      fc1 rows but get zero fc2 columns, so the carried model computes the same function at first;
      when the new width is smaller, the units with the largest fc2 columns are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


def _resample_tokens(
    t: torch.Tensor, dim: int, new_tokens: int, prefix: tuple[int, int] = (1, 1), zero_new: bool = False
) -> torch.Tensor:
    """Resample axis `dim` of t, `prefix[0]` prefix entries (cls, dist) + a square grid, to
    `new_tokens` entries, `prefix[1]` prefix entries + a new grid. Prefix entries are kept; a new
    one copies the cls entry (or is zero: `zero_new`)."""
    (p0, p1), old = prefix, t.shape[dim]
    if old == new_tokens and p0 == p1:
        return t
    g0, g1 = math.isqrt(old - p0), math.isqrt(new_tokens - p1)
    if g0 * g0 != old - p0 or g1 * g1 != new_tokens - p1:
        raise ValueError(
            f"token counts {old} -> {new_tokens} are not {p0} / {p1} prefix tokens + square grids"
        )
    t = t.movedim(dim, -1)
    lead = t.shape[:-1]
    pre, grid = t[..., :p0], t[..., p0:]
    if g0 != g1:
        grid = grid.reshape(-1, 1, g0, g0).float()
        grid = F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
        grid = grid.reshape(*lead, g1 * g1).to(t.dtype)
    if p1 > p0:
        new = torch.zeros_like(pre[..., :1]) if zero_new else pre[..., :1]
        pre = torch.cat([pre, *[new] * (p1 - p0)], dim=-1)
    return torch.cat([pre[..., :p1], grid], dim=-1).movedim(-1, dim)


def _fit_hidden(w1, b1, w2, new1, new_b1, new2):
    """Match the token-MLP hidden width: keep old units, add silent ones or drop the weakest."""
    h_old, h_new = w1.shape[0], new1.shape[0]
    if h_new >= h_old:
        w1 = torch.cat([w1, new1[h_old:]], 0)
        b1 = torch.cat([b1, new_b1[h_old:]], 0)
        w2 = torch.cat([w2, torch.zeros(w2.shape[0], h_new - h_old, dtype=w2.dtype, device=w2.device)], 1)
    else:
        keep = w2.norm(dim=0).topk(h_new).indices.sort().values
        w1, b1, w2 = w1[keep], b1[keep], w2[:, keep]
    return w1, b1, w2


def _with_dist_token(state: dict, target: dict, log: Callable[[str], None]) -> dict:
    """Weights without a distillation token, for a model with one: the token and its head start as
    copies of the cls token and head (its position and token-MLP entries: `_resample_tokens`)."""
    log("weights: dist_token and head_dist start as copies of cls_token and head (the weights have none)")
    extra = {"dist_token": state["cls_token"]}
    extra.update({k.replace("head.", "head_dist.", 1): v for k, v in state.items() if k.startswith("head.")})
    return {**state, **{k: v.clone() for k, v in extra.items() if k in target}}


def _token_mixing(key: str) -> bool:
    return ".mlp_tokens." in key or ".norm2." in key


def adapt_state_dict(
    state: dict, model: nn.Module, log: Callable[[str], None] = print, carry_token_mlp: bool = True
) -> dict:
    """Return `state` reshaped to fit `model`; logs what was changed. With carry_token_mlp=False,
    FF token MLPs of another sequence length keep the model's fresh init instead (the baseline)."""
    target = model.state_dict()
    out = {}
    tokens = getattr(model, "num_tokens", None)
    prefix = (2 if "dist_token" in state else 1, getattr(model, "num_prefix_tokens", 1))
    state = _with_dist_token(state, target, log) if prefix[1] > prefix[0] else state
    for k, v in state.items():
        if not carry_token_mlp and _token_mixing(k) and k in target and v.shape != target[k].shape:
            out[k] = target[k]
            continue
        if k not in target:
            log(f"weights: dropping {k} (not in this model)")
            continue
        want = target[k].shape
        if k.startswith(("head.", "head_dist.")) and v.shape != want:
            log(f"weights: {k} {tuple(v.shape)} -> re-initialised {tuple(want)} (class count changed)")
            out[k] = target[k]
            continue
        if k == "pos_embed" and (v.shape != want or prefix[0] != prefix[1]):
            log(f"weights: pos_embed {v.shape[1]} -> {want[1]} tokens (bicubic)")
            v = _resample_tokens(v, 1, want[1], prefix)
        out[k] = v
    # FF token MLPs: resample every token-indexed tensor on the grid.
    for k in [k for k in out if k.endswith("mlp_tokens.fc1.weight")]:
        pre = k[: -len("fc1.weight")]
        norm = pre.replace("mlp_tokens.", "norm2.")
        w1, b1 = out[pre + "fc1.weight"], out[pre + "fc1.bias"]
        w2, b2 = out[pre + "fc2.weight"], out[pre + "fc2.bias"]
        old_t = w1.shape[1]
        if old_t == tokens and w1.shape == target[pre + "fc1.weight"].shape and prefix[0] == prefix[1]:
            continue
        scale = (old_t - prefix[0]) / (tokens - prefix[1])
        w1 = _resample_tokens(w1, 1, tokens, prefix, zero_new=True)
        w1[:, prefix[1] :] *= scale
        w2 = _resample_tokens(w2, 0, tokens, prefix)
        b2 = _resample_tokens(b2, 0, tokens, prefix)
        w1, b1, w2 = _fit_hidden(
            w1, b1, w2, target[pre + "fc1.weight"], target[pre + "fc1.bias"], target[pre + "fc2.weight"]
        )
        out.update(
            {pre + "fc1.weight": w1, pre + "fc1.bias": b1, pre + "fc2.weight": w2, pre + "fc2.bias": b2}
        )
        for n in ("weight", "bias"):
            out[f"{norm}{n}"] = _resample_tokens(out[f"{norm}{n}"], 0, tokens, prefix)
        if pre.startswith("blocks.0."):
            log(f"weights: token MLPs carried {old_t} -> {tokens} tokens (grid resampling)")
    bad = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in out.items() if v.shape != target[k].shape}
    if bad:
        k, (a, b) = next(iter(bad.items()))
        raise ValueError(f"weights do not fit this model: {k} is {a}, model wants {b} ({len(bad)} such)")
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(
            f"weights lack {len(missing)} tensor(s) of this model, e.g. {missing[0]}: another architecture?"
        )
    return out
