"""All-reduce bus bandwidth for `ffscale doctor`, run by torch.distributed.run on every local rank.

Bus bandwidth as nccl-tests define it: 2 (n - 1) / n x bytes / time, comparable across rank counts.
"""

import os
import time

import torch
import torch.distributed as dist


def main(mib: int = 64, iters: int = 5) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    x = torch.ones(mib * 2**20 // 4, device=device)
    for _ in range(2):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    if rank == 0:
        print(f"busbw_gbps {2 * (n - 1) / n * x.numel() * 4 / dt / 1e9:.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
