"""`ffscale shard fashion-mnist|cluttered-fashion-mnist|folder|flat|imagenet|index|reindex`: from the images people
have to WebDataset shards with a manifest and a binary sample index (docs/data.md); `ffscale verify`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _write(src, out: Path, name: str, args) -> None:
    from ffscale.data.ingest.writer import write_shards

    m = write_shards(
        src, out, name, args.shard_size, args.seed, args.limit, args.workers, args.max_side, progress=True
    )
    conv = ", ".join(f"{n} {why}" for why, n in m.converted.items())
    print(
        f"{out}: {m.num_samples} samples of {m.num_classes} classes in {len(m.shards)} shards, "
        f"digest {m.digest}" + (f"; re-encoded as RGB JPEG: {conv}" if conv else ""),
        flush=True,
    )


def fashion_mnist(args) -> int:
    from ffscale.data.ingest import sources as shards

    for split in ("train", "val"):
        _write(shards.fashion_mnist(split), Path(args.out) / split, split, args)
    return 0


def cluttered_fashion_mnist(args) -> int:
    from ffscale.data.ingest.cluttered import Clutter, cluttered_fashion_mnist

    params = Clutter(args.size, (args.scale[0], args.scale[1]), args.fragments)
    for split in ("train", "val"):
        _write(cluttered_fashion_mnist(split, params, args.seed), Path(args.out) / split, split, args)
    return 0


def folder(args) -> int:
    from ffscale.data.ingest import sources as shards

    _write(shards.image_folder(Path(args.root)), Path(args.out), args.name or Path(args.root).name, args)
    return 0


def flat(args) -> int:
    from ffscale.data.ingest import sources as shards

    _write(
        shards.flat_folder(Path(args.root), Path(args.labels)),
        Path(args.out),
        args.name or Path(args.root).name,
        args,
    )
    return 0


def imagenet(args) -> int:
    from ffscale.data.ingest.imagenet import shard_sources

    train, val, found = shard_sources(Path(args.root))
    for line in found:
        print(f"ffscale shard imagenet: {line}", flush=True)
    for split, src in (("train", train), ("val", val)):
        if src is not None:
            _write(src, Path(args.out) / split, split, args)
    return 0


def index(args) -> int:
    from ffscale.data.ingest.index import index_shards

    root = Path(args.dir)
    m = index_shards(
        root, Path(args.out) if args.out else None, args.pattern, Path(args.classes) if args.classes else None,
        args.label_field, args.num_classes, args.workers, progress=True,
    )  # fmt: skip
    print(
        f"{args.out or root}: {m.num_samples} samples of {m.num_classes} classes in {len(m.shards)} shards "
        f"({'/'.join(m.image_exts)} images, labels from {m.label}), digest {m.digest}",
        flush=True,
    )
    return 0


def reindex(args) -> int:
    from ffscale.data.ingest.reindex import reindex
    from ffscale.data.sampleindex import INDEX

    for root in args.dirs:
        m = reindex(Path(root), args.workers)
        print(
            f"{root}: {INDEX} for {m.num_samples} samples in {len(m.shards)} shards, digest {m.digest}",
            flush=True,
        )
    return 0


def verify(args) -> int:
    from ffscale.data.manifest import MANIFEST
    from ffscale.data.sampleindex import verify
    from ffscale.engine.ckpt_files import verify_tree
    from ffscale.errors import DataError
    from ffscale.inference.stagedir import CONFIG

    bad = 0
    for root in args.dirs:
        if not Path(root).is_dir():
            raise DataError(f"{root}: no such directory (shards, or a run with checkpoints)")
        if not (Path(root) / MANIFEST).is_file():  # a run, stage or checkpoints directory
            found, failed = verify_tree(Path(root), lambda line: print(line, flush=True))
            if not found:
                if not any((Path(root) / up / CONFIG).is_file() for up in (".", "..")):
                    raise DataError(f"{root}: neither shards (no {MANIFEST}) nor a run with checkpoints")
                print(f"{root}: a run without checkpoints yet (a rerun starts it from its first step)")
            bad += failed
            continue
        m = verify(root)
        index = (
            "binary sample index checked against the tars' headers"
            if m.index_sha256
            else f"no binary sample index (`ffscale shard reindex {root}` writes it)"
        )
        print(
            f"{root}: {len(m.shards)} shards, {m.num_samples} samples, sha256 as in the manifest "
            f"(digest {m.digest}); {index}"
        )
    return 2 if bad else 0


def _writer_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="write-time shuffle seed")
    p.add_argument("--limit", type=int, default=0, help="keep only the first N shuffled samples")
    p.add_argument(
        "--workers", type=int, default=len(os.sched_getaffinity(0)),
        help="processes, each writing whole shards (same bytes as 1; default: the cores this process may use)",
    )  # fmt: skip
    p.add_argument(
        "--max-side", type=int, default=0,
        help="downscale images whose longer side exceeds this many pixels (0: keep sizes)",
    )  # fmt: skip


def add_parser(sub) -> None:
    s = sub.add_parser(
        "shard", help="write WebDataset shards + manifest (ImageNet archives, folders), or index others'",
        description="Rerunning an interrupted command keeps the finished shards and writes the rest.",
    )  # fmt: skip
    ss = s.add_subparsers(dest="source", required=True)
    p = ss.add_parser("fashion-mnist", help="Debian's Fashion-MNIST -> OUT/train, OUT/val")
    _writer_args(p, "output directory (gets train/ and val/)")
    p.set_defaults(fn=fashion_mnist)
    p = ss.add_parser(
        "cluttered-fashion-mnist",
        help="Fashion-MNIST objects at random scale and position among fragments of others -> OUT/train, OUT/val",
        description="Each image holds one Fashion-MNIST image (train: the 60k training images, val: the 10k test "
        "images) resized by a random factor and placed at a random position on a black canvas, after fragments "
        "of other images of the same split (cluttered MNIST's construction; docs/recipe.md, 'The benchmark'). "
        "Every sample is a function of (seed, split, index): the same bytes on every run and with any --workers.",
    )  # fmt: skip
    _writer_args(p, "output directory (gets train/ and val/)")
    p.add_argument("--size", type=int, default=56, help="canvas side in px (default 56)")
    p.add_argument(
        "--scale", type=float, nargs=2, default=[1.0, 1.5], metavar=("LO", "HI"),
        help="object side = 28 px x U(LO, HI) (default 1.0 1.5: 28-42 px)",
    )  # fmt: skip
    p.add_argument("--fragments", type=int, default=4, help="clutter fragments per image (default 4)")
    p.set_defaults(fn=cluttered_fashion_mnist)
    p = ss.add_parser("folder", help="a class-folder tree root/<class>/<image>")
    p.add_argument("--root", required=True, help="root/<class>/<image>; class k = k-th name in sorted order")
    p.add_argument("--name", help="shard file prefix (default: the root's name)")
    _writer_args(p, "output directory")
    p.set_defaults(fn=folder)
    p = ss.add_parser(
        "flat", help="images in one folder with a labels file (`file,label` csv or `file label`)"
    )
    p.add_argument("--root", required=True, help="the images' folder (labels name files relative to it)")
    p.add_argument("--labels", required=True, help="labels file: .csv `file,label`, else `file label` lines")
    p.add_argument("--name", help="shard file prefix (default: the root's name)")
    _writer_args(p, "output directory")
    p.set_defaults(fn=flat)
    p = ss.add_parser(
        "imagenet", help="ILSVRC2012 in any common layout (official tars + devkit, folders, Kaggle's)",
        description="Finds the layout under --root by itself and writes OUT/train and OUT/val. Class k is "
        "the k-th synset id in sorted order (as timm and torchvision number them); names are the synsets' words.",
    )  # fmt: skip
    p.add_argument("--root", required=True, help="directory holding the archives or folders")
    _writer_args(p, "output directory (gets train/ and val/)")
    p.set_defaults(fn=imagenet)
    p = ss.add_parser(
        "index", help="describe shards written by another tool (manifest + indexes, tars untouched)"
    )
    p.add_argument("dir", help="directory of .tar shards")
    p.add_argument("--pattern", default="*.tar", help="glob picking one split, e.g. 'imagenet1k-train-*.tar'")
    p.add_argument("--out", help="where the manifest and indexes go (default: DIR; needed with --pattern)")
    p.add_argument("--classes", help="class names, one per line (or `<synset> <words>` lines)")
    p.add_argument("--label-field", help="read labels from this integer field of the .json member")
    p.add_argument("--num-classes", type=int, default=0, help="classes when not every label occurs")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes reading tars")
    p.set_defaults(fn=index)
    p = ss.add_parser(
        "reindex", help="write the binary sample index of shard sets made before it existed",
        description="Reads each set's tar headers (not the images) and writes sample-index.npy beside its "
        "manifest, with its sha256 in the manifest; shards, .idx files and the set's digest stay as they are.",
    )  # fmt: skip
    p.add_argument("dirs", nargs="+", help="shard directories (holding manifest.json)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes reading tars")
    p.set_defaults(fn=reindex)

    v = sub.add_parser(
        "verify", help="check shards against their manifest, or a run's checkpoints against their records"
    )
    v.add_argument(
        "dirs", nargs="+",
        help="shard directories (holding manifest.json), or run/stage/checkpoint directories: every complete "
        "checkpoint's files against their recorded sizes and sha256, their pickles against DeepSpeed's types",
    )  # fmt: skip
    v.set_defaults(fn=verify)
