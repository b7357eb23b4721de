"""`ffscale bench scaling`: how a training step's time grows with image size.

The paper's token MLP is 4 x tokens wide, so its cost grows with the square of the patch count, as
attention's does; a fixed width (`model.token_hidden`) makes it linear. Same width, depth and batch for
all three; plain PyTorch forward + backward, so the figure is the model's, not the framework's.
"""

from __future__ import annotations

import time

import torch


def _step_time(model: torch.nn.Module, size: int, batch: int, steps: int) -> float:
    x = torch.randn(batch, 3, size, size)
    model.train()
    model(x).sum().backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return (time.perf_counter() - t0) / steps


def scaling(args) -> dict:
    from ffscale.models import create_model
    from ffscale.util.flops import train_flops_per_image

    variants = {
        "ff (token MLP 4 x tokens)": ("ff_tiny", {}),
        f"ff (token MLP {args.token_hidden})": ("ff_tiny", {"token_hidden": args.token_hidden}),
        "vit (attention)": ("vit_tiny", {}),
    }
    sizes = [int(v) for v in args.sizes.split(",")]
    out: dict = {"sizes": sizes, "tokens": [(s // 16) ** 2 + 1 for s in sizes], "step_s": {}, "gflops": {}}
    for label, (name, extra) in variants.items():
        kw = dict(patch_size=16, dim=args.dim, depth=args.depth, num_classes=1000, **extra)
        out["step_s"][label] = [
            _step_time(create_model(name, img_size=s, **kw), s, args.batch, args.steps) for s in sizes
        ]
        out["gflops"][label] = [
            train_flops_per_image(lambda s=s, n=name, k=kw: create_model(n, img_size=s, **k), s) / 1e9
            for s in sizes
        ]
    return out


def print_scaling(res: dict) -> None:
    sizes, tokens = res["sizes"], res["tokens"]
    print(f"step time (s) for one batch, fwd+bwd; in brackets: x the smallest size; tokens {tokens}")
    print(f"{'variant':28}" + "".join(f"{s:>16}" for s in sizes))
    for label, ts in res["step_s"].items():
        print(f"{label:28}" + "".join(f"{t:>8.3f} ({t / ts[0]:>4.1f}x)" for t in ts))
    print(f"{'GFLOP/img (fwd+bwd)':28}")
    for label, gs in res["gflops"].items():
        print(f"  {label:26}" + "".join(f"{g:>8.2f} ({g / gs[0]:>4.1f}x)" for g in gs))
