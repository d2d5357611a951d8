"""The run configuration: typed dataclasses loaded through omegaconf's structured mode.

A run YAML may name presets under `defaults:` (``model: gpt3-small``, ``data: builtin``); they are
looked up as configs/<section>/<name>.yaml next to the run file (or above it, or among the presets
shipped in the package) and merged first, then the run file, then command-line ``key=value``
overrides. An unknown key, a wrong type or an inconsistent value fails at load time with
``<key> in <file>: <what is wrong>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..model.config import ModelConfig
from .errors import UserError

PRESET_SECTIONS = ("model", "data")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, tokenizer.json, metrics.jsonl, checkpoints/."""
    seed: int = 1337
    """Seed for initialization, data order and dropout; same seed and config -> same losses."""
    name: str = ""
    """Free-form run name, shown in logs and wandb."""


@dataclass
class SourceConfig:
    name: str = ""
    """Unique name of the source (used in the manifest and in per-source metrics)."""
    weight: float = 1.0
    """Sampling weight in the mixture (normalized over sources, GPT-3 Table 2.2)."""
    path: str | None = None
    """Local text (.txt), JSONL (.jsonl/.json) or Parquet: a file, a directory or a glob."""
    hf: str | None = None
    """A Hugging Face dataset name (or local dataset folder) read with datasets.load_dataset."""
    hf_config: str | None = None
    """The dataset configuration name, if it has several."""
    split: str = "train"
    """The dataset split to read."""
    builtin: str | None = None
    """Name of a built-in generated corpus (arithmetic, scramble, prose)."""
    builtin_mb: float = 2.0
    """Size in MB of a generated built-in corpus."""
    text_field: str = "text"
    """Field holding the text in JSONL, Parquet and Hugging Face sources."""
    download: list[str] = field(default_factory=list)
    """URLs of the files `path` names, each optionally ending in #sha256=<hex>: downloaded and cached by
    `datasets`, or read as `path` under $SCALEGPT_DATA_ROOT when that is set; either way checked."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """The mixture's sources."""
    dir: str = "prepared/default"
    """Where `scalegpt prepare` writes token files and manifest.json."""
    tokenizer: str = "bpe"
    """'bpe' trains a byte-level BPE of model.vocab_size tokens; 'gpt2' is GPT-2's, shipped in the package;
    else a tokenizer.json, or a folder with tokenizer.json or GPT-2's vocab.json + merges.txt."""
    tokenizer_sample_mb: float = 8.0
    """How much of the mixture to train the BPE on."""
    val_fraction: float = 0.01
    """The last fraction of each source's documents (or tokens, for one long document) held out."""
    num_proc: int = 2
    """Worker processes for tokenization (datasets.map num_proc)."""
    invalid_utf8: str = "skip"
    """'skip' drops undecodable lines and counts them; 'error' stops."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch: int = 4
    """Sequences per GPU (or process) per forward/backward."""
    global_batch: int = 0
    """Sequences per optimizer step over all ranks; 0 means micro_batch x world size."""
    precision: str = "bf16"
    """'bf16', 'fp16' (with dynamic loss scaling) or 'fp32'."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0 to 3."""
    device: str = "auto"
    """'auto' (cuda when available), 'cuda' or 'cpu'."""
    compile: bool = False
    """torch.compile the model."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    overlap_comm: bool = True
    """ZeRO-2: overlap gradient reduction with the backward pass."""
    contiguous_gradients: bool = True
    """ZeRO-2: copy gradients into one buffer as they are produced, avoiding fragmentation."""
    cpu_offload: bool = False
    """ZeRO-Offload: keep the optimizer on the CPU, stepped by DeepSpeed's CPU Adam (compiled at start-up:
    needs a C++ compiler and ninja)."""
    dist_timeout_minutes: float = 60.0
    """How long a collective (or a barrier) may wait before the job fails; rank 0 alone converting or
    writing a big checkpoint keeps the others waiting."""


@dataclass
class OptimConfig:
    lr: float = 6e-4
    """Peak learning rate (Table 2.1 per model size)."""
    beta1: float = 0.9
    """Adam beta1 (Appendix B)."""
    beta2: float = 0.95
    """Adam beta2 (Appendix B)."""
    eps: float = 1e-8
    """Adam epsilon (Appendix B)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on 2-D weight matrices (Appendix B)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (Appendix B); 0 disables."""


@dataclass
class ScheduleConfig:
    warmup_tokens: int = 375_000_000
    """Linear warmup length in tokens (375M in Appendix B)."""
    decay_tokens: int = 260_000_000_000
    """Cosine decay to min_lr_ratio of the peak over this many tokens, then flat (260B)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine, as a fraction of the peak (10%)."""
    ramp_tokens: int = 0
    """Batch-size ramp length in tokens (4-12B in Appendix B); 0 disables the ramp."""
    ramp_start_tokens: int = 32_768
    """Batch size in tokens at the start of the ramp (32k in Appendix B)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps; 0 saves only at the end."""
    keep: int = 3
    """How many recent checkpoints to keep."""
    resume: str = "auto"
    """'auto' (latest in the run directory), 'never', or a checkpoint path."""
    fallback: bool = False
    """When the newest checkpoint is corrupt, resume from the previous one instead of stopping."""


@dataclass
class LogConfig:
    every: int = 1
    """Print and record a metrics line every this many steps."""
    progress: bool = True
    """Live progress bar on rank 0."""
    wandb: bool = False
    """Log to Weights & Biases on rank 0 (offline mode when no API key is set)."""
    wandb_project: str = "scalegpt"
    """The wandb project."""


@dataclass
class EvalConfig:
    every: int = 100
    """Validation every this many steps (and at the end); 0 disables."""
    batches: int = 4
    """Validation batches per source."""
    fewshot_probe: bool = False
    """Add a small few-shot arithmetic probe to periodic evaluation."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed JSON keys, merged last; a key that contradicts the sections above is an error."""

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch * self.model.n_ctx


