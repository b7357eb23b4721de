"""Typed configuration: OmegaConf structured dataclasses, composed YAML, CLI dot-list overrides.

A config describes a pipeline of stages. The top-level model/data/optim/... sections are the
defaults of every stage; `stages.<name>.<section>.<key>` overrides them per stage (stages are keyed
by name so dot-list overrides reach them). With no `stages`, the pipeline has one stage, `train`.
Everything is validated and resolved once, here, before any process or device is touched.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ffscale.errors import ConfigError
from ffscale.util.atomic import write_atomic
from ffscale.util.secrets import scrub


@dataclass
class ModelCfg:
    name: str = "ff_tiny"
    """a registered model (`ffscale models`): ff_tiny|base|large, vit_tiny|base|large, attn_only_tiny|base"""
    img_size: int | None = None
    """None: data.img_size (if set, it must equal it)"""
    patch_size: int | None = None
    """None: the registered size's"""
    in_chans: int = 3
    """input channels"""
    num_classes: int | None = None
    """None: from the training shards' manifest"""
    drop_path: float = 0.1
    """stochastic depth of the last block (DeiT's --drop-path 0.1)"""
    drop: float = 0.0
    """dropout after the position embedding and in the blocks (DeiT's --drop; the paper: 0.1)"""
    heads: int | None = None
    """ViT / attention-only: attention heads (None: the registered size's)"""
    dim: int | None = None
    """embedding width (None: the registered size's)"""
    depth: int | None = None
    """blocks (None: the registered size's)"""
    token_hidden: int | None = None
    """FF only: fixed token-MLP width, so cost is linear in patches (None: patches x mlp_ratio)"""
    carry_token_mlp: bool = True
    """init_from another image size: resample token MLPs (else re-init; docs/resolution.md)"""
    grad_ckpt: bool = False
    """recompute each block in backward: activations ~1/depth, ~1.3x compute"""
    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine"""


@dataclass
class DataCfg:
    train: str = "data/fashion-mnist/train"
    """a shard directory holding manifest.json: a path, or a URL prefix (https://, s3://, gs://: read
    through fsspec; docs/data.md, "Remote shards and staging")"""
    val: str = "data/fashion-mnist/val"
    """the validation shard directory (a path or a URL prefix, as `train`)"""
    stage_dir: str = ""
    """node-local folder (NVMe, or RAM) into which each split is copied once per node, checked against its
    manifest, before the ranks read it ("": the shards are read where they are; docs/data.md)"""
    remote_cache_mb: int = 64
    """without stage_dir, remote shards are read by ranged requests through a cache of this many MB per
    reading process (a rank's DALI or DataLoader workers each hold one)"""
    loader: str = "auto"
    """auto | dali | webdataset (ffscale/data/loader.py says which `auto` picks)"""
    img_size: int = 224
    """the images' size in px, train and eval"""
    crop_pct: float = 0.875
    """eval: resize shorter side to img_size / crop_pct, centre crop"""
    interpolation: str = "bicubic"
    """bicubic (DeiT) | bilinear: every resize, train and eval"""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """random-resized-crop area range"""
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """random-resized-crop aspect-ratio range"""
    hflip: float = 0.5
    """horizontal-flip probability"""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """normalisation mean per channel"""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """normalisation std per channel"""
    workers: int = 2
    """per rank: DataLoader worker processes; DALI reader processes (>= 1) and threads"""
    dali_batch: int = 512
    """images DALI takes per iteration: whole micro-batches, as many as fit (at least one, at most an
    epoch's). Most of the CPU DALI takes from the rank's thread is paid per iteration, which more images
    spread thinner; DALI's buffers grow with it (docs/data.md, "DALI iterations")"""
    repeats: int = 1
    """DeiT's repeated augmentation (RASampler, samplers.py:8-59): each image `repeats` times per
    epoch on different ranks, the epoch as long as without (data/plan.py); 3 in DeiT's ImageNet recipe"""
    on_error: str = "raise"
    """raise | skip: a bad sample stops the job naming its shard and key, or is dropped (skip needs
    the webdataset loader; DALI's CPU decoder crashes instead on an image it cannot decode in an
    iteration of 32 or more: docs/data.md, "DALI iterations")"""
    rand_augment: bool = True
    """DeiT's rand-m9-mstd0.5-inc1, in both loaders (DALI's graph; PIL ops in the webdataset loader)"""
    color_jitter: float = 0.3
    """brightness/contrast/saturation +-; as timm, only when RandAugment is off (DALI)"""
    mixup: float = 0.8
    """Beta(alpha) for mixup (DeiT: 0.8); 0 = off"""
    cutmix: float = 1.0
    """Beta(alpha) for cutmix (DeiT: 1.0); 0 = off"""
    mix_prob: float = 1.0
    """probability that a batch is mixed at all"""
    mix_switch: float = 0.5
    """probability of cutmix rather than mixup when both are on"""
    reprob: float = 0.25
    """random erasing probability per sample"""


@dataclass
class OptimCfg:
    global_batch: int = 1024
    """images per optimizer step over all ranks"""
    micro_batch: int | None = None
    """images per rank per forward; unset: global_batch / ranks (no accumulation). Set it when a
    rank's memory needs gradient accumulation; accumulation then fills the rest."""
    base_lr: float = 5e-4
    """DeiT rule: lr = base_lr * global_batch / lr_batch_base"""
    lr_batch_base: int = 512
    """the batch base_lr is given for"""
    weight_decay: float = 0.05
    """AdamW's decoupled weight decay"""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's betas"""
    eps: float = 1e-8
    """AdamW's eps"""
    clip_grad: float = 0.0
    """0 = off (DeiT); written explicitly since DeepSpeed defaults to 1.0"""
    label_smoothing: float = 0.1
    """label smoothing of the cross-entropy (DeiT: 0.1)"""
    ema_decay: float = 0.99996
    """EMA of the weights per step (DeiT); 0 = off; evaluated and exported"""
    nonfinite: str = "stop"
    """a step whose loss is NaN/inf on any rank: stop (naming it) | skip it"""
    max_skipped: int = 10
    """nonfinite=skip: stop once more steps than this were skipped in a stage"""


@dataclass
class ScheduleCfg:
    epochs: int = 300
    """the schedule's length"""
    warmup_epochs: float = 5
    """linear warmup from warmup_lr"""
    warmup_lr: float = 1e-6
    """the lr warmup starts from"""
    min_lr: float = 1e-5
    """the lr the cosine ends at"""
    stop_at_step: int = 0
    """>0: checkpoint and exit at this optimizer step; rerunning continues"""
    stop_at_epoch: int = 0
    """>0: checkpoint and exit after this epoch (the schedule stays `epochs` long)"""
    lr_per: str = "step"
    """step | epoch: the lr follows timm's cosine (ffscale/engine/lr.py), read per optimizer step,
    or per epoch as DeiT's main.py steps it (epoch e at the value for e - 1; docs/recipe.md row 7)"""


@dataclass
class DeepSpeedCfg:
    zero_stage: int = 2
    """ZeRO stage: 0, 1, 2 or 3"""
    precision: str = "auto"
    """auto (bf16 on capable GPUs, else fp32) | bf16 | fp16 | fp32. bf16: gradients accumulate in
    fp32, the EMA averages the fp32 masters, ZeRO-0 runs as ZeRO-1's fused bf16 optimizer"""
    comm_dtype: str = "fp32"
    """bf16/fp16: the dtype gradients are reduced across ranks in (they accumulate in fp32): fp32 as
    DDP with AMP reduces them, or bf16 for half the bytes on a slow network"""
    offload_optimizer: bool = False
    """optimizer states + step on the CPU (ZeRO 1-3): fits bigger models"""
    bucket_mb: int = 50
    """ZeRO gradient reduce / parameter all-gather bucket, MiB of fp32 (13M elements)"""
    prefetch_mb: int = 50
    """ZeRO-3: parameters fetched ahead of the layer that needs them, MiB"""
    extra: dict[str, Any] = field(default_factory=dict)
    """merged into the DeepSpeed config last"""


@dataclass
class CheckpointCfg:
    every_steps: int = 0
    """0: only at epoch ends (every_epochs)"""
    every_epochs: int = 1
    """epochs between checkpoints"""
    keep: int = 2
    """keep the last k checkpoints"""
    reshard: bool = True
    """resuming ZeRO-1/2/3 shards with another rank count: convert to DeepSpeed's universal
    checkpoint and load that (true), or stop with the conversion command (false)"""


@dataclass
class TrackingCfg:
    enabled: bool = True
    """false: no MLflow at all (metrics.jsonl only; `ffscale track sync` imports the run later); a
    node without mlflow trains"""
    uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else sqlite in the run directory. Credentials in it never reach a
    file or a log: give them in the environment"""
    experiment: str = "ffscale"
    """the MLflow experiment"""
    flush_every: int = 50
    """metrics are buffered and written in batches"""
    end_retry_s: float = 120.0
    """at a stage's or the job's end (FINISHED or FAILED), how long a server that does not answer is
    retried before the job ends without it (`ffscale track sync RUN_DIR` replays it later)"""
    register_as: str | None = None
    """the final stage's model is logged to its stage run; with a name, also registered under it"""


@dataclass
class RunCfg:
    name: str = "default"
    """the run directory's name under `dir`"""
    dir: str = "runs"
    """where run directories live"""
    seed: int = 0
    """fixes data order, augmentation and init"""
    log_every: int = 20
    """steps between progress lines"""
    eval_every: int = 1
    """epochs between evaluations (the last epoch always evaluates)"""
    collective_timeout_s: int = 600
    """a collective that waits longer fails the rank, so a lost or frozen node stops every other node
    (and a JobSet or Job restarts the group) instead of leaving them hanging. Above the longest wait of
    a healthy run: a checkpoint write, or rank 0 converting a checkpoint for resharding. It holds at
    start-up and around checkpoints, evaluations and an epoch's first step"""
    step_timeout_s: int = 120
    """the same during training steps, from the first step on (torchtitan:
    comm.train_timeout_seconds, 100 s): above a healthy step's longest wait, which is rank 0 in one
    call to an MLflow server that accepts connections and never answers (10 s timeout x 3 tries with
    backoff, tracking/store.py; the tracker then skips calls for 60 s, tracking/breaker.py).
    0: collective_timeout_s throughout"""
    allow_change: list[str] = field(default_factory=list)
    """keys a resumed stage may take new values for (`--allow-change KEY`; ffscale/run/changes.py)"""
    lock_stale_s: float = 60.0
    """the run directory's lock is taken over when its holder's heartbeat is older than this"""


@dataclass
class DistillCfg:
    """DeiT's distillation (ffscale/engine/distill.py): the student gets a distillation token and head."""

    teacher: str | None = None
    """an earlier stage's name, a directory holding model.json (a finished stage, a run directory,
    `ffscale import` output) or models:/NAME/VERSION; None: no distillation. It must predict the
    student's classes at its image size, checked before launch"""
    mode: str = "hard"
    """hard (the teacher's argmax, as DeiT's README trains) | soft (KL at tau)"""
    alpha: float = 0.5
    """weight of the distillation head's loss (DeiT main.py:132)"""
    tau: float = 1.0
    """soft: temperature (DeiT main.py:133)"""


@dataclass
class StageCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    init_from: str | None = None
    """scratch, an earlier stage's name, a model directory or a weights .safetensors path; None: the
    previous stage's weights (a student of the previous stage: scratch; `starting_weights`)"""


@dataclass
class Config(StageCfg):
    run: RunCfg = field(default_factory=RunCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    stages: dict[str, Any] = field(default_factory=dict)
    """name -> partial StageCfg, in order: `stages.<name>.<section>.<key>` overrides a key for one stage"""


@dataclass
class Stage:
    """One resolved stage: its name, its full config, and where it lives on disk."""

    name: str
    cfg: StageCfg
    dir: Path


_STAGE_KEYS = {f for f in StageCfg.__dataclass_fields__}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a YAML file, first merging the files its `_base_` list names (relative paths)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config {path}: _base_ cycle")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"config {path}: cannot parse YAML: {e}") from e
    bases = node.pop("_base_", []) if isinstance(node, DictConfig) else []
    merged = OmegaConf.create()
    for b in [bases] if isinstance(bases, str) else bases:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / b).resolve(), seen + (path,)))
    if isinstance(node, DictConfig) and "stages" in node and "stages" in merged:
        merged.pop("stages")  # a file that lists stages defines the pipeline; it does not extend it
    return OmegaConf.merge(merged, node)


