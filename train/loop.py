"""The training loop: a small Trainer with explicit methods, and `scalegpt train`'s entry point."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..model import build_model
from ..model.flops import peak_flops_for
from . import checkpoint as ckpt
from .config import Config, from_yaml_text, load_config, to_yaml
from .engine import (
    DistEnv,
    build_engine,
    compiled_ops_note,
    deepspeed_config,
    dist_kwargs,
    global_batch,
    init_distributed,
    resolve_device,
)
from .errors import SharedUserError, UserError
from .metrics import Console, MetricsLog, StepLog, TrainingDiverged
from .osutil import atomic_write
from .schedule import Cadence, Schedule

if TYPE_CHECKING:
    from .data.mixture import Mixture

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
    "train.dist_timeout_minutes",
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
        loss = engine(chunk[:, :-1], chunk[:, 1:])[1]  # with targets the model returns no logits
        engine.backward(loss)
        engine.step()
        total += loss.detach().float()
    return total / len(chunks)


class Validator:
    """Validation loss and bits per byte per source and for the mixture (weighted by the mixture's
    weights), plus the optional few-shot probe; due every eval.every steps and at the last step."""

    def __init__(self, cfg: Config, env: DistEnv, mixture: Mixture, run_dir: Path) -> None:
        self.cfg, self.env, self.mixture = cfg, env, mixture
        self.cadence = Cadence(cfg.eval.every, at_end=bool(cfg.eval.every))
        self.probe = None
        if cfg.eval.fewshot_probe:  # every rank: it is deterministic, and under ZeRO-3 forward is collective
            from .evaluation.probe import FewshotProbe

            self.probe = FewshotProbe.for_run(run_dir, cfg.model.n_ctx)

    def should_evaluate(self, step: int, *, last: bool) -> bool:
        return self.cadence.due(step, last=last)

    @torch.no_grad()
    def evaluate(self, engine: Any) -> dict[str, float]:
        """Batches are sharded over ranks; the per-source sums stay on the device until one all-reduce and
        one read at the end."""
        engine.eval()
        names = self.mixture.names
        sums = torch.zeros(len(names), 2, dtype=torch.float64, device=self.env.device)  # (source, [loss x n, n])
        for i, name in enumerate(names):
            batches = self.mixture.val_batches(name, self.cfg.train.micro_batch, self.cfg.eval.batches)
            for j, data in enumerate(batches):
                if j % self.env.world_size != self.env.rank:
                    continue
                data = data.to(self.env.device)
                _, loss = engine.module(data[:, :-1], data[:, 1:])
                n = data[:, 1:].numel()
                sums[i, 0] += loss.detach().double() * n
                sums[i, 1] += n
        dist.all_reduce(sums)
        out: dict[str, float] = {}
        mix_loss = mix_bpb = 0.0
        for i, (name, (total, count)) in enumerate(zip(names, sums.tolist(), strict=True)):
            if count == 0:
                continue
            loss = total / count
            bpb = loss / math.log(2) / self.mixture.val_bytes_per_token(name)  # loss x tokens / (ln2 x bytes)
            out[f"val_loss/{name}"], out[f"val_bpb/{name}"] = loss, bpb
            mix_loss += float(self.mixture.weights[i]) * loss
            mix_bpb += float(self.mixture.weights[i]) * bpb
        out["val_loss"], out["val_bpb"] = mix_loss, mix_bpb
        if self.probe is not None:
            out.update(self.probe(engine.module))  # fewshot/mc-2D+, fewshot/2D+ at K=few
        return out


class Trainer:
    """Owns the engine, the data and the run directory; `fit` runs the loop, and the components it holds
    (validator, checkpointer, step log) each decide when they are due."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        from .data.mixture import Mixture

        self.cfg, self.env = cfg, env
        self.console = Console(env.is_main)
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
        self.checkpointer = ckpt.Checkpointer(
            cfg, self.run_dir, config_yaml=self.config_yaml, meta=self.meta, rank=env.rank, world_size=env.world_size
        )
        resume = self._plan_resume()
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, device=env.device, seed=cfg.run.seed)
        self.engine = build_engine(cfg, model, env, load_universal=resume is not None and resume.universal)
        if resume is not None:
            self._resume(resume)
        metrics = MetricsLog(self.run_dir, cfg) if env.is_main else None
        self.validator = Validator(cfg, env, self.mixture, self.run_dir)
        name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        self.log = StepLog(
            cfg,
            world_size=env.world_size,
            console=self.console,
            metrics=metrics,
            mixture=self.mixture,
            peak_flops=peak_flops_for(name, cfg.train.precision),
        )
        self._stop_signal = 0
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._prefetched: tuple[tuple[int, int], Future[torch.Tensor]] | None = None

    # -- run directory and resume ---------------------------------------------------------------
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

    def _plan_resume(self) -> ckpt.Resume | None:
        """The checkpoint to continue from, verified before the model is built. Another world size needs
        DeepSpeed's universal format, which rank 0 writes while the others wait."""
        resume = ckpt.plan_resume(self.cfg, self.run_dir, world_size=self.env.world_size, meta=self.meta)
        if resume is not None and resume.universal:
            self.console.print(
                f"resuming on {self.env.world_size} process(es) from a checkpoint written by "
                f"{resume.saved_world_size}: converting it to DeepSpeed's universal format"
            )
            if self.env.is_main:
                ckpt.to_universal(resume.path, self.run_dir)
            dist.barrier()
        return resume

    def _resume(self, resume: ckpt.Resume) -> None:
        self.state = self.checkpointer.load(self.engine, resume)
        self.console.print(f"resumed from {resume.path} at step {self.state.step} (sample {self.state.samples})")

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

    def train_step(self) -> None:
        """One optimizer step (all its accumulation micro steps). Its loss and grad norm join the step log
        as device tensors: nothing here waits for the device."""
        batch = self.schedule.batch_size(self.state.tokens)
        if batch != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch)  # batch ramp: more accumulation, same micro batch
        lr = self.schedule.lr(self.state.tokens + batch * self.cfg.model.n_ctx)
        loss = engine_step(self.engine, self._next_batch(batch), self.cfg.train.micro_batch, lr)
        self.state.step += 1
        self.state.samples += batch
        self.state.tokens += batch * self.cfg.model.n_ctx
        grad_norm = self.engine.get_global_grad_norm()
        self.log.record(step=self.state.step, tokens=self.state.tokens, lr=lr, loss=loss, grad_norm=grad_norm)

    # -- the loop ---------------------------------------------------------------------------------
    def _signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _banner(self) -> str:
        cfg, env = self.cfg, self.env
        return (
            f"training {cfg.run.dir}: {sum(p.numel() for p in self.engine.module.parameters()):,} parameters, "
            f"{env.world_size} process(es) on {env.device.type}, ZeRO-{cfg.train.zero_stage}, "
            f"{cfg.train.precision}, global batch {self.batch} x {cfg.model.n_ctx} tokens"
        )

    def fit(self) -> int:
        max_steps = self.cfg.train.max_steps
        try:
            if self.state.step >= max_steps:
                self.console.print(f"already at step {self.state.step} >= train.max_steps={max_steps}; nothing to do")
                return 0
            self._start()
            while self.state.step < max_steps:
                self.train_step()
                step, last = self.state.step, self.state.step >= max_steps
                evaluate = self.validator.should_evaluate(step, last=last)
                save = self.checkpointer.should_save(step, last=last)
                stop = False
                # Saves and evaluations also read the step log: a diverged run is never saved, and an
                # evaluation's figures join its step's record. A stop signal is seen here too, so a stop
                # waits at most log.every steps.
                if self.log.should_log(step, last=last) or evaluate or save:
                    stop = self.log.sync(self._stop_signal) and not last  # this step's one host sync
                    self.log.report(self.validator.evaluate(self.engine) if evaluate else None)
                self.console.advance()
                if save or stop:
                    path = self.checkpointer.save(self.engine, self.state)
                    self.console.print(f"saved {path}")
                if stop:
                    self.console.print(
                        f"received a stop signal: saved step {step} to {path} and stopped; "
                        "run the same command again to resume"
                    )
                    break
        except TrainingDiverged as exc:
            raise UserError(
                f"{exc}; nothing was saved for it (the last good checkpoint is untouched). "
                "Lower optim.lr, raise schedule.warmup_tokens, or use train.precision=fp32"
            ) from exc
        finally:
            self.close()
        return 0

    def _start(self) -> None:
        """Catch stop signals, say what runs, and validate the untrained model once, at step 0."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._signal)
        self.console.print(self._banner())
        if self.cfg.log.progress:
            self.console.show_progress(total=self.cfg.train.max_steps, initial=self.state.step)
        if self.state.step == 0 and self.cfg.eval.every:
            self.log.baseline(self.validator.evaluate(self.engine))
        self.log.start(tokens=self.state.tokens)

    def close(self) -> None:
        self.console.close()
        self.log.close()
        self._loader.shutdown(wait=True, cancel_futures=True)


def dry_run(cfg: Config) -> int:
    """Print the resolved config and the exact DeepSpeed JSON on stdout, and on stderr what the process
    group gets and what would be compiled. Needs no GPU even for train.device=cuda: a dry run describes
    the job, it does not start one."""
    import os
    import sys

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg, present=False)
    print(to_yaml(cfg))
    print(json.dumps(deepspeed_config(cfg, world_size=world, device=device), indent=2))
    d = dist_kwargs(cfg, device)
    minutes = d["timeout"].total_seconds() / 60
    print(f"scalegpt: init_distributed: {d['dist_backend']}, collective time-out {minutes:g} min", file=sys.stderr)
    print(f"scalegpt: compiled at start-up: {compiled_ops_note(cfg) or 'nothing'}", file=sys.stderr)
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
