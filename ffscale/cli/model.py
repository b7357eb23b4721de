"""`ffscale eval | predict | import | models`: finished models, without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path


def _device_default() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a run's exported weights without DeepSpeed")
    e.add_argument("--run", required=True, help="run directory (runs/<name>)")
    e.add_argument("--stage", help="stage name (default: the last finished one)")
    e.add_argument("--weights", help="a .safetensors file instead of the stage's")
    e.add_argument("--data", help="shard directory to evaluate on (default: the stage's val)")
    e.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=evaluate)

    pr = sub.add_parser("predict", help="classify images with a trained model: top-5 with class names")
    pr.add_argument(
        "--model",
        required=True,
        help="run directory (its last stage), stage directory, or models:/NAME/VERSION",
    )
    pr.add_argument("images", nargs="+", help="image files")
    pr.add_argument("--top", type=int, default=5)
    pr.add_argument("--ema", action="store_true", help="the EMA weights instead of the final ones")
    pr.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    pr.add_argument("--json", action="store_true", help="one JSON object per image")
    pr.set_defaults(fn=predict)

    i = sub.add_parser(
        "import", help="the paper's, DeiT's or timm's checkpoint as an ffscale model directory",
        description="Reads DeiT-style .pth checkpoints (the paper's linear-*-checkpoint.pth), timm/DeiT ViTs and "
        ".safetensors; writes OUT/config.yaml and OUT/imported/{weights.safetensors, model.json}.",
    )  # fmt: skip
    i.add_argument("checkpoint", help=".pth / .pt / .bin (a torch pickle) or .safetensors")
    i.add_argument("--out", required=True, help="a new directory for the model")
    i.add_argument("--model", help="ffscale model name (default: from the checkpoint's args or its tensors)")
    i.add_argument(
        "--ema", action="store_true", help="the EMA weights (DeiT's 'model_ema') instead of 'model'"
    )
    i.add_argument(
        "--trust-pickle", action="store_true",
        help="unpickle types beyond tensors and argparse.Namespace: code in the file may run",
    )  # fmt: skip
    i.add_argument("overrides", nargs="*", help="config keys over the source's, e.g. data.crop_pct=1.0")
    i.set_defaults(fn=import_checkpoint)

    m = sub.add_parser("models", help="list registered models with parameter counts")
    m.add_argument("filter", nargs="?")
    m.set_defaults(fn=models)


def evaluate(args) -> int:
    from ffscale.inference.evaluate import evaluate_weights, find_stage

    stage = find_stage(Path(args.run), args.stage)
    res = evaluate_weights(
        stage, Path(args.weights) if args.weights else None, args.data, args.device or _device_default()
    )
    print(
        json.dumps(res)
        if args.json
        else f"{stage.name}: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% on {res['samples']} images"
    )
    return 0


def package_of(ref: str) -> Path:
    """A run directory (its last finished stage), a stage directory, or a models:/ (runs:/) URI."""
    if ref.startswith(("models:/", "runs:/")):
        from ffscale.tracking.store import download_model

        return download_model(ref)
    from ffscale.inference.card import find_package

    return find_package(Path(ref))


def predict(args) -> int:
    from ffscale.inference.predict import Classifier, open_image

    clf = Classifier(package_of(args.model), args.ema, args.device or _device_default())
    images = [open_image(f) for f in args.images]
    rows = clf.top(images, args.top)
    for f, row in zip(args.images, rows):
        if args.json:
            print(json.dumps({"image": f, "top": [{"index": i, "class": c, "prob": p} for i, c, p in row]}))
        else:
            print(f"{f}: " + ", ".join(f"{c} ({i}) {100 * p:.1f}%" for i, c, p in row))
    return 0


def import_checkpoint(args) -> int:
    from ffscale.inference.convert import convert, write_package
    from ffscale.inference.stagedir import StageDir

    src = Path(args.checkpoint)
    imp = convert(src, args.model, args.ema, args.trust_pickle)
    stage_dir = write_package(imp, src, Path(args.out), args.overrides, args.ema)
    kw = imp.kwargs
    print(f"{args.out}: {imp.model} ({imp.layout} layout{', EMA' if args.ema else ''}), {kw['img_size']} px, "
          f"patch {kw['patch_size']}, width {kw['dim']}, depth {kw['depth']}, {kw['num_classes']} classes -> "
          f"{StageDir(stage_dir).weights}")  # fmt: skip
    return 0


def models(args) -> int:
    from ffscale.models import create_model, list_models

    for name in list_models(args.filter or ""):
        m = create_model(name)
        print(f"{name:18s} {sum(p.numel() for p in m.parameters()) / 1e6:8.2f}M params")
    return 0
