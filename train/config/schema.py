"""The run configuration's schema: the typed dataclasses every module reads, and their YAML form.

This is the leaf of the config package: it imports nothing of ours but model/'s ModelConfig and the
UserError that a broken saved config.yaml is reported with, so the checkpoint writer and the weights
reader can read a resolved config without pulling in the loader (which resolves model.init_from through
them). The composition of presets, files and overrides is train/config/loading.py; the checks that span
fields are train/config/validation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ...model.config import ModelConfig
from ..data.curation import CurationConfig
from ..errors import UserError


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, tokenizer.json, metrics.jsonl, checkpoints/."""
    seed: int = 1337
    """Seed for initialization, data order and dropout; same seed and config -> same losses."""
    name: str = ""
    """Free-form run name, shown in logs and wandb."""


@dataclass
class SourceSpec:
    """Where a source's text comes from: all a reference source has (data.reference_sources), and what a
    mixture source (SourceConfig) adds its weight and curation to."""

    name: str = ""
    """Unique name of the source over data.sources and data.reference_sources (used in the manifest, in
    per-source metrics and by curation steps)."""
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
    """Name of a built-in generated corpus (arithmetic, scramble, prose, junk)."""
    builtin_mb: float = 2.0
    """Size in MB of a generated built-in corpus."""
    text_field: str = "text"
    """Field holding the text in JSONL, Parquet and Hugging Face sources."""
    text_documents: str = "file"
    """How a plain-text file divides into documents: 'file' (the whole file is one) or 'line' (each non-empty line
    is one, its newline dropped: a corpus kept one document a line, or paragraphs that curation should judge
    one by one)."""
    download: list[str] = field(default_factory=list)
    """URLs of the files `path` names, each optionally ending in #sha256=<hex>: downloaded and cached by
    `datasets`, or read as `path` under $SCALEGPT_DATA_ROOT when that is set; either way checked."""


@dataclass
class SourceConfig(SourceSpec):
    """A source of the mixture: tokenized by prepare and drawn by the trainer."""

    weight: float = 1.0
    """Sampling weight in the mixture (normalized over sources, GPT-3 Table 2.2)."""
    curation: CurationConfig = field(default_factory=CurationConfig)
    """What prepare does to the text before tokenizing it (train/data/curation.py)."""


@dataclass
class ReferenceSourceConfig(SourceSpec):
    """Text that curation steps read and the mixture never holds: no weight (it is never drawn) and no curation
    (it is read as it is). Its own class so that a weight or curation set on one is named as the mistake."""


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
    reference_sources: list[ReferenceSourceConfig] = field(default_factory=list)
    """Text that curation steps read and the mixture never holds: a quality filter's positives or negatives
    (e.g. generated junk) that must not be trained on. Never tokenized, drawn or listed in the manifest."""
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
