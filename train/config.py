"""The run configuration: typed dataclasses loaded through omegaconf's structured mode.

A run YAML may name presets under `defaults:` (``model: gpt3-small``, ``data: builtin``); they are
looked up as configs/<section>/<name>.yaml next to the run file (or above it, or among the presets
shipped in the package) and merged first, then the run file, then command-line ``key=value``
overrides. An unknown key, a wrong type or an inconsistent value fails at load time with
``<key> in <file>: <what is wrong>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..model.config import ModelConfig
from .data.curation import CurationConfig
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
    streaming: bool = False
    """Read the hf: dataset through `datasets`' streaming iterator: nothing is downloaded or cached whole,
    so a dataset larger than the disk can be prepared (with max_documents or max_mb, a sample of it)."""
    max_documents: int | None = None
    """hf: sources only: stop after this many non-empty documents."""
    max_mb: float | None = None
    """hf: sources only: stop once this many MB (UTF-8) of documents have been read (the last one whole)."""
    builtin: str | None = None
    """Name of a built-in generated corpus (arithmetic, scramble, prose)."""
    builtin_mb: float = 2.0
    """Size in MB of a generated built-in corpus."""
    text_field: str = "text"
    """Field holding the text in JSONL, Parquet and Hugging Face sources."""
    download: list[str] = field(default_factory=list)
    """URLs of the files `path` names, each optionally ending in #sha256=<hex>: downloaded and cached by
    `datasets`, or read as `path` under $SCALEGPT_DATA_ROOT when that is set; either way checked."""
    curation: CurationConfig = field(default_factory=CurationConfig)
    """What prepare does to the text before tokenizing it (train/data/curation.py)."""


@dataclass
class StageConfig:
    start_tokens: int = 0
    """Training tokens after which these weights apply: sample g is in the stage once g x n_ctx reaches it."""
    weights: dict[str, float] = field(default_factory=dict)
    """Mixture weight per source name in this stage (normalized); a source left out is not drawn in it."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """The mixture's sources; their weights are the run's from its first token (prepare only plans with them)."""
    stages: list[StageConfig] = field(default_factory=list)
    """Later mixture stages, in order of start_tokens (e.g. the last 10% of tokens on the cleanest sources);
    each source's sample order continues across a boundary."""
    dir: str = "prepared/default"
    """Where `scalegpt prepare` writes token files and manifest.json."""
    tokenizer: str = "bpe"
    """'bpe' trains a byte-level BPE of model.vocab_size tokens; 'gpt2' is GPT-2's, shipped in the package;
    else a tokenizer.json, or a folder with tokenizer.json or GPT-2's vocab.json + merges.txt. With
    model.init_from it must be the weights' own tokenizer: `${model.init_from}` says so in YAML."""
    tokenizer_sample_mb: float = 8.0
    """How much of the mixture to train the BPE on."""
    val_fraction: float = 0.01
    """The last fraction of each source's documents (or tokens, for one long document) held out."""
    num_proc: int = 2
    """Worker processes that tokenize (each encodes batches with `tokenizers`' batch encoding)."""
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
    on_spike: str = "stop"
    """What a loss spike (a non-finite loss or grad norm, or one far above the running window) does:
    'stop' ends the run with an error and saves nothing for it; 'skip' drops that step's update (the
    grad norm is read on the host every step: one device sync per step); 'rewind' goes back to the
    last good checkpoint in the same process and skips the samples that led to the spike. 'stop' is the
    default because a short experiment should show its instability, not hide it; the gpt3-* presets rewind."""
    spike_window: int = 20
    """Steps of loss and grad norm in the running window a step is compared with; none is judged
    before the window is full (non-finite values always are)."""
    spike_loss_ratio: float = 3.0
    """A loss above this many times the window's median is a spike; 0 disables the loss test. Small batches
    of a mixed corpus swing to 1.7x the median on healthy runs (the built-in corpus at batch 16), so the
    default leaves room for that; a diverging run still passes 3x within a few steps."""
    spike_grad_ratio: float = 20.0
    """A grad norm above this many times the window's median is a spike; 0 disables the test."""
    spike_max_rewinds: int = 5
    """on_spike=rewind gives up with an error after this many rewinds in one run directory."""
    spike_lr_factor: float = 1.0
    """After a rewind, multiply the learning rate by this for spike_lr_steps steps (1 keeps it)."""
    spike_lr_steps: int = 0
    """How many steps after a rewind the lowered learning rate lasts."""
    inject_fault: str = ""
    """A fire drill: 'nan@STEP', 'spike@STEP', 'crash@STEP' or 'hang@STEP' makes that fault happen once at
    step STEP (recorded in RUN/faults.json, so a rewind or a resume does not fire it again)."""
    step_timeout_s: float = 0.0
    """Watchdog: a step (with its evaluation and save) that takes longer than this many seconds ends the run
    with an error and a non-zero exit instead of a silent hang; 0 disables it."""


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
    z_loss: float = 0.0
    """Coefficient of the auxiliary loss z_loss x log(Z)^2 that keeps the softmax normalizer near 1
    (PaLM Section 5 uses 1e-4); 0 disables it, and the loss is then bit for bit the plain cross-entropy."""


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    """'cosine' (GPT-3 Appendix B) or 'wsd': warmup, flat at the peak until decay_start_tokens, then linear
    down to the floor at decay_tokens (warmup-stable-decay; it pairs with a final data stage)."""
    warmup_tokens: int = 375_000_000
    """Linear warmup length in tokens (375M in Appendix B)."""
    decay_tokens: int = 260_000_000_000
    """Where the decay reaches min_lr_ratio of the peak (cosine: from the end of warmup), then flat (260B)."""
    decay_start_tokens: int = 0
    """wsd only: where the flat peak ends and the linear decay begins."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine, as a fraction of the peak (10%)."""
    ramp_tokens: int = 0
    """Batch-size ramp length in tokens (4-12B in Appendix B); 0 disables the ramp."""
    ramp_start_tokens: int = 32_768
    """Batch size in tokens at the start of the ramp (32k in Appendix B)."""
    ramp_quantum: int = 0
    """The ramp's batch sizes are whole multiples of this many sequences, whatever the world size, so a
    ramped run trains on the same batches on any number of processes; train.micro_batch x world size must
    divide it. 0 means train.micro_batch (one process)."""


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
    out += _schedule_problems(s)
    positive("schedule.ramp_tokens", s.ramp_tokens, strict=False)
    positive("schedule.ramp_start_tokens", s.ramp_start_tokens)
    positive("schedule.ramp_quantum", s.ramp_quantum, strict=False)
    if s.ramp_quantum and t.micro_batch > 0 and s.ramp_quantum % t.micro_batch:
        out.append(("schedule.ramp_quantum", f"{s.ramp_quantum} is not divisible by train.micro_batch={t.micro_batch}"))
    out += _recovery_problems(cfg)
    positive("checkpoint.every", cfg.checkpoint.every, strict=False)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    positive("log.every", cfg.log.every)
    positive("eval.every", cfg.eval.every, strict=False)
    positive("eval.batches", cfg.eval.batches)
    out += _data_problems(cfg.data)
    if cfg.model.init_from and cfg.data.tokenizer == "bpe":
        out.append(
            (
                "data.tokenizer",
                "'bpe' trains a new tokenizer, but the weights of model.init_from come with their own; set "
                "data.tokenizer to the source's folder (in YAML, data.tokenizer: ${model.init_from})",
            )
        )
    return out


