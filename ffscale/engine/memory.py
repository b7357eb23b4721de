"""Memory: model states measured on a live engine, activations measured per image, and the table
that extrapolates both to GPU clusters (checked against DeepSpeed's own estimators)."""

from __future__ import annotations

import gc

import torch

GIB = 2**30


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage behind `tensors` (views count once)."""
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                st = t.untyped_storage()
                if st.nbytes():
                    out[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):  # torch.compile's fake tensors hold no memory
                continue
    return out


def live_tensors() -> list[torch.Tensor]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def model_state_bytes(engine, exclude: tuple[torch.Tensor, ...] = ()) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients, optimizer (fp32 masters + Adam moments) and
    DeepSpeed's working buffers (ZeRO buckets, gradient partitions), measured as the distinct storages
    of every live tensor. Call it between backward and step, when gradients exist."""
    ds = engine.ds
    params = [getattr(p, "ds_tensor", p) for p in ds.module.parameters()]  # ZeRO-3: this rank's part
    inner = getattr(ds.optimizer, "optimizer", ds.optimizer)  # ZeRO wraps the torch optimizer
    masters = [p for g in inner.param_groups for p in g["params"]]
    moments = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    grads = [p.grad for p in [*ds.module.parameters(), *masters] if p.grad is not None]
    p_st = _storages(params)
    o_st = {k: v for k, v in _storages(masters + moments).items() if k not in p_st}  # ZeRO-0: same tensors
    g_st = {k: v for k, v in _storages(grads).items() if k not in p_st and k not in o_st}
    skip = _storages(exclude)
    every = {**_storages(live_tensors()), **g_st}  # .grad may have no Python object until touched
    total = {k: v for k, v in every.items() if k not in skip}
    out = {"params": sum(p_st.values()), "grads": sum(g_st.values()), "optimizer": sum(o_st.values())}
    out["zero_buffers"] = max(0, sum(total.values()) - sum(out.values()))
    out["total"] = sum(total.values())
    return out


def activation_bytes_per_image(model: torch.nn.Module, img_size: int, batch: int = 2) -> int:
    """Bytes autograd saves for backward in one training forward, per image (fp32)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen.update(_storages([t]))
        return t

    params = _storages(model.parameters())
    model.train()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(v for k, v in seen.items() if k not in params) // batch


def mixed_bytes_per_param(stage: int, n: int, params: int, largest_layer: int) -> float:
    """bf16/fp16 + fp32 Adam per GPU. ZeRO-2/3 from DeepSpeed's estimators (no offload); ZeRO-0/1 from
    the ZeRO paper's 2 + 2 + 12 accounting."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 0:
        return 16
    if stage == 1:
        return 4 + 12 / n
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(params, n, 1, cpu_offload=False)[1] / params
    return estimate_zero3_model_states_mem_needs(params, largest_layer, n, 1, cpu_offload=False)[1] / params


def cluster_table(
    models: list[str], img_size: int = 224, gpus=(8, 64, 512), hbm_gib: float = 80
) -> list[dict]:
    """Per-GPU model states for each ZeRO stage and GPU count, and the largest bf16 micro-batch that
    fits `hbm_gib` (90% usable) with and without activation checkpointing."""
    from ffscale.models import create_model

    rows = []
    for name in models:
        m = create_model(name, img_size=img_size)
        params = sum(p.numel() for p in m.parameters())
        largest = max(p.numel() for p in m.parameters())
        act = activation_bytes_per_image(m, img_size) / 2  # bf16 activations: half of fp32
        # checkpointing keeps block inputs, plus one block's activations while it is recomputed
        kept = activation_bytes_per_image(create_model(name, img_size=img_size, grad_ckpt=True), img_size) / 2
        act_ckpt = kept + act / len(m.blocks)
        for n in gpus:
            for stage in (0, 1, 2, 3):
                states = mixed_bytes_per_param(stage, n, params, largest) * params
                free = hbm_gib * GIB * 0.9 - states
                rows.append(
                    {
                        "model": name,
                        "params_m": params / 1e6,
                        "gpus": n,
                        "zero": stage,
                        "states_gib": states / GIB,
                        "act_mib_per_img": act / 2**20,
                        "max_batch": max(0, int(free // act)),
                        "max_batch_ckpt": max(0, int(free // act_ckpt)),
                    }
                )
    return rows
