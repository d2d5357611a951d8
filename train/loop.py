"""The training loop: a small Trainer with explicit methods, and `scalegpt train`'s entry point."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..model import build_model
from ..model.flops import flops_per_token, mfu, peak_flops_for
from . import checkpoint as ckpt
from .config import Config, from_yaml_text, load_config, to_yaml
from .engine import DistEnv, build_engine, deepspeed_config, global_batch, init_distributed, resolve_device
from .errors import SharedUserError, UserError
from .evaluation.report import epochs_elapsed
from .metrics import MetricsLog, print0, stderr_is_tty
from .osutil import atomic_write
from .schedule import Schedule

# Keys that may change between a run directory's first start and a resume; anything else differing
# means a different experiment, which belongs in a different run directory.
RESUMABLE_CHANGES = (
    "run.dir",
    "train.max_steps",
    "train.micro_batch",
    "train.compile",
    "train.activation_checkpointing",
    "train.overlap_comm",
    "train.contiguous_gradients",
    "data.num_proc",
    "run.name",
    "checkpoint.",
    "log.",
    "eval.",
)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank, so an error found on rank 0 stops every rank instead of a hang."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TrainingDiverged(Exception):
    """Loss became NaN or infinite."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: Config, new: Config) -> list[str]:
    from omegaconf import OmegaConf

    a = _flatten(OmegaConf.to_container(OmegaConf.structured(old)))  # type: ignore[arg-type]
    b = _flatten(OmegaConf.to_container(OmegaConf.structured(new)))  # type: ignore[arg-type]
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)
    ]