def _data_problems(d: DataConfig) -> list[tuple[str, str]]:
    """The data section's inconsistencies: split fraction, workers, and each source's name, weight and kind."""
    out: list[tuple[str, str]] = []
    if not 0.0 <= d.val_fraction < 1.0:
        out.append(("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}"))
    if d.num_proc <= 0:
        out.append(("data.num_proc", f"must be positive, got {d.num_proc}"))
    if d.invalid_utf8 not in ("skip", "error"):
        out.append(("data.invalid_utf8", f"must be 'skip' or 'error', got {d.invalid_utf8!r}"))
    names = [src.name for src in d.sources]
    for i, src in enumerate(d.sources):
        key = f"data.sources.{i}"
        if not src.name:
            out.append((f"{key}.name", "every source needs a name"))
        elif src.name in names[:i]:  # the later one is the duplicate: it is usually the one just added
            first = names.index(src.name)
            duplicate = f"duplicate source name {src.name!r} (source {first} has it); names must be unique"
            out.append((f"{key}.name", duplicate))
        if not (isinstance(src.weight, (int, float)) and math.isfinite(src.weight)) or src.weight <= 0:
            out.append((f"{key}.weight", f"must be a positive number, got {src.weight}"))
        kinds = [k for k in ("path", "hf", "builtin") if getattr(src, k)]
        if len(kinds) != 1:
            out.append((key, f"source {src.name!r} needs exactly one of path, hf or builtin (has {kinds or 'none'})"))
        out.extend(_hf_limit_problems(key, src))
    out += _stage_problems(d)
    return out


