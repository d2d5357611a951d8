"""The training loop: a small Trainer with explicit methods, and `scalegpt train`'s entry point."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..model import build_model
from ..model.flops import peak_flops_for
from . import checkpoint as ckpt
from .config.loading import load_config
from .config.schema import Config, to_yaml
from .config.validation import global_batch
from .data.checksum import verify as verify_token_files
from .data.mixture import Mixture
from .data.steps import rank_indices
from .engine import (
    DistEnv,
    broadcast_object,
    build_engine,
    compiled_ops_note,
    deepspeed_config,
    dist_kwargs,
    engine_step,
    init_distributed,
    on_main,
    resolve_device,
)
from .errors import SharedUserError, UserError, check_writable_dir
from .evaluation.validation import Validator
from .lifeline import watch_launcher
from .metrics import Console, MetricsLog, StepLog
from .osutil import atomic_write
from .recovery import SPIKE_FACTOR, FaultDrill, Skip, SkipLog, Spike, Watchdog, peer_lost, say_peer_lost
from .rundir import CONFIG, TOKENIZER, Hold, check_same_experiment, take
from .schedule import Schedule
from .weights import check_source_tokenizer, model_from_state, resolve, source_state_dict


def hold_run_dir(cfg: Config, env: DistEnv) -> Hold | None:
    """Rank 0 holds the run directory for the job (see train/rundir.py); a live holder stops every rank
    before anything is written. The other ranks hold nothing."""

    def work() -> Hold:
        what = "scalegpt train" + (f", rank 0 of {env.world_size}" if env.world_size > 1 else "")
        hold = take(Path(cfg.run.dir), what)
        if hold.note:
            print(f"scalegpt: note: {hold.note}", flush=True)
        return hold

    return on_main(env, work)


class Trainer:
    """Owns the engine, the data and the run directory; `fit` runs the loop, and the components it holds
    (validator, checkpointer, step log) each decide when they are due."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.console = Console(env.is_main)
        self.run_dir = Path(cfg.run.dir)
        self.state = ckpt.TrainState()
        self.batch = global_batch(cfg, env.world_size)
        self.schedule = Schedule.from_config(cfg, world_size=env.world_size)
        self.mixture = Mixture.for_config(cfg)  # the run's weights and stages, not prepare's
        vocab = int(self.mixture.manifest["vocab_size"])
        if vocab != cfg.model.vocab_size:
            raise UserError(
                f"the tokenizer in {cfg.data.dir} has {vocab} tokens but model.vocab_size="
                f"{cfg.model.vocab_size}; set model.vocab_size={vocab} or re-run `scalegpt prepare`"
            )
        Validator.check(cfg, self.mixture, self.console)
        self._verify_token_files()
        self.config_yaml = to_yaml(cfg)
        self.meta = {"tokenizer_hash": self.mixture.tokenizer_hash, "manifest_hash": self._manifest_hash()}
        self.checkpointer = ckpt.Checkpointer(
            cfg, self.run_dir, config_yaml=self.config_yaml, meta=self.meta, rank=env.rank, world_size=env.world_size
        )
        # Everything that may refuse the start runs before anything is written, so a refusal changes nothing.
        self._on_main(self._check_run_dir)
        resume = self._plan_resume()
        start = self._starting_weights() if resume is None and cfg.model.init_from else None
        self._on_main(self._write_run_dir)
        # Rank 0's records, so that every rank skips the same samples and fires the same faults even where
        # the run directory is not shared.
        self.skips = SkipLog(self.run_dir)
        self.skips.skips = broadcast_object(self.skips.skips)
        rewinds = cfg.train.on_spike == "rewind"
        self.drill = FaultDrill(cfg.train.inject_fault, self.run_dir, is_main=env.is_main, rewinds=rewinds)
        self.drill.fired = broadcast_object(self.drill.fired)
        self.watchdog = Watchdog(cfg.train.step_timeout_s, speak=env.is_main)
        torch.manual_seed(cfg.run.seed)
        if start is None:
            model = build_model(cfg.model, device=env.device, seed=cfg.run.seed)
        else:
            model = model_from_state(cfg.model, start, str(cfg.model.init_from)).to(env.device)
        self.engine = build_engine(cfg, model, env, load_universal=resume is not None and resume.universal)
        if resume is not None:
            self._resume(resume)
        metrics = MetricsLog(self.run_dir, cfg) if env.is_main else None
        if metrics is not None:
            # Rows past the state this run starts from are of steps it trains (and logs) again; at step 0
            # that is every row, the step-0 evaluation included.
            metrics.truncate(self.state.step if self.state.step else -1)
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
        self.log.history = self.state.window
        self._stop_signal = 0
        self._stopped = False
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self._prefetched: tuple[tuple[int, int], Future[tuple[torch.Tensor, dict[str, int]]]] | None = None

    # -- run directory and resume ---------------------------------------------------------------
    def _manifest_hash(self) -> str:
        import hashlib

        manifest = dict(self.mixture.manifest)
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()

    def _verify_token_files(self) -> None:
        """Each node's local rank 0 checks the token files it will read against prepare's checksums (nodes
        need not share data.dir); every rank stops on the first mismatch found, and rank 0 says which
        check ran."""
        line = error = None
        if self.env.local_rank == 0:
            try:
                line = verify_token_files(self.mixture.data_dir, self.mixture.manifest)
            except UserError as exc:
                error = str(exc)
        errors: list[str | None] = [None] * self.env.world_size
        dist.all_gather_object(errors, error)
        found = next((e for e in errors if e), None)
        if found:
            raise SharedUserError(found)
        if line is not None:
            self.console.print(f"scalegpt: {line}")

    def _on_main(self, work: Callable[[], Any]) -> None:
        on_main(self.env, work)

    def _check_run_dir(self) -> None:
        """The run directory must hold this experiment, or none."""
        check_same_experiment(self.run_dir, self.cfg)

    def _write_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / CONFIG, self.config_yaml)
        shutil.copyfile(Path(self.cfg.data.dir) / TOKENIZER, self.run_dir / TOKENIZER)

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

    def _starting_weights(self) -> dict[str, torch.Tensor]:
        """model.init_from's weights, which every rank reads for itself (no collective moves them), after
        rank 0 has checked that the data was tokenized as they expect. The optimizer, schedule, data order
        and step start from zero."""
        source = str(self.cfg.model.init_from)

        def check() -> None:
            note = check_source_tokenizer(source, self.cfg.data.dir)
            if note:
                self.console.print(f"note: {note}")

        self._on_main(check)
        state = source_state_dict(resolve(source))
        self.console.print(f"starting from the weights of {source} (step 0, fresh optimizer and schedule)")
        return state

    def _resume(self, resume: ckpt.Resume) -> None:
        self.state = self.checkpointer.load(self.engine, resume)
        self.console.print(f"resumed from {resume.path} at step {self.state.step} (sample {self.state.samples})")

    # -- the step -----------------------------------------------------------------------------
    def _rank_indices(self, samples: int, batch: int) -> list[int]:
        """This rank's sample indices for the step starting at global sample `samples` (`scalegpt inspect`
        calls the same function)."""
        micro, world = self.cfg.train.micro_batch, self.env.world_size
        return rank_indices(samples, batch, micro_batch=micro, world_size=world, rank=self.env.rank)

    def _load_batch(self, samples: int, batch: int) -> tuple[torch.Tensor, dict[str, int]]:
        """This rank's rows of the step and the step's per-source counts (metrics' drawn/<source>)."""
        data, drawn = self.mixture.step_batch(samples, batch, self._rank_indices(samples, batch))
        return (data.pin_memory() if self.env.device.type == "cuda" else data), drawn

    def _next_batch(self, batch: int) -> tuple[torch.Tensor, dict[str, int]]:
        """This step's batch, prefetched during the previous step by a background thread (the sample at
        index g is a pure function of g, so reading ahead changes nothing); then queue the next one."""
        key = (self.state.samples, batch)
        if self._prefetched is not None and self._prefetched[0] == key:
            data, drawn = self._prefetched[1].result()
        else:
            data, drawn = self._load_batch(*key)
        after = self.skips.advance(self.state.samples + batch)
        next_batch = self.schedule.batch_size(self.state.tokens + batch * self.cfg.model.n_ctx)
        self._prefetched = ((after, next_batch), self._loader.submit(self._load_batch, after, next_batch))
        return data.to(self.env.device, non_blocking=True), drawn

    def train_step(self) -> None:
        """One optimizer step (all its accumulation micro steps). Its loss and grad norm join the step log
        as device tensors: nothing here waits for the device."""
        self.state.samples = self.skips.advance(self.state.samples)  # past the samples a rewind skipped
        step = self.state.step + 1
        self.watchdog.beat(step)
        fault = self.drill.due(step)
        if fault in ("crash", "hang"):
            self._fire(fault, step)
        batch = self.schedule.batch_size(self.state.tokens)
        if batch != self.engine.train_batch_size():
            self.engine.set_train_batch_size(batch)  # batch ramp: more accumulation, same micro batch
        lr = self.schedule.lr(self.state.tokens + batch * self.cfg.model.n_ctx) * self.skips.lr_factor(step)
        factor = {"nan": math.nan, "spike": SPIKE_FACTOR}.get(fault or "")
        if factor is not None:
            self.console.print(f"fire drill: train.inject_fault={fault}@{step}")
        data, drawn = self._next_batch(batch)
        judge = self._judge if self.cfg.train.on_spike == "skip" else None
        loss = engine_step(self.engine, data, self.cfg.train.micro_batch, lr, loss_factor=factor, judge=judge)
        self.state.step = step
        self.state.samples += batch
        self.state.tokens += batch * self.cfg.model.n_ctx
        grad_norm = self.engine.get_global_grad_norm()
        self.log.record(
            step=step, tokens=self.state.tokens, samples=self.state.samples, lr=lr, loss=loss, grad_norm=grad_norm
        )
        self.log.drawn(drawn)

    def _judge(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """train.on_spike=skip: whether to drop this step's update. The one host sync outside logged steps:
        the decision must come before the update, so every step waits here for the device (one all-reduce
        of the loss and one read)."""
        both = torch.stack([loss.double() / self.env.world_size, grad_norm.detach().double().reshape(())])
        dist.all_reduce(both[:1])
        mean, norm = both.tolist()
        step = self.state.step + 1
        reason = self.log.detector.check(self.log.history, mean, norm)
        if reason is None:
            return False
        self.console.print(f"loss spike: {reason} at step {step}; skipped its update (train.on_spike=skip)")
        self.log.mark(step, {"event": "skip", "reason": reason})
        return True

    def _fire(self, fault: str, step: int) -> None:
        """A crash is a kill -9 of every rank; a hang sleeps until the step watchdog ends the process.
        The barrier lets rank 0 record the fault before any rank dies."""
        self.console.print(f"fire drill: train.inject_fault={fault}@{step}")
        dist.barrier()
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(60)

    # -- spikes -------------------------------------------------------------------------------------
    def _on_spike(self, spike: Spike) -> None:
        """train.on_spike: stop with an error, or rewind to the last good checkpoint."""
        if self.cfg.train.on_spike != "rewind":
            raise UserError(
                f"{spike}; nothing was saved for it (the last good checkpoint is untouched). Lower optim.lr, "
                "raise schedule.warmup_tokens, use train.precision=fp32, or set train.on_spike=rewind"
            )
        done, most = len(self.skips.skips), self.cfg.train.spike_max_rewinds
        if done >= most:
            raise UserError(
                f"{spike}; gave up after {done} rewind(s) (train.spike_max_rewinds={most}): the run keeps "
                "spiking, so lower optim.lr or train.spike_lr_factor, or raise train.spike_max_rewinds"
            )
        good = [p for p in ckpt.list_checkpoints(self.run_dir) if (ckpt.step_of(p.name) or 0) < spike.step]
        target = broadcast_object(good[-1] if good else None)  # rank 0's choice: every rank loads the same step
        if target is None:
            raise UserError(f"{spike}; there is no checkpoint before it to rewind to")
        self._rewind(spike, target)

    def _rewind(self, spike: Spike, path: Path) -> None:
        """Load `path` in this process, record the samples to skip (and the lowered LR) in the run directory,
        and replace the abandoned steps' rows in metrics.jsonl by one row that records the rewind."""
        saved_world = int(ckpt.read_meta(path)["world_size"])
        resume = ckpt.Resume(path, saved_world, universal=saved_world != self.env.world_size)
        if resume.universal:
            if self.env.is_main:
                ckpt.to_universal(path, self.run_dir)
            dist.barrier()
        self.state = self.checkpointer.load(self.engine, resume)
        t, step = self.cfg.train, self.state.step
        start = self.skips.advance(self.state.samples)
        skip = Skip(step, spike.step, start, spike.samples, t.spike_lr_factor, step + t.spike_lr_steps)
        self.skips.add(skip, is_main=self.env.is_main)
        self.drill.record()  # the fault that caused it, if a drill's, is now answered on disk
        n = len(self.skips.skips)
        self.console.print(
            f"loss spike: {spike}; rewound to step {step} and skipping samples {skip.start}-{skip.end - 1} "
            f"(rewind {n} of at most {t.spike_max_rewinds})"
        )
        self.log.discard()
        self.log.history = self.state.window
        if self.log.metrics is not None:
            event = {"spike_step": spike.step, "reason": spike.reason, "skipped_samples": [skip.start, skip.end]}
            self.log.metrics.truncate(step, replace={"event": "rewind", "rewind": {**event, "n": n}})
        self.log.start(tokens=self.state.tokens)

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
            while self.state.step < max_steps and not self._stopped:
                try:
                    self._iteration(max_steps)
                except Spike as spike:  # raised on every rank alike: they all read the same figures
                    self._on_spike(spike)
        finally:
            self.close()
        return 0

    def _iteration(self, max_steps: int) -> None:
        """One step, then whatever is due after it: a log line, an evaluation, a save, a stop."""
        self.train_step()
        step, last = self.state.step, self.state.step >= max_steps
        evaluate = self.validator.should_evaluate(step, last=last)
        save = self.checkpointer.should_save(step, last=last)
        stop = False
        # Saves and evaluations also read the step log: a run that spiked is never saved, and an
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
                f"received a stop signal: saved step {step} to {path} and stopped; run the same command again to resume"
            )
            self._stopped = True

    def _start(self) -> None:
        """Catch stop signals, say what runs, and validate the untrained model once, at step 0."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._signal)
        self.console.print(self._banner())
        if self.cfg.log.progress:
            self.console.show_progress(total=self.cfg.train.max_steps, initial=self.state.step)
        if self.state.step == 0 and self.cfg.eval.every:
            self.log.baseline(self.validator.evaluate(self.engine))
        if self.cfg.train.on_spike == "rewind" and not broadcast_object(bool(ckpt.list_checkpoints(self.run_dir))):
            self.console.print(f"saved {self.checkpointer.save(self.engine, self.state)} (a rewind needs a start)")
        self.log.start(tokens=self.state.tokens)

    def close(self) -> None:
        self.watchdog.pause()
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
    watch_launcher()  # first: a rank whose launcher died while it started up must not go on
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        return dry_run(cfg)
    check_writable_dir(cfg.run.dir, "run.dir")
    env = init_distributed(cfg)
    hold = None
    try:
        hold = hold_run_dir(cfg, env)
        return Trainer(cfg, env).fit()
    except Exception as exc:
        if env.world_size < 2 or not peer_lost(exc):
            raise
        return say_peer_lost(exc, env.rank)
    finally:
        if hold is not None:
            hold.release()
        if dist.is_initialized():
            dist.destroy_process_group()