def _explain(error: OmegaConfBaseException, where: str, prefix: str = "") -> ConfigError:
    msg = str(error).splitlines()[0]
    key = getattr(error, "full_key", None)
    if key:
        msg = f"{msg} (key: {prefix}{key})"
    return ConfigError(f"{where}: {msg}")


def load(files: list[str] | str | None = None, overrides: list[str] | None = None) -> Config:
    """Compose YAML files and dot-list overrides over the schema; validate; resolve every stage."""
    files = [files] if isinstance(files, str) else list(files or [])
    cfg = OmegaConf.structured(Config)
    for f in files:
        try:
            node = _read_yaml(Path(f).resolve())
            if isinstance(node, DictConfig) and node.get("stages"):
                cfg.stages = {}  # as with _base_: a later file that lists stages replaces the pipeline
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _explain(e, f"config {f}") from e
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except OmegaConfBaseException as e:
            raise _explain(e, "command-line override") from e
    try:
        OmegaConf.resolve(cfg)
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _explain(e, "config") from e
    pipeline = stages(obj)  # once: each call merges every stage's config again
    names = [s.name for s in pipeline]
    for i, stage in enumerate(pipeline):  # validate each stage now, not hours later
        p = f"stages.{stage.name}." if obj.stages else ""
        validate(stage.cfg, p)
        teacher = stage.cfg.distill.teacher
        if teacher in names[i:]:
            raise ConfigError(
                f"{p}distill.teacher={teacher}: a teacher must be an earlier stage, and {teacher} "
                + ("is this one" if teacher == stage.name else "runs after it")
            )
    return obj