def _schedule_problems(s: ScheduleConfig) -> list[tuple[str, str]]:
    if s.kind not in ("cosine", "wsd"):
        return [("schedule.kind", f"must be 'cosine' or 'wsd', got {s.kind!r}")]
    if s.kind == "wsd" and not s.warmup_tokens <= s.decay_start_tokens < s.decay_tokens:
        return [
            (
                "schedule.decay_start_tokens",
                f"wsd needs warmup_tokens <= decay_start_tokens < decay_tokens, got {s.warmup_tokens}, "
                f"{s.decay_start_tokens} and {s.decay_tokens}",
            )
        ]
    return []


def _stage_problems(d: DataConfig) -> list[tuple[str, str]]:
    """Stage starts increase from 1 token; stage weights name known sources, are non-negative, draw something."""
    out: list[tuple[str, str]] = []
    names = {src.name for src in d.sources}
    last = 0
    for i, stage in enumerate(d.stages):
        key = f"data.stages.{i}"
        if stage.start_tokens <= last:
            out.append((f"{key}.start_tokens", f"must be above {last} (the start before it), got {stage.start_tokens}"))
        last = max(last, stage.start_tokens)
        unknown = sorted(set(stage.weights) - names) if names else []
        if unknown:
            out.append((f"{key}.weights", f"names {unknown}, which are not in data.sources ({sorted(names)})"))
        values = list(stage.weights.values())
        if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
            out.append((f"{key}.weights", f"need non-negative weights, one positive; got {dict(stage.weights)}"))
    return out


def _hf_limit_problems(key: str, src: SourceConfig) -> list[tuple[str, str]]:
    """streaming, max_documents and max_mb belong to hf: sources, and the limits must be positive."""
    out = []
    for name in ("streaming", "max_documents", "max_mb"):
        if getattr(src, name) not in (None, False) and not src.hf:
            out.append((f"{key}.{name}", f"applies to hf: sources only (source {src.name!r} has none); remove it"))
    if src.max_documents is not None and src.max_documents < 1:
        out.append((f"{key}.max_documents", f"must be at least 1, got {src.max_documents}"))
    if src.max_mb is not None and not (math.isfinite(src.max_mb) and src.max_mb > 0):
        out.append((f"{key}.max_mb", f"must be a positive number of MB, got {src.max_mb}"))
    return out


