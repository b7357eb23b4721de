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
    out: dict = {"sizes": sizes, "tokens": [(s // 16) ** 2 + 1 for s in sizes], "step_s": {}, "gflops": {},
                 "args": {"dim": args.dim, "depth": args.depth, "batch": args.batch, "steps": args.steps,
                          "threads": torch.get_num_threads()}}  # fmt: skip
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


def table(res: dict) -> list[list]:
    """Seconds per step and GFLOP per image for each variant and size, with the growth from the smallest."""
    rows: list[list] = [["variant"] + [f"{s} px ({t} tokens)" for s, t in zip(res["sizes"], res["tokens"])]]
    for what, key, fmt in (("s/step", "step_s", "{:.3f}"), ("GFLOP/img", "gflops", "{:.2f}")):
        for label, vs in res[key].items():
            rows.append([f"{label}, {what}"] + [fmt.format(v) + (f" ({v / vs[0]:.1f}x)" if i else "")
                                                for i, v in enumerate(vs)])  # fmt: skip
    return rows


def caption(res: dict) -> str:
    a = res["args"]
    return (f"Width {a['dim']}, depth {a['depth']}, batch {a['batch']}, 16 px patches, "
            f"plain PyTorch forward + backward on {a['threads']} threads")  # fmt: skip


def print_scaling(res: dict) -> None:
    print(caption(res))
    for row in table(res):
        print(" | ".join(str(c) for c in row))