def stages(cfg: Config) -> list[Stage]:
    """The pipeline's stages in order, each the top-level sections merged with its overrides.

    Only the sections a stage overrides go through OmegaConf (its type checks); the others are
    copied: wrapping a whole StageCfg in OmegaConf was most of the time a config took to load, and
    the launch checks, the renderer and the preflight each ask for the pipeline."""
    run_dir = Path(cfg.run.dir) / cfg.run.name
    out = []
    for name, over in (cfg.stages or {"train": {}}).items():
        over = over or {}
        unknown = sorted(set(over) - _STAGE_KEYS)
        if unknown:
            raise ConfigError(
                f"stages.{name}.{unknown[0]}: not a stage setting (one of {sorted(_STAGE_KEYS)})"
            )
        values = {}
        for key in StageCfg.__dataclass_fields__:
            value = getattr(cfg, key)
            if key not in over:
                values[key] = copy.deepcopy(value)
            elif dataclasses.is_dataclass(value):
                if not isinstance(over[key], dict | None):
                    raise ConfigError(
                        f"stages.{name}.{key}={over[key]!r}: a section of keys, e.g. stages.{name}.{key}.<key>=..."
                    )
                try:
                    merged = OmegaConf.merge(OmegaConf.structured(value), over[key] or {})
                except OmegaConfBaseException as e:
                    raise _explain(e, f"stage '{name}'", f"stages.{name}.{key}.") from e
                values[key] = OmegaConf.to_object(merged)
            elif isinstance(over[key], str | None):  # init_from: a name or a path
                values[key] = over[key]
            else:
                raise ConfigError(f"stages.{name}.{key}={over[key]!r}: a stage's name, a path, or scratch")
        out.append(Stage(name, StageCfg(**values), run_dir / name))
    return out