def _recovery_problems(cfg: Config) -> list[tuple[str, str]]:
    """Spike recovery, fire drills and the step watchdog."""
    from .recovery import FAULT_KINDS, parse_fault

    t, out = cfg.train, []
    if t.on_spike not in ("stop", "skip", "rewind"):
        out.append(("train.on_spike", f"must be 'stop', 'skip' or 'rewind', got {t.on_spike!r}"))
    if t.on_spike == "skip" and (t.zero_stage not in (1, 2) or t.cpu_offload):
        why = "skip needs train.zero_stage 1 or 2 without train.cpu_offload; use stop or rewind"
        out.append(("train.on_spike", why))
    if t.spike_window < 2:
        out.append(("train.spike_window", f"must be at least 2, got {t.spike_window}"))
    for key in ("spike_loss_ratio", "spike_grad_ratio"):
        value = getattr(t, key)
        if not (value == 0 or (math.isfinite(value) and value > 1)):
            out.append((f"train.{key}", f"must be 0 (off) or above 1, got {value}"))
    if t.spike_max_rewinds < 0 or t.spike_lr_steps < 0:
        key = "spike_max_rewinds" if t.spike_max_rewinds < 0 else "spike_lr_steps"
        out.append((f"train.{key}", f"must be non-negative, got {getattr(t, key)}"))
    if not 0 < t.spike_lr_factor <= 1:
        out.append(("train.spike_lr_factor", f"must be in (0, 1], got {t.spike_lr_factor}"))
    if not (math.isfinite(t.step_timeout_s) and t.step_timeout_s >= 0):
        out.append(("train.step_timeout_s", f"must be non-negative, got {t.step_timeout_s}"))
    if t.inject_fault:
        fault = parse_fault(t.inject_fault)
        if fault is None:
            kinds = " | ".join(f"{k}@STEP" for k in FAULT_KINDS)
            out.append(("train.inject_fault", f"must be {kinds} with STEP >= 1, got {t.inject_fault!r}"))
        elif fault.kind == "hang" and not t.step_timeout_s:
            out.append(("train.inject_fault", "hang@STEP needs the watchdog: set train.step_timeout_s (e.g. 30)"))
    if cfg.optim.z_loss < 0 or not math.isfinite(cfg.optim.z_loss):
        out.append(("optim.z_loss", f"must be non-negative, got {cfg.optim.z_loss}"))
    return out


PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The presets shipped inside the package (package data of `scalegpt`; in a checkout, the repository's
configs/), so that an installed `scalegpt` finds them from any directory."""


def find_config(spec: str | Path) -> Path:
    """A run config: a YAML file, else a packaged preset by name (``smoke``, ``gpt3-small``) or by its
    path in the repository (``configs/smoke.yaml``). A file of that path in the current directory wins."""
    path = Path(spec)
    if path.is_file() or (path.is_absolute() and not path.is_dir()):
        return path
    candidates = [PACKAGED_CONFIGS / path, PACKAGED_CONFIGS / f"{spec}.yaml"]
    if path.parts and path.parts[0] == "configs":
        candidates.append(PACKAGED_CONFIGS.parent / path)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and path.is_dir():  # a folder named like a preset (./continue-gpt2) does not hide it
        raise UserError(f"config {spec} is a directory; pass a YAML file, such as configs/smoke.yaml")
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
    if path.is_dir():
        raise UserError(f"config {path} is a directory; pass a YAML file, such as configs/smoke.yaml")
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


def _origin(key: str, layers: list[tuple[str, DictConfig]]) -> tuple[int, str]:
    """(index, name) of the last layer that sets `key`; the run file when none does."""
    for index in range(len(layers) - 1, -1, -1):
        origin, layer = layers[index]
        try:
            if OmegaConf.select(layer, key, throw_on_missing=False) is not None:
                return index, origin
        except OmegaConfBaseException:
            continue
    return len(layers) - 1, layers[-1][0]


def _blame(key: str, message: str, layers: list[tuple[str, DictConfig]], overridden: list[str]) -> str:
    """`key in origin: message`, against the last place that set the key or a sibling the message names
    (`d_model ... n_head=5`): a value just given on the command line is the likely mistake, not the preset."""
    section = key.rpartition(".")[0]
    siblings = [f"{section}.{name}" for name in re.findall(r"\b([a-z_][a-z0-9_]*)=", message)]
    best, best_index, best_origin = key, -1, layers[-1][0]
    for candidate in [key, *siblings]:
        if any(candidate == k or candidate.startswith(f"{k}.") for k in overridden):  # or a list set whole
            index, origin = len(layers), "the command line"
        else:
            index, origin = _origin(candidate, layers)
        if index > best_index:
            best, best_index, best_origin = candidate, index, origin
    if best != key:
        return f"{best} in {best_origin}: {key} {message}"
    return f"{key} in {best_origin}: {message}"


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
            # an interpolation (data.tokenizer='${model.init_from}') is resolved against the whole config, later
            value = text if "${" in text else OmegaConf.from_dotlist([f"value={text}"])["value"]
            _check_override_key(merged, key)
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise UserError(f"{key} in the command line: {str(exc).splitlines()[0]}") from exc
        overridden.append(key)
    _take_shape_from_source(merged, layers, overridden)
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
        raise UserError(_blame(*found[0], layers, overridden))
    return cfg


SOURCE_FREE = ("init_from", "dropout", "attn_impl")
"""model.* fields that init_from leaves to the run: they change how the weights are used, not which exist."""


def _source_shape(source: str, merged: DictConfig) -> ModelConfig:
    """model.init_from's shape. A source that has gone since the run started is not needed to resume it:
    the run directory's config.yaml, made from the same source, has the shape."""
    from .inference import resolve, source_model_config

    try:
        return source_model_config(resolve(source))
    except UserError as exc:
        saved = Path(str(merged.run.dir)) / "config.yaml"
        if saved.is_file():
            old = read_config_file(saved).model
            if old.init_from == source:
                return old
        raise UserError(f"model.init_from: {exc}") from exc


