"""Our config -> a DeepSpeed config dict. Every knob DeepSpeed defaults surprisingly is written."""

from __future__ import annotations

import torch

from ffscale.config import StageCfg

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build(
    stage_cfg: StageCfg,
    world: int,
    accum: int,
    precision: str,
    n_params: int = 0,
    cuda: bool = True,
) -> dict:
    # no "scheduler": the engine sets each step's lr from ffscale/engine/lr.py (timm's schedule)
    cfg: dict = {
        "train_batch_size": stage_cfg.optim.global_batch,
        "train_micro_batch_size_per_gpu": stage_cfg.optim.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": stage_cfg.optim.clip_grad,  # DeepSpeed 0.19 defaults to 1.0; DeiT uses none
        "zero_optimization": zero(stage_cfg, n_params, cuda, zero_stage(stage_cfg, precision)),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        # Gradients accumulate over micro-batches in fp32 (DeepSpeed would add them up in the model's
        # bf16) and are reduced across ranks in deepspeed.comm_dtype (fp32 by default, as DDP with AMP
        # reduces DeiT's fp32 gradients; bf16 halves the bytes).
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = stage_cfg.deepspeed.comm_dtype
    return merge(cfg | offload(stage_cfg), dict(stage_cfg.deepspeed.extra))


def zero_stage(stage_cfg: StageCfg, precision: str) -> int:
    """The ZeRO stage DeepSpeed runs: ZeRO-0 in bf16 runs as ZeRO-1's bf16 optimizer. DeepSpeed's
    ZeRO-0 bf16 path steps one tensor at a time (FP16_UnfusedOptimizer, a host sync per tensor) and
    cannot accumulate gradients in fp32; ZeRO-1 on one rank partitions nothing, on N ranks it only
    splits the optimizer states (less memory, the same all-reduce volume)."""
    return (
        1 if stage_cfg.deepspeed.zero_stage == 0 and precision == "bf16" else stage_cfg.deepspeed.zero_stage
    )


def zero(stage_cfg: StageCfg, n_params: int = 0, cuda: bool = True, stage: int | None = None) -> dict:
    """ZeRO settings written out: buckets sized in MiB (never above a quarter of the model: DeepSpeed
    allocates them whole), overlap on, and CPU optimizer offload."""
    d = stage_cfg.deepspeed
    cap = n_params // 4 if n_params else 2**62

    def elems(mb: int) -> int:  # DeepSpeed counts elements, and wants buckets aligned for NCCL
        return max(256, min(int(mb * 2**20 // 4), cap) // 256 * 256)

    stage = d.zero_stage if stage is None else stage
    z: dict = {
        "stage": stage,
        "overlap_comm": True,
        # GPU: gradients copied into one buffer as produced, against allocator fragmentation. A CPU
        # has no such problem and the extra copy of every gradient cost 0.16 s of a 2.6 s ZeRO-2 step.
        "contiguous_gradients": cuda,
        "reduce_bucket_size": elems(d.bucket_mb),
        "allgather_bucket_size": elems(d.bucket_mb),
    }
    # compute_grad_norm stays on even without clipping: a non-finite norm is how ZeRO-1/2 skip a step
    # whose loss was NaN/inf on the device, which lets the engine read its NaN flag after the step is
    # queued instead of draining the GPU first. Its cost does not show in `ffscale bench train --zero
    # 0,2` (docs/performance.md, "Where the CPU step goes").
    if stage == 3:
        z |= {
            "stage3_prefetch_bucket_size": elems(d.prefetch_mb),
            "stage3_param_persistence_threshold": 10 * 2**10,  # tiny params (norms, biases) stay whole
            "stage3_max_live_parameters": elems(4 * d.prefetch_mb),
        }
    if d.offload_optimizer and stage > 0:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return z


def offload(stage_cfg: StageCfg) -> dict:
    # Our torch AdamW steps the offloaded states (DeepSpeed would otherwise insist on its JIT-built CPU Adam).
    return {"zero_force_ds_cpu_optimizer": False} if stage_cfg.deepspeed.offload_optimizer else {}


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def peak_lr(stage_cfg: StageCfg) -> float:
    return stage_cfg.optim.base_lr * stage_cfg.optim.global_batch / stage_cfg.optim.lr_batch_base