def starting_weights(stage_cfg: StageCfg, earlier: list[str]) -> tuple[str, str | None]:
    """Where a stage's weights start, the one rule the pipeline, its preflight and `track sync` read:
    ("scratch", None), ("stage", an earlier stage's name) or ("path", init_from as written).

    Unset init_from: the previous stage's weights, except for a student of the previous stage
    (`distill.teacher`), which starts from scratch as DeiT trains its students: DeiT's main.py builds
    the student with `pretrained=False` and refuses `--finetune` with distillation
    (facebookresearch/deit @ 2f76ec6, main.py:241-247 and 176-177)."""
    ref = stage_cfg.init_from
    if ref is None:
        if not earlier or stage_cfg.distill.teacher == earlier[-1]:
            return "scratch", None
        return "stage", earlier[-1]
    if ref == "scratch":
        return "scratch", None
    return ("stage", ref) if ref in earlier else ("path", ref)


def image_size(stage_cfg: StageCfg) -> int:
    """The one resolution of the model's image size: data.img_size unless model.img_size says (the same)."""
    return stage_cfg.model.img_size or stage_cfg.data.img_size


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}")


def validate(stage_cfg: StageCfg, prefix: str = "") -> None:
    """Checks OmegaConf's types cannot express. `p` prefixes keys (stages.<name>.)."""
    _choice(stage_cfg.data.loader, ("auto", "dali", "webdataset"), f"{prefix}data.loader")
    _choice(stage_cfg.data.on_error, ("raise", "skip"), f"{prefix}data.on_error")
    _choice(stage_cfg.data.interpolation, ("bicubic", "bilinear"), f"{prefix}data.interpolation")
    _choice(stage_cfg.schedule.lr_per, ("step", "epoch"), f"{prefix}schedule.lr_per")
    _choice(stage_cfg.optim.nonfinite, ("stop", "skip"), f"{prefix}optim.nonfinite")
    _choice(stage_cfg.deepspeed.precision, ("auto", "bf16", "fp16", "fp32"), f"{prefix}deepspeed.precision")
    _choice(stage_cfg.deepspeed.comm_dtype, ("fp32", "bf16", "fp16"), f"{prefix}deepspeed.comm_dtype")
    _choice(stage_cfg.distill.mode, ("hard", "soft"), f"{prefix}distill.mode")
    if not 0 <= stage_cfg.distill.alpha <= 1 or stage_cfg.distill.tau <= 0:
        raise ConfigError(
            f"{prefix}distill.alpha={stage_cfg.distill.alpha}, {prefix}distill.tau={stage_cfg.distill.tau}: alpha in [0, 1], tau > 0"
        )
    for split in ("train", "val"):  # a typo'd scheme is a path that does not exist: say which are read
        root = getattr(stage_cfg.data, split)
        if "://" in root and root.split("://")[0] not in ("http", "https", "s3", "gs", "gcs"):
            raise ConfigError(
                f"{prefix}data.{split}={root!r}: a local path, or an https://, s3:// or gs:// URL"
            )
    if "://" in stage_cfg.data.stage_dir:
        raise ConfigError(f"{prefix}data.stage_dir={stage_cfg.data.stage_dir!r}: must be a node-local folder")
    if stage_cfg.data.dali_batch < 1:
        raise ConfigError(f"{prefix}data.dali_batch={stage_cfg.data.dali_batch}: must be 1 or more")
    if stage_cfg.data.remote_cache_mb < 1:
        raise ConfigError(f"{prefix}data.remote_cache_mb={stage_cfg.data.remote_cache_mb}: must be 1 or more")
    if stage_cfg.data.repeats < 1:
        raise ConfigError(f"{prefix}data.repeats={stage_cfg.data.repeats}: must be 1 (off) or more (DeiT: 3)")
    if stage_cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"{prefix}deepspeed.zero_stage={stage_cfg.deepspeed.zero_stage}: must be 0, 1, 2 or 3"
        )
    from ffscale.models import list_models

    if stage_cfg.model.name not in list_models():
        raise ConfigError(f"{prefix}model.name={stage_cfg.model.name!r}: unknown; known: {list_models()}")
    from ffscale.models.registry import defaults

    if stage_cfg.model.heads and "heads" not in defaults(
        stage_cfg.model.name
    ):  # else a TypeError on every rank
        raise ConfigError(
            f"{prefix}model.heads={stage_cfg.model.heads}: {stage_cfg.model.name} has no attention heads"
        )
    if stage_cfg.model.token_hidden and "heads" in defaults(stage_cfg.model.name):
        raise ConfigError(
            f"{prefix}model.token_hidden={stage_cfg.model.token_hidden}: {stage_cfg.model.name} has no token MLP"
        )
    if (
        stage_cfg.model.img_size is not None and stage_cfg.model.img_size != stage_cfg.data.img_size
    ):  # else the first forward fails
        raise ConfigError(
            f"{prefix}model.img_size={stage_cfg.model.img_size} but {prefix}data.img_size={stage_cfg.data.img_size}: the loader makes "
            f"{stage_cfg.data.img_size} px images; leave model.img_size unset (it follows data.img_size) or make them equal"
        )
    img = image_size(stage_cfg)
    if stage_cfg.model.patch_size and img % stage_cfg.model.patch_size:
        raise ConfigError(
            f"{prefix}model.img_size={img} is not divisible by {prefix}model.patch_size={stage_cfg.model.patch_size}"
        )
    if stage_cfg.optim.micro_batch is not None and (
        stage_cfg.optim.micro_batch <= 0 or stage_cfg.optim.global_batch % stage_cfg.optim.micro_batch
    ):
        raise ConfigError(
            f"{prefix}optim.global_batch={stage_cfg.optim.global_batch} is not a multiple of "
            f"{prefix}optim.micro_batch={stage_cfg.optim.micro_batch}"
        )
    if stage_cfg.deepspeed.offload_optimizer and stage_cfg.deepspeed.zero_stage == 0:
        raise ConfigError(
            f"{prefix}deepspeed.offload_optimizer=true needs {prefix}deepspeed.zero_stage 1, 2 or 3"
        )
    if not 0 <= stage_cfg.optim.ema_decay < 1:
        raise ConfigError(f"{prefix}optim.ema_decay={stage_cfg.optim.ema_decay}: must be in [0, 1)")
    if stage_cfg.schedule.epochs <= 0:
        raise ConfigError(f"{prefix}schedule.epochs must be positive")