def engine_step(engine: Any, data: torch.Tensor, micro_batch: int, lr: float) -> torch.Tensor:
    """Forward, backward and step through the DeepSpeed engine for every micro batch of `data` (this rank's
    rows of one optimizer step, n_ctx + 1 tokens each). DeepSpeed scales the loss for accumulation, reduces
    gradients across ranks, clips, and steps the optimizer only at the accumulation boundary. Returns the
    mean loss as a tensor, without a host-device sync."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    engine.train()
    total = torch.zeros((), device=data.device)
    chunks = data.split(micro_batch)
    for chunk in chunks:
        _, loss = engine(chunk[:, :-1], chunk[:, 1:])
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total / len(chunks)


class Trainer:
    """Owns the engine, the data and the run directory; `fit` runs the loop."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        from .data.mixture import Mixture

        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        self.state = ckpt.TrainState()
        self.batch = global_batch(cfg, env.world_size)
        self.schedule = Schedule.from_config(cfg, world_size=env.world_size)
        self.mixture = Mixture(cfg.data.dir, cfg.model.n_ctx, cfg.run.seed)
        vocab = int(self.mixture.manifest["vocab_size"])
        if vocab != cfg.model.vocab_size:
            raise UserError(
                f"the tokenizer in {cfg.data.dir} has {vocab} tokens but model.vocab_size="
                f"{cfg.model.vocab_size}; set model.vocab_size={vocab} or re-run `scalegpt prepare`"
            )
        self.config_yaml = to_yaml(cfg)
        self.meta = {"tokenizer_hash": self.mixture.tokenizer_hash, "manifest_hash": self._manifest_hash()}
        self._prepare_run_dir()

        resume = ckpt.resume_point(cfg, self.run_dir)
        universal = False
        if resume is not None:
            resume, saved = ckpt.choose_loadable(resume, cfg, self.run_dir)
            ckpt.check_compatible(resume, cfg, saved, self.meta["tokenizer_hash"], self.meta["manifest_hash"])
            if int(saved["world_size"]) != env.world_size:
                universal = True
                if env.is_main:
                    print0(
                        f"resuming on {env.world_size} process(es) from a checkpoint written by "
                        f"{saved['world_size']}: converting it to DeepSpeed's universal format"
                    )
                    ckpt.to_universal(resume, self.run_dir)
                dist.barrier()
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, device=env.device, seed=cfg.run.seed)
        self.engine = build_engine(cfg, model, env, load_universal=universal)
        if resume is not None:
            load_from = self.run_dir / "checkpoints" / ".universal" / resume.name if universal else resume
            self.state = ckpt.load(
                self.engine, load_from, universal=universal, rank=env.rank, world_size=env.world_size
            )
            print0(
                f"resumed from {resume} at step {self.state.step} (sample {self.state.samples})",
                is_main=env.is_main,
            )
        self.metrics = MetricsLog(self.run_dir, cfg) if env.is_main else None
        self.probe = None
        if cfg.eval.fewshot_probe:  # every rank: it is deterministic, and under ZeRO-3 forward is collective
            from .evaluation.probe import FewshotProbe

            self.probe = FewshotProbe.for_run(self.run_dir, cfg.model.n_ctx)
        self.flops_per_token = flops_per_token(cfg.model)
        name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        self.peak_flops = peak_flops_for(name, cfg.train.precision)
        self._stop_signal = 0
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._prefetched: tuple[tuple[int, int], Future[torch.Tensor]] | None = None
        self._pending: list[tuple[int, int, float, torch.Tensor, Any, float]] = []

    # -- run directory --------------------------------------------------------------------------
    def _manifest_hash(self) -> str:
        import hashlib

        manifest = dict(self.mixture.manifest)
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()

    def _prepare_run_dir(self) -> None:
        """Rank 0 checks the run directory holds this experiment (or none), then writes config and
        tokenizer; every rank waits, so all agree on the directory before training starts."""
        error = None
        if self.env.is_main:
            try:
                self._write_run_dir()
            except UserError as exc:
                error = str(exc)
        error = broadcast_object(error)
        if error:
            raise SharedUserError(error)

    def _write_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        existing = self.run_dir / "config.yaml"
        if existing.is_file():
            diffs = config_differences(from_yaml_text(existing.read_text()), self.cfg)
            if diffs:
                raise UserError(
                    f"run.dir {self.run_dir} was made with a different config ({'; '.join(diffs[:4])}); "
                    "use a new run.dir, or remove the old one"
                )
        atomic_write(existing, self.config_yaml)
        shutil.copyfile(Path(self.cfg.data.dir) / "tokenizer.json", self.run_dir / "tokenizer.json")

    # -- the step -----------------------------------------------------------------------------
    def _rank_indices(self, samples: int, batch: int) -> list[int]:
        """This rank's sample indices for the step starting at global sample `samples`. Row (m*W + r)*micro + i
        of the global batch goes to rank r's micro step m, so any world size sees the same global batch."""
        micro, world, r = self.cfg.train.micro_batch, self.env.world_size, self.env.rank
        gas = batch // (micro * world)
        return [samples + (m * world + r) * micro + i for m in range(gas) for i in range(micro)]

    def _load_batch(self, samples: int, batch: int) -> torch.Tensor:
        data = self.mixture.batch(self._rank_indices(samples, batch))
        return data.pin_memory() if self.env.device.type == "cuda" else data

    def _next_batch(self, batch: int) -> torch.Tensor:
        """This step's batch, prefetched during the previous step by a background thread (the sample at
        index g is a pure function of g, so reading ahead changes nothing); then queue the next one."""
        key = (self.state.samples, batch)
        if self._prefetched is not None and self._prefetched[0] == key:
            data = self._prefetched[1].result()
        else:
            data = self._load_batch(*key)
        after = self.state.samples + batch
        next_batch = self.schedule.batch_size(self.state.tokens + batch * self.cfg.model.n_ctx)
        self._prefetched = ((after, next_batch), self._loader.submit(self._load_batch, after, next_batch))
        return data.to(self.env.device, non_blocking=True)

    def train_step(self) -> tuple[torch.Tensor, float, int]:
        """One optimizer step (all its accumulation micro steps). Returns the rank's mean loss as a
        tensor (no host sync), the lr and the number of sequences in the global batch."""
        batch = self.schedule.batch_size(self.state.tokens)
        if batch != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch)  # batch ramp: more accumulation, same micro batch
        lr = self.schedule.lr(self.state.tokens + batch * self.cfg.model.n_ctx)
        loss = engine_step(self.engine, self._next_batch(batch), self.cfg.train.micro_batch, lr)
        self.state.step += 1
        self.state.samples += batch
        self.state.tokens += batch * self.cfg.model.n_ctx
        return loss, lr, batch

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and bits per byte per source and for the mixture (weighted by the mixture's
        weights). Batches are sharded over ranks and the sums all-reduced."""
        self.engine.eval()
        out: dict[str, float] = {}
        mix_loss = mix_bpb = 0.0
        for i, name in enumerate(self.mixture.names):
            sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
            batches = self.mixture.val_batches(name, self.cfg.train.micro_batch, self.cfg.eval.batches)
            for j, data in enumerate(batches):
                if j % self.env.world_size != self.env.rank:
                    continue
                data = data.to(self.env.device)
                _, loss = self.engine.module(data[:, :-1], data[:, 1:])
                n = data[:, 1:].numel()
                sums[0] += loss.detach().double() * n  # stays on the device: one sync per source, below
                sums[1] += n
            dist.all_reduce(sums)
            total, count = sums.tolist()
            if count == 0:
                continue
            loss = total / count
            bpb = loss / math.log(2) / self.mixture.val_bytes_per_token(name)  # loss x tokens / (ln2 x bytes)
            out[f"val_loss/{name}"], out[f"val_bpb/{name}"] = loss, bpb
            mix_loss += float(self.mixture.weights[i]) * loss
            mix_bpb += float(self.mixture.weights[i]) * bpb
        out["val_loss"], out["val_bpb"] = mix_loss, mix_bpb
        if self.probe is not None:
            out.update(self.probe(self.engine.module))  # fewshot/mc-2D+, fewshot/2D+ at K=few
        return out

    # -- logging --------------------------------------------------------------------------------------
    def _flush(self, extra: dict[int, dict[str, Any]] | None = None) -> None:
        """Sync pending step losses once (one all-reduce), check they are finite, write metrics."""
        if not self._pending:
            return
        losses = torch.stack([p[3] for p in self._pending])
        dist.all_reduce(losses)
        losses = (losses / self.env.world_size).tolist()
        for (step, tokens, lr, _, gnorm, elapsed), loss in zip(self._pending, losses, strict=True):
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss} at step {step}")
            if self.metrics is None:
                continue
            record: dict[str, Any] = {
                "step": step,
                "tokens": tokens,
                "loss": loss,
                "lr": lr,
                "grad_norm": None if gnorm is None else float(gnorm),
                "tokens_per_sec": self._tps,
                "mfu": self._mfu,
                "world_size": self.env.world_size,
                "elapsed_s": round(elapsed, 3),
            }
            record.update((extra or {}).get(step, {}))
            record.update(epochs_elapsed(self.mixture, tokens))
            self.metrics.write(record)
        self._last_loss = losses[-1]
        self._pending.clear()

    def _baseline_eval(self) -> None:
        """Validation before the first step, so every curve starts from the untrained model."""
        result = self.evaluate()
        if self.metrics is not None:
            record = dict.fromkeys(("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"))
            self.metrics.write(
                {"step": 0, "tokens": 0, **record, "world_size": self.env.world_size, "elapsed_s": 0.0, **result}
            )
        print0(
            f"step 0/{self.cfg.train.max_steps} | val_loss {result['val_loss']:.4f} val_bpb {result['val_bpb']:.3f}",
            is_main=self.env.is_main,
        )

    def _signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        flag = torch.tensor([self._stop_signal], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def save(self) -> Path:
        return ckpt.save(
            self.engine,
            self.state,
            cfg=self.cfg,
            config_yaml=self.config_yaml,
            run_dir=self.run_dir,
            world_size=self.env.world_size,
            rank=self.env.rank,
            meta=self.meta,
        )

    def fit(self) -> int:
        cfg, env = self.cfg, self.env
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._signal)
        if self.state.step >= cfg.train.max_steps:
            print0(
                f"already at step {self.state.step} >= train.max_steps={cfg.train.max_steps}; nothing to do",
                is_main=env.is_main,
            )
            return 0
        print0(
            f"training {cfg.run.dir}: {sum(p.numel() for p in self.engine.module.parameters()):,} parameters, "
            f"{env.world_size} process(es) on {env.device.type}, ZeRO-{cfg.train.zero_stage}, "
            f"{cfg.train.precision}, global batch {self.batch} x {cfg.model.n_ctx} tokens",
            is_main=env.is_main,
        )
        bar = None
        if env.is_main and cfg.log.progress and stderr_is_tty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True)
        self._tps: float | None = None
        self._mfu: float | None = None
        self._last_loss = float("nan")
        if self.state.step == 0 and cfg.eval.every:
            self._baseline_eval()
        t0 = time.perf_counter()
        window_t, window_tokens = t0, 0
        stopped_by = 0
        try:
            while self.state.step < cfg.train.max_steps:
                loss, lr, batch = self.train_step()
                window_tokens += batch * cfg.model.n_ctx
                gnorm = self.engine.get_global_grad_norm()
                self._pending.append((self.state.step, self.state.tokens, lr, loss, gnorm, time.perf_counter() - t0))
                step = self.state.step
                last = step >= cfg.train.max_steps
                evaluate = cfg.eval.every and (step % cfg.eval.every == 0 or last)
                saving = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last
                if step % cfg.log.every == 0 or evaluate or saving or last:
                    if env.device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    self._tps = window_tokens / max(now - window_t, 1e-9)
                    self._mfu = mfu(self._tps, cfg.model, self.peak_flops * env.world_size) if self.peak_flops else None
                    window_t, window_tokens = now, 0
                    extra = {step: self.evaluate()} if evaluate else None
                    self._flush(extra)
                    if env.is_main:
                        line = (
                            f"step {step}/{cfg.train.max_steps} loss {self._last_loss:.4f} lr {lr:.2e} "
                            f"{self._tps:,.0f} tok/s"
                        )
                        if extra:
                            line += f" | val_loss {extra[step]['val_loss']:.4f} val_bpb {extra[step]['val_bpb']:.3f}"
                        if bar is not None:
                            bar.set_postfix_str(f"loss {self._last_loss:.3f} lr {lr:.1e} {self._tps:,.0f} tok/s")
                            bar.write(line)
                        else:
                            print0(line)
                    stopped_by = 0 if last else int(self._should_stop())
                if bar is not None:
                    bar.update(1)
                if saving or stopped_by:
                    path = self.save()
                    print0(f"saved {path}", is_main=env.is_main)
                if stopped_by:
                    print0(
                        f"received a stop signal: saved step {self.state.step} to {path} and stopped; "
                        "run the same command again to resume",
                        is_main=env.is_main,
                    )
                    break
        except TrainingDiverged as exc:
            raise UserError(
                f"{exc}; nothing was saved for it (the last good checkpoint is untouched). "
                "Lower optim.lr, raise schedule.warmup_tokens, or use train.precision=fp32"
            ) from exc
        finally:
            if bar is not None:
                bar.close()
            if self.metrics is not None:
                self.metrics.close()
            self._loader.shutdown(wait=True, cancel_futures=True)
        return 0


def dry_run(cfg: Config) -> int:
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(to_yaml(cfg))
    print(json.dumps(deepspeed_config(cfg, world_size=world, device=resolve_device(cfg)), indent=2))
    return 0


def train_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        return dry_run(cfg)
    env = init_distributed(cfg)
    try:
        return Trainer(cfg, env).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
