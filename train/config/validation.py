"""The checks on a loaded config that span fields or sections: each problem as (dotted key, message),
so that the loader can name the key and the file that set it."""

from __future__ import annotations

import math

from ..errors import UserError
from ..recovery import FAULT_KINDS, parse_fault
from .schema import Config, DataConfig, ScheduleConfig, SourceConfig, SourceSpec


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
    """The data section's inconsistencies: split fraction, workers, each source's weight, and the name and kind
    of each source and reference source."""
    out: list[tuple[str, str]] = []
    if not 0.0 <= d.val_fraction < 1.0:
        out.append(("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}"))
    if d.num_proc <= 0:
        out.append(("data.num_proc", f"must be positive, got {d.num_proc}"))
    if d.invalid_utf8 not in ("skip", "error"):
        out.append(("data.invalid_utf8", f"must be 'skip' or 'error', got {d.invalid_utf8!r}"))
    listed: list[tuple[str, SourceSpec]] = [(f"data.sources.{i}", s) for i, s in enumerate(d.sources)]
    listed += [(f"data.reference_sources.{i}", s) for i, s in enumerate(d.reference_sources)]
    seen: dict[str, str] = {}
    for key, src in listed:
        if not src.name:
            out.append((f"{key}.name", "every source needs a name"))
        elif src.name in seen:  # the later one is the duplicate: it is usually the one just added
            duplicate = (
                f"duplicate source name {src.name!r} ({seen[src.name]} has it); names must be unique over "
                "data.sources and data.reference_sources"
            )
            out.append((f"{key}.name", duplicate))
        else:
            seen[src.name] = key
        if isinstance(src, SourceConfig) and not _positive_number(src.weight):  # a reference source has none
            out.append((f"{key}.weight", f"must be a positive number, got {src.weight}"))
        kinds = [k for k in ("path", "hf", "builtin") if getattr(src, k)]
        if len(kinds) != 1:
            out.append((key, f"source {src.name!r} needs exactly one of path, hf or builtin (has {kinds or 'none'})"))
        out.extend(_hf_limit_problems(key, src))
        if src.text_documents not in ("file", "line"):
            out.append((f"{key}.text_documents", f"must be 'file' or 'line', got {src.text_documents!r}"))
        elif src.text_documents == "line" and not src.path:
            out.append((f"{key}.text_documents", f"applies to path: sources only (source {src.name!r}); remove it"))
    out += _stage_problems(d)
    return out


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


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
            message = f"names {unknown}, which are not in data.sources ({sorted(names)})"
            if refs := [n for n in unknown if n in {r.name for r in d.reference_sources}]:
                message += f"; {', '.join(refs)}: a reference source is read by curation only, never drawn"
            out.append((f"{key}.weights", message))
        values = list(stage.weights.values())
        if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
            out.append((f"{key}.weights", f"need non-negative weights, one positive; got {dict(stage.weights)}"))
    return out


def _hf_limit_problems(key: str, src: SourceSpec) -> list[tuple[str, str]]:
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
        elif t.max_steps and fault.step > t.max_steps:
            past = f"step {fault.step} is past train.max_steps={t.max_steps}, so it would never fire"
            out.append(("train.inject_fault", past))
        elif fault.kind == "hang" and not t.step_timeout_s:
            out.append(("train.inject_fault", "hang@STEP needs the watchdog: set train.step_timeout_s (e.g. 30)"))
    if cfg.optim.z_loss < 0 or not math.isfinite(cfg.optim.z_loss):
        out.append(("optim.z_loss", f"must be non-negative, got {cfg.optim.z_loss}"))
    return out


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