def problems(cfg: Config) -> list[tuple[str, str]]:
    """Every inconsistency in a loaded config, as (dotted key, message)."""
    out = [(f"model.{k}", m) for k, m in cfg.model.problems()]
    t, o, s = cfg.train, cfg.optim, cfg.schedule

    def positive(key: str, value: float, strict: bool = True) -> None:
        if (value <= 0 if strict else value < 0) or (isinstance(value, float) and not math.isfinite(value)):
            out.append((key, f"must be {'positive' if strict else 'non-negative'}, got {value}"))

    positive("train.max_steps", t.max_steps)
    positive("train.micro_batch", t.micro_batch)
    positive("train.global_batch", t.global_batch, strict=False)
    positive("train.dist_timeout_minutes", t.dist_timeout_minutes)
    if t.global_batch and t.micro_batch > 0 and t.global_batch % t.micro_batch:
        out.append(("train.global_batch", f"{t.global_batch} is not divisible by train.micro_batch={t.micro_batch}"))
    if t.precision not in ("bf16", "fp16", "fp32"):
        out.append(("train.precision", f"must be 'bf16', 'fp16' or 'fp32', got {t.precision!r}"))
    if t.zero_stage not in (0, 1, 2, 3):
        out.append(("train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}"))
    if t.device not in ("auto", "cpu", "cuda"):
        out.append(("train.device", f"must be 'auto', 'cpu' or 'cuda', got {t.device!r}"))
    positive("optim.lr", o.lr)
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            out.append((f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}"))
    positive("optim.eps", o.eps)
    positive("optim.weight_decay", o.weight_decay, strict=False)
    positive("optim.grad_clip", o.grad_clip, strict=False)
    positive("schedule.warmup_tokens", s.warmup_tokens, strict=False)
    positive("schedule.decay_tokens", s.decay_tokens)
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        out.append(("schedule.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}"))
    positive("schedule.ramp_tokens", s.ramp_tokens, strict=False)
    positive("schedule.ramp_start_tokens", s.ramp_start_tokens)
    positive("checkpoint.every", cfg.checkpoint.every, strict=False)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    positive("log.every", cfg.log.every)
    positive("eval.every", cfg.eval.every, strict=False)
    positive("eval.batches", cfg.eval.batches)
    d = cfg.data
    if not 0.0 <= d.val_fraction < 1.0:
        out.append(("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}"))
    positive("data.num_proc", d.num_proc)
    if d.invalid_utf8 not in ("skip", "error"):
        out.append(("data.invalid_utf8", f"must be 'skip' or 'error', got {d.invalid_utf8!r}"))
    names = [src.name for src in d.sources]
    for i, src in enumerate(d.sources):
        key = f"data.sources.{i}"
        if not src.name:
            out.append((f"{key}.name", "every source needs a name"))
        elif names.count(src.name) > 1:
            out.append((f"{key}.name", f"duplicate source name {src.name!r}; names must be unique"))
        if not (isinstance(src.weight, (int, float)) and math.isfinite(src.weight)) or src.weight <= 0:
            out.append((f"{key}.weight", f"must be a positive number, got {src.weight}"))
        kinds = [k for k in ("path", "hf", "builtin") if getattr(src, k)]
        if len(kinds) != 1:
            out.append((key, f"source {src.name!r} needs exactly one of path, hf or builtin (has {kinds or 'none'})"))
    return out


PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The presets shipped inside the package (package data of `scalegpt`; in a checkout, the repository's
configs/), so that an installed `scalegpt` finds them from any directory."""


def find_config(spec: str | Path) -> Path:
    """A run config: a YAML file, else a packaged preset by name (``smoke``, ``gpt3-small``) or by its
    path in the repository (``configs/smoke.yaml``). A file of that path in the current directory wins."""
    path = Path(spec)
    if path.is_file() or path.is_absolute():
        return path
    candidates = [PACKAGED_CONFIGS / path, PACKAGED_CONFIGS / f"{spec}.yaml"]
    if path.parts and path.parts[0] == "configs":
        candidates.append(PACKAGED_CONFIGS.parent / path)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        names = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
        raise UserError(f"config file {spec} does not exist; pass a YAML file or a packaged preset: {names}")
    return found


def _find_preset(section: str, name: str, near: Path) -> Path:
    """configs/<section>/<name>.yaml beside the run file or in a folder above it, else the packaged one."""
    for base in (near, *near.parents):
        candidate = base / section / f"{name}.yaml"
        if candidate.is_file():
            return candidate
        candidate = base / "configs" / section / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    packaged = PACKAGED_CONFIGS / section / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in (PACKAGED_CONFIGS / section).glob("*.yaml")))
    raise UserError(
        f"defaults.{section} in {near}: no preset {section}/{name}.yaml beside the run file, above it or "
        f"packaged; packaged {section} presets: {known}"
    )


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a YAML file such as configs/smoke.yaml")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path} must hold a mapping of sections, not a {type(loaded).__name__}")
    return loaded


def _layers(path: Path) -> list[tuple[str, DictConfig]]:
    """(origin, partial config) pairs in merge order: presets, then the run file itself."""
    run = _read_yaml(path)
    layers: list[tuple[str, DictConfig]] = []
    defaults = run.pop("defaults", None) or {}
    if isinstance(defaults, ListConfig):  # also accept hydra-style [{model: x}, {data: y}]
        merged: dict[str, Any] = {}
        for item in defaults:
            merged.update(OmegaConf.to_container(item))
        defaults = merged
    for section, name in dict(defaults).items():
        if section not in PRESET_SECTIONS:
            raise UserError(f"defaults.{section} in {path}: presets exist only for {', '.join(PRESET_SECTIONS)}")
        preset_path = _find_preset(section, str(name), path.parent)
        layers.append((str(preset_path), OmegaConf.create({section: _read_yaml(preset_path)})))
    layers.append((str(path), run))
    return layers


def _origin(key: str, layers: list[tuple[str, DictConfig]]) -> str:
    for origin, layer in reversed(layers):
        try:
            if OmegaConf.select(layer, key, throw_on_missing=False) is not None:
                return origin
        except OmegaConfBaseException:
            continue
    return layers[-1][0]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, compose, override and validate a run config. Raises UserError naming key and file.

    Overrides are applied one by one with OmegaConf.update, so list items can be addressed by index
    (``data.sources.0.weight=2``), which a merged dot-list cannot do."""
    path = find_config(path)
    layers = _layers(path)
    merged = OmegaConf.structured(Config)
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", "") or "?"
            raise UserError(f"{key} in {origin}: {str(exc).splitlines()[0]}") from exc
    overridden: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (for example model.n_layer=4)")
        try:
            value = OmegaConf.from_dotlist([f"value={text}"])["value"]
            _check_override_key(merged, key)
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise UserError(f"{key} in the command line: {str(exc).splitlines()[0]}") from exc
        overridden.append(key)
    model = ModelConfig.__new__(ModelConfig)  # unvalidated, so that its problems can name their key
    model.__dict__.update(OmegaConf.to_container(merged.model))
    found = [(f"model.{k}", m) for k, m in model.problems()]
    if not found:
        try:
            cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
        except (OmegaConfBaseException, ValueError) as exc:
            raise UserError(f"{path}: {str(exc).splitlines()[0]}") from exc
        found = problems(cfg)
    if found:
        key, message = found[0]
        origin = "the command line" if key in overridden else _origin(key, layers)
        raise UserError(f"{key} in {origin}: {message}")
    return cfg


def _check_override_key(cfg: DictConfig, key: str) -> None:
    """Every part of `key` must exist, except below a dict-typed field (the deepspeed pass-through),
    which takes new keys; list items are addressed by an index that must be in range."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not (part.isdigit() and int(part) < len(node)):
                raise UserError(f"{key} in the command line: {'.'.join(parts[:i])} has {len(node)} items")
            node = node[int(part)]
        elif isinstance(node, DictConfig):
            if part not in node:
                if node._metadata.object_type in (None, dict):  # an open dict: new keys are fine
                    return
                section = node._metadata.object_type.__name__
                raise UserError(f"{key} in the command line: no such key ({part!r} is not in {section})")
            node = node._get_node(part)
        else:
            raise UserError(f"{key} in the command line: {'.'.join(parts[:i])} is a value, not a section")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written to every run directory and checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml_text(text: str) -> Config:
    """Inverse of to_yaml: a resolved config read back from a run directory or checkpoint."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def global_batch(cfg: Config, world_size: int) -> int:
    """Sequences per optimizer step; a clear error when it does not split into whole micro batches."""
    micro = cfg.train.micro_batch
    batch = cfg.train.global_batch or micro * world_size
    if batch % (micro * world_size):
        raise UserError(
            f"train.global_batch={batch} is not divisible by train.micro_batch={micro} x world size {world_size}; "
            f"choose a global batch that is a multiple of {micro * world_size}, or change the micro batch or "
            "the number of processes"
        )
    return batch
