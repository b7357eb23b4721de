"""From the data people have to shards: ImageNet's layouts, flat folders with a labels file, other
tools' shards, parallel and resumable sharding, problem image formats, data checked before launch."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.ids import id_image, make_id_folder
from helpers.imagenet_layouts import LAYOUTS, SYNSETS, Plan, digest, pictures
from helpers.launch import ROOT
from helpers.loaders import collect, plain_cfg
from PIL import Image

from ffscale.cli import main
from ffscale.data.loader import build_loader
from ffscale.data.manifest import load_manifest
from ffscale.data.samples import iter_samples

CLI = Path(sys.executable).with_name("ffscale")


LOADERS = ["webdataset", "dali"]


def shard_contents(d: Path) -> tuple[dict, list[tuple[str, int]]]:
    m, files = load_manifest(d)
    return m, [(digest(s["jpg"]), int(s["cls"])) for s in iter_samples(files, [x.count for x in m.shards])]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_imagenet_layout_gives_every_image_once_with_its_synset(tmp_path, layout, capsys):
    plan = Plan()
    root = LAYOUTS[layout](tmp_path / "in", plan)
    out = tmp_path / "out"
    assert main(["shard", "imagenet", "--root", str(root), "--out", str(out), "--shard-size", "7"]) == 0
    train_from = "ILSVRC2012_img_train.tar (per-class tars" if layout == "archives" else f"{root}"
    assert f"ffscale shard imagenet: train: {train_from}" in capsys.readouterr().out
    wnids = sorted(SYNSETS)  # class k = k-th synset id in sorted order (timm, torchvision)
    for split in ("train", "val"):
        m, got = shard_contents(out / split)
        expected = plan.expected(split)
        assert Counter(d for d, _ in got) == Counter(expected.keys()), split  # each image once, bytes kept
        assert all(wnids[y] == expected[d] for d, y in got), split
        assert m.class_ids == wnids
        words = [SYNSETS[w][0] for w in wnids]
        assert m.classes == (wnids if layout == "folders" else words)  # no devkit: names are the ids
        assert m.dataset == "imagenet"  # what `ffscale compare` shows and tags the runs with, not "train"


@pytest.mark.parametrize("fmt", ["csv", "txt"])
def test_a_flat_folder_with_a_labels_file(tmp_path, fmt):
    pics = pictures(12)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i, p in enumerate(pics):
        (tmp_path / "imgs" / f"im{i}.jpg").write_bytes(p)
        rows.append((f"im{i}.jpg", ["cat", "dog", "emu"][i % 3]))
    labels = tmp_path / f"labels.{fmt}"
    sep = "," if fmt == "csv" else " "
    labels.write_text(("file,label\n" if fmt == "csv" else "") + "".join(f"{f}{sep}{y}\n" for f, y in rows))
    assert main(["shard", "flat", "--root", str(tmp_path / "imgs"), "--labels", str(labels),
                 "--out", str(tmp_path / "out"), "--shard-size", "5"]) == 0  # fmt: skip
    m, got = shard_contents(tmp_path / "out")
    assert m.classes == ["cat", "dog", "emu"]
    assert m.dataset == tmp_path.name  # the images' folder, "imgs", names no dataset: the one above it
    assert sorted(got) == sorted((digest(p), i % 3) for i, p in enumerate(pics))


def test_other_tools_shards_are_indexed_without_rewriting_them(foreign, capsys):
    before = {f: f.read_bytes() for f in (foreign / "shards").glob("*.tar")}
    m, files = load_manifest(foreign / "val")
    assert (m.label, m.image_exts, m.num_samples, m.classes) == (
        "json:label",
        ["png"],
        48,
        ["0", "1", "2", "3"],
    )
    assert all(f.parent == foreign / "shards" for f in files)
    assert m.dataset == foreign.name  # indexed in place from <foreign>/shards
    assert all((foreign / "val" / (f.stem + ".idx")).stat().st_size > 0 for f in files)
    from ffscale.data.sampleindex import open_table, parse

    table, _ = open_table(foreign / "val", m)  # the binary index: .png images, labels in .json
    counts = [s.count for s in m.shards]
    assert np.array_equal(
        table, parse(files, [m.index_file(foreign / "val", s) for s in m.shards], counts, m.members)
    )
    assert (table["img"][:, 1] > 0).all() and (table["lab"][:, 1] > 0).all()
    assert main(["verify", str(foreign / "train"), str(foreign / "val")]) == 0
    assert {f: f.read_bytes() for f in (foreign / "shards").glob("*.tar")} == before
    capsys.readouterr()
    assert main(["shard", "index", str(foreign / "shards"), "--pattern", "other-val-*.tar"]) == 2
    assert "several splits): give --out" in capsys.readouterr().err


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("split", ["train", "val", "webp"])
def test_both_loaders_read_indexed_shards_with_their_labels(foreign, kind, split):
    n = {"train": 96, "val": 48, "webp": 24}[split]
    dev = torch.device("cpu")
    loader, _ = build_loader(plain_cfg(kind), str(foreign / split), False, 0, 1, 8, 0, None, dev)
    ids, labels, _ = collect(loader)
    assert sorted(ids) == list(range(n)) and all(y == i % 4 for i, y in zip(ids, labels))


def test_shards_without_a_manifest_name_the_command_that_describes_them(foreign):
    with pytest.raises(Exception, match=r"ffscale shard index .*shards"):
        load_manifest(foreign / "shards")


def problem_images(root: Path) -> dict[str, int]:
    """Id images in formats GPU decoders refuse; {file: id}."""
    made = {}
    for i, kind in enumerate(["cmyk", "png", "png16", "palette", "rgba", "big", "ok"] * 3):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        img, f = id_image(i, 64 if kind == "big" else 32), d / f"{i:03d}.JPEG"
        if kind == "cmyk":
            img.convert("CMYK").save(f, format="JPEG", quality=95)
        elif kind == "png":
            img.save(f, format="PNG")
        elif kind == "png16":
            Image.fromarray(np.asarray(img).astype(np.uint16) * 257).save(f, format="PNG")
        elif kind == "palette":
            img.convert("P").save(f, format="PNG")
        elif kind == "rgba":
            img.convert("RGBA").save(f, format="PNG")
        else:
            img.convert("RGB").save(f, format="JPEG", quality=95)
        made[f.name] = i
    return made


@pytest.mark.parametrize("kind", LOADERS)
def test_problem_formats_become_rgb_jpegs_that_both_loaders_read_alike(tmp_path, kind):
    made = problem_images(tmp_path / "src")
    out = tmp_path / "out"
    main(["shard", "folder", "--root", str(tmp_path / "src"), "--out", str(out), "--shard-size", "8",
          "--max-side", "48"])  # fmt: skip
    m = load_manifest(out)[0]
    assert m.converted == {
        "downscaled": 3,
        "jpeg CMYK": 3,
        "png I;16": 3,
        "png L": 3,
        "png P": 3,
        "png RGBA": 3,
    }
    for s in iter_samples(load_manifest(out)[1]):
        assert (
            Image.open(io.BytesIO(s["jpg"])).format == "JPEG"
            and max(Image.open(io.BytesIO(s["jpg"])).size) <= 48
        )
    loader, _ = build_loader(plain_cfg(kind), str(out), False, 0, 1, 4, 0, None, torch.device("cpu"))
    ids, labels, _ = collect(loader)
    assert sorted(ids) == sorted(made.values()) and all(y == i % 3 for i, y in zip(ids, labels))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", r"data.train=.*nowhere: no shard manifest"),
        ("classes", r"data.val=.* has other classes than .*data.train="),
        ("world", r"data.train=.*: 40 samples give 10 per rank for 4 ranks, fewer than one batch of 16"),
        ("foreign", r"data.train=.*shards: no shard manifest .* `ffscale shard index .*shards`"),
    ],
)
def test_train_stops_on_bad_data_before_any_rank_starts(tmp_path, fm_shards, foreign, case, expect):
    train, val, nproc, batch = fm_shards / "train", fm_shards / "val", "1", 8
    if case == "missing":
        train = tmp_path / "nowhere"
    elif case == "classes":
        val = foreign / "val"
    elif case == "world":
        small = tmp_path / "small"
        main(["shard", "folder", "--root", str(make_id_folder(tmp_path / "ids", 40, 4)), "--out", str(small),
              "--shard-size", "20"])  # fmt: skip
        train, val, nproc, batch = small, small, "4", 64  # 2 files for 4 ranks work; 10 images a rank do not
    else:
        train = foreign / "shards"
    r = subprocess.run(
        [str(CLI), "train", "--nproc", nproc, "--config", str(ROOT / "configs" / "demo.yaml"),
         f"data.train={train}", f"data.val={val}", f"run.dir={tmp_path}", f"optim.global_batch={batch}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    import re

    assert re.search(expect, lines[0]), lines[0]
    assert "deepspeed" not in r.stdout.lower()


def test_a_damaged_devkit_is_one_line_naming_it(tmp_path, capsys):
    root = LAYOUTS["archives"](tmp_path / "in", Plan())
    kit = root / "ILSVRC2012_devkit_t12.tar.gz"
    kit.write_bytes(kit.read_bytes()[:200])  # a download cut short
    assert main(["shard", "imagenet", "--root", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ILSVRC2012_devkit_t12.tar.gz: not a readable ILSVRC2012 devkit" in err[0]