def _take_shape_from_source(merged: DictConfig, layers: list[tuple[str, DictConfig]], overridden: list[str]) -> None:
    """With model.init_from, every shape field comes from the source. One the user set (in the run file or
    on the command line) must agree with it, except a shorter n_ctx: the position embeddings are cut to it.
    A preset named under defaults: yields, since the weights decide the shape."""
    source = merged.model.init_from
    if not source:
        return
    shape = _source_shape(str(source), merged)
    run_origin, run_layer = layers[-1]
    for name, theirs in vars(shape).items():
        if name in SOURCE_FREE:
            continue
        key = f"model.{name}"
        if key in overridden:
            where = "the command line"
        elif OmegaConf.select(run_layer, key, default=None) is not None:
            where = run_origin
        else:
            merged.model[name] = theirs
            continue
        mine = merged.model[name]
        if mine == theirs or (name == "n_ctx" and 0 < mine < theirs):
            continue
        hint = (
            f"the source's position embeddings cover {theirs} tokens, so n_ctx may be at most that"
            if name == "n_ctx"
            else f"remove {key}: the shape comes from the weights"
        )
        raise UserError(
            f"{key}={mine} in {where} conflicts with model.init_from {source}, which has {name}={theirs}; {hint}"
        )


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


def from_yaml_text(text: str, origin: str = "a saved config.yaml") -> Config:
    """Inverse of to_yaml: a resolved config read back from a run directory or checkpoint. Raises a
    UserError naming `origin` when the text is not one (a hand edit gone wrong, a truncated copy)."""
    try:
        loaded = OmegaConf.create(text)
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"it holds a {type(loaded).__name__}, not a mapping of sections")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), loaded))  # type: ignore[return-value]
    except Exception as exc:  # yaml, omegaconf and ModelConfig validation raise many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{origin} is not a valid scalegpt config ({reason}); restore it or use a new run.dir") from exc


def read_config_file(path: str | Path) -> Config:
    """A resolved config.yaml (run directory, checkpoint, export), or a UserError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); restore it or use a new run.dir") from exc
    return from_yaml_text(text, origin=str(path))


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
