"""fp32 training under ZeRO 1-3 without a second fp32 copy of the weights.

DeepSpeed's ZeRO optimizers keep an fp32 "master" partition beside the model's own partition and
copy one into the other after every step. When the model itself is fp32 the master is a duplicate:
4 bytes per parameter per rank, and a full memory pass per step. DeepSpeed means to share it in that
case (ZeRO-3, PR deepspeedai/DeepSpeed#7651), but its check compares a torch.device with the string
'cpu' / 'cuda:0', which is never equal, so the copy is always made (DeepSpeed 0.19.8).

Here the master tensor (the one the torch optimizer holds, so its state keys stay valid) is pointed at
the model partition's memory; DeepSpeed's copy back becomes a no-op (torch skips a copy onto the same
data). ZeRO-1/2 then re-link their per-parameter views of the master, as DeepSpeed does after a load.
"""

from __future__ import annotations

import torch


def _pairs(opt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model partition, fp32 master) of each parameter group on this rank; [] when offloaded."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        if opt.offload_optimizer or getattr(opt, "offload_param", False):
            return []
        return list(zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat))
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        if opt.cpu_offload:
            return []
        out = []
        for i, hp in enumerate(opt.single_partition_of_fp32_groups):
            rank = torch.distributed.get_rank(group=opt.real_dp_process_group[i])
            out.append((opt.parallel_partitioned_bit16_groups[i][rank], hp))
        return out
    return []


def share_fp32_masters(opt) -> int:
    """Make fp32 masters share the model partitions' memory; returns the bytes freed."""
    freed = 0
    for lp, hp in _pairs(opt):
        if lp is None or hp.numel() == 0 or lp.dtype != hp.dtype or lp.device != hp.device:
            continue
        if lp.shape != hp.shape or hp.untyped_storage().data_ptr() == lp.untyped_storage().data_ptr():
            continue
        if not torch.equal(lp, hp):  # a master that already differs is not a duplicate
            continue
        freed += hp.untyped_storage().nbytes()
        hp.data = lp.data
    if freed and hasattr(opt, "_link_all_hp_params"):
        opt._link_all_hp_params()  # ZeRO-1/2 views of the master (checkpoints, safe_get_*) follow
    return freed