def dotted(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'optim.base_lr': 0.0005, ...}, values as they are."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def allow_change_overrides(keys: list[str]) -> list[str]:
    """`--allow-change a --allow-change b` -> the override run.allow_change=[a,b]."""
    return [f"run.allow_change=[{','.join(keys)}]"] if keys else []


def add_args(parser, allow_change: bool = False) -> None:
    """The config's command-line flags, the same for every command that reads a training config:
    YAML files merged in order, then key=value overrides (and `--allow-change` for training)."""
    parser.add_argument("--config", "-c", action="append", default=[], help="YAML file(s), merged in order")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.base_lr=1e-3")
    if allow_change:
        parser.add_argument(
            "--allow-change", action="append", default=[], metavar="KEY",
            help="resume a stage with a new value for KEY (e.g. optim.base_lr), applied from the resumed step "
            "and recorded; without it a changed config stops the resume with the differences",
        )  # fmt: skip


def from_args(args) -> Config:
    """The config that `add_args`' flags describe."""
    return load(args.config, args.overrides + allow_change_overrides(getattr(args, "allow_change", [])))


def to_yaml(cfg: Config) -> str:
    """The config as YAML with every secret masked (ffscale/util/secrets.py): what is written,
    printed or rendered never carries a credential."""
    import dataclasses

    return OmegaConf.to_yaml(OmegaConf.create(scrub(dataclasses.asdict(cfg))))


def save(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (rank 0)."""
    write_atomic(path, to_yaml(cfg))
