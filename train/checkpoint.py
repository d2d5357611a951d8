"""Checkpoints: DeepSpeed's partitioned ZeRO states plus what makes resume exact.

Layout (RUN/checkpoints/):
    latest                 the newest complete tag, replaced by atomic rename after every rank wrote
    step_000200/           DeepSpeed's files (mp_rank_00_model_states.pt, zero_pp_rank_R_..._optim_states.pt)
        rng_rank_R.pt      every rank's RNG states
        checksums_rank_R.json  SHA-256 of the files rank R wrote, checked on resume (a flipped bit unpickles fine)
        scalegpt.json      step, tokens, global sample index, world size, tokenizer hash, manifest hash
        config.yaml        the resolved config;  tokenizer.json  the tokenizer
    .universal/<tag>/      DeepSpeed universal checkpoint, made on demand when the world size changes

DeepSpeed's model/optimizer files are pickles (they hold optimizer param-group dicts and client
state), so DeepSpeed loads them with weights_only=False; our own files are JSON, or tensors-only
(rng_rank_R.pt is loaded with weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config.schema import Config, from_yaml_text
from .errors import UserError, is_disk_full
from .osutil import atomic_write
from .rundir import CHECKPOINTS, CONFIG, LATEST, TOKENIZER
from .schedule import Cadence

TAG_RE = re.compile(r"^step_(\d{6,})$")
META = "scalegpt.json"  # written last, by rank 0, after every rank saved: its presence marks a complete save


@dataclass
class TrainState:
    """Where the run is: everything besides weights and optimizer that resume must restore."""

    step: int = 0
    tokens: int = 0
    samples: int = 0  # global sample index of the next training sequence
    window: list[list[float]] = field(default_factory=list)  # the spike detector's recent (loss, grad norm)


def tag_for(step: int) -> str:
    """The directory name of step `step`'s checkpoint. Six digits at least, so names up to step 999,999 also
    sort as text for a person listing them; code compares `step_of` instead."""
    return f"step_{step:06d}"


def step_of(tag: str) -> int | None:
    """The step a checkpoint name stands for, or None when it is not one."""
    match = TAG_RE.match(tag)
    return int(match.group(1)) if match else None


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / tag_for(step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with scalegpt.json), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None and (p / META).is_file()]
    return sorted(found, key=lambda p: step_of(p.name) or 0)


@dataclass(frozen=True)
class Latest:
    """What RUN/checkpoints/latest names. Callers word their own error when it is not `complete`."""

    file: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.file.parent / self.tag

    @property
    def step(self) -> int | None:
        return step_of(self.tag)

    @property
    def complete(self) -> bool:
        return self.step is not None and (self.path / META).is_file()


def find_latest(run_dir: Path) -> Latest | None:
    """The checkpoint `latest` names, or None when the run has saved none yet."""
    file = checkpoint_root(run_dir) / LATEST
    if not file.is_file():
        return None
    return Latest(file, file.read_text(encoding="utf-8", errors="replace").strip())


def write_latest(run_dir: Path, step: int) -> None:
    """Point `latest` at step `step`'s checkpoint, atomically: a reader sees the old name or the new one."""
    atomic_write(checkpoint_root(run_dir) / LATEST, tag_for(step))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
        "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state() -> list[Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, gauss]


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine: Any,
    state: TrainState,
    *,
    cfg: Config,
    config_yaml: str,
    run_dir: Path,
    world_size: int,
    rank: int,
    meta: dict[str, Any],
) -> Path:
    """Every rank calls this. `latest` moves only after a barrier, so a crash mid-save leaves the
    previous checkpoint as latest."""
    root = checkpoint_root(run_dir)
    tag = tag_for(state.step)
    client = {"scalegpt": asdict(state), "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
    path = root / tag
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        torch.save(_rng_state(), path / f"rng_rank_{rank}.pt")
        _write_checksums(path, rank)
    except Exception as exc:
        if not is_disk_full(exc, root):
            raise
        shutil.rmtree(path, ignore_errors=True)  # the part written: `latest` never named it, and it holds space
        last = find_latest(run_dir)
        kept = f"the previous checkpoint {last.tag} is intact" if last is not None else "no earlier checkpoint"
        raise UserError(
            f"no space left on the device of {root} while saving checkpoint {tag} ({kept}); free space there "
            f"(or lower checkpoint.keep) and run the same command again to resume"
        ) from exc
    dist.barrier()
    if rank == 0:
        (path / CONFIG).write_text(config_yaml)
        tok = run_dir / TOKENIZER
        if tok.is_file():
            shutil.copyfile(tok, path / TOKENIZER)
        atomic_write(path / META, json.dumps({**asdict(state), "world_size": world_size, **meta}, indent=1))
        write_latest(run_dir, state.step)
        _prune(run_dir, cfg.checkpoint.keep)
    dist.barrier()
    return path


def _own_files(path: Path, rank: int) -> list[Path]:
    """The files rank `rank` writes into a checkpoint (bf16 runs prefix the optimizer file with "bf16_")."""
    files = sorted(path.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")) + [path / f"rng_rank_{rank}.pt"]
    if rank == 0:
        files.append(path / "mp_rank_00_model_states.pt")
    return [f for f in files if f.is_file()]


def _digest(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_checksums(path: Path, rank: int) -> None:
    """Each rank records the SHA-256 of the files it wrote: a flipped bit in a weight or optimizer state
    unpickles fine and only shows later as a diverging loss, so resume compares these instead."""
    sums = {f.name: _digest(f) for f in _own_files(path, rank)}
    atomic_write(path / f"checksums_rank_{rank}.json", json.dumps(sums, indent=1))


def _verify_checksums(path: Path) -> None:
    for record in sorted(path.glob("checksums_rank_*.json")):
        try:
            sums = json.loads(record.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpoint(record, f"not valid JSON: {exc}") from exc
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise CorruptCheckpoint(record, "not a mapping of file names to SHA-256 digests")
        for name, want in sums.items():
            f = path / name
            if f.is_file() and _digest(f) != want:
                raise CorruptCheckpoint(f, "its SHA-256 differs from the one recorded when it was saved")


def _prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(checkpoint_root(run_dir) / ".universal" / old.name, ignore_errors=True)


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be trusted; `what` says which and why, without advice, so that the
    fallback's warning can quote it."""

    def __init__(self, file: Path, why: str, *, state: str = "corrupt") -> None:
        self.what = f"checkpoint file {file} is {state} ({why})"
        super().__init__(f"{self.what}; pass checkpoint.fallback=true to resume from the previous checkpoint")


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / META
    try:
        return json.loads(meta_file.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{path} is not a scalegpt checkpoint ({META} is missing)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(meta_file, str(exc)) from exc


def verify_files(path: Path, world_size: int) -> None:
    """Fail with the file's name before DeepSpeed dies deep inside torch.load on a damaged checkpoint."""
    expected = [path / "mp_rank_00_model_states.pt"]
    for r in range(world_size):  # bf16 runs prefix the name with "bf16_"
        found = sorted(path.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
        expected.append(found[0] if found else path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    for f in expected:
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing; the checkpoint is incomplete")
        try:
            torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:  # truncated zip, bad pickle, ...
            raise CorruptCheckpoint(f, type(exc).__name__, state="corrupt or truncated") from exc
    for r in range(world_size):
        rng = path / f"rng_rank_{r}.pt"
        if rng.is_file():
            try:
                _check_rng(torch.load(rng, map_location="cpu", weights_only=True))
            except Exception as exc:  # a damaged zip, or tensors that are not an RNG state
                raise CorruptCheckpoint(rng, f"not a saved RNG state: {type(exc).__name__}") from exc
    _verify_checksums(path)


def _check_rng(state: dict[str, torch.Tensor]) -> None:
    """Decode an RNG state without applying it: what _set_rng_state would fail on, it fails on here."""
    json.loads(bytes(state["numpy"].tolist()).decode())
    json.loads(bytes(state["python"].tolist()).decode())
    if state["torch"].dtype != torch.uint8:
        raise ValueError("the torch RNG state is not bytes")


def check_compatible(path: Path, cfg: Config, meta: dict[str, Any], tokenizer_hash: str, manifest_hash: str) -> None:
    """Resuming with a different model shape, tokenizer or data is an error naming what differs."""
    saved_cfg = from_yaml_text((path / CONFIG).read_text())
    diffs = [
        f"model.{k}: checkpoint {getattr(saved_cfg.model, k)!r}, now {getattr(cfg.model, k)!r}"
        for k in vars(cfg.model)
        if k != "init_from" and getattr(saved_cfg.model, k) != getattr(cfg.model, k)  # the weights now come from here
    ]
    if meta.get("tokenizer_hash") != tokenizer_hash:
        diffs.append(f"tokenizer: checkpoint {str(meta.get('tokenizer_hash'))[:12]}, now {tokenizer_hash[:12]}")
    if meta.get("manifest_hash") != manifest_hash:
        diffs.append("data manifest: the prepared data changed since this checkpoint was written")
    if diffs:
        raise UserError(f"cannot resume from {path}: " + "; ".join(diffs))


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """Which checkpoint to start from, per checkpoint.resume (auto | never | PATH)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        if list_checkpoints(run_dir):
            raise UserError(
                f"checkpoint.resume=never but {checkpoint_root(run_dir)} already has checkpoints; "
                "use a new run.dir or checkpoint.resume=auto"
            )
        return None
    if mode == "auto":
        latest = find_latest(run_dir)
        if latest is not None and not latest.complete:
            raise UserError(
                f"{latest.file} names {latest.tag!r}, which is not a complete checkpoint; pass checkpoint.resume=PATH"
            )
        return None if latest is None else latest.path
    path = Path(mode)
    if not path.is_dir():
        raise UserError(f"checkpoint.resume={mode}: no such checkpoint directory")
    return path


def choose_loadable(path: Path, cfg: Config, run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Verify `path`; with checkpoint.fallback, walk back to the newest older checkpoint that verifies.
    "Older" compares step numbers: as text, step_1000000 would sort before step_999999. A path whose name
    is not a step (checkpoint.resume=PATH) has no older checkpoints to fall back to."""
    candidates = [path]
    step = step_of(path.name)
    if cfg.checkpoint.fallback and step is not None:
        older = [p for p in list_checkpoints(run_dir) if (step_of(p.name) or 0) < step]
        candidates += list(reversed(older))
    error: UserError | None = None
    for candidate in candidates:
        try:
            meta = read_meta(candidate)
            verify_files(candidate, int(meta["world_size"]))
            if candidate != path:
                why = error.what if isinstance(error, CorruptCheckpoint) else str(error)
                print(
                    f"scalegpt: warning: {path.name} is unusable ({why}); falling back to {candidate.name}",
                    file=sys.stderr,
                    flush=True,
                )
            return candidate, meta
        except UserError as exc:
            error = error or exc
    assert error is not None
    raise error


@dataclass(frozen=True)
class Resume:
    """A verified checkpoint to resume from, and how to load it."""

    path: Path
    saved_world_size: int
    universal: bool  # written by another world size: load DeepSpeed's world-size-free conversion of it

    def load_dir(self, run_dir: Path) -> Path:
        return checkpoint_root(run_dir) / ".universal" / self.path.name if self.universal else self.path


def plan_resume(cfg: Config, run_dir: Path, *, world_size: int, meta: dict[str, Any]) -> Resume | None:
    """The checkpoint this run continues from (None: a fresh start), checked against this run's model,
    tokenizer and data (`meta` holds their hashes) before any model is built."""
    path = resume_point(cfg, run_dir)
    if path is None:
        return None
    path, saved = choose_loadable(path, cfg, run_dir)
    check_compatible(path, cfg, saved, meta["tokenizer_hash"], meta["manifest_hash"])
    saved_world = int(saved["world_size"])
    return Resume(path, saved_world, universal=saved_world != world_size)


class Checkpointer:
    """Saves every checkpoint.every steps and at the last step; every rank calls `save`."""

    def __init__(
        self, cfg: Config, run_dir: Path, *, config_yaml: str, meta: dict[str, Any], rank: int, world_size: int
    ) -> None:
        self.cfg, self.run_dir, self.config_yaml, self.meta = cfg, run_dir, config_yaml, meta
        self.rank, self.world_size = rank, world_size
        self.cadence = Cadence(cfg.checkpoint.every, at_end=True)

    def should_save(self, step: int, *, last: bool) -> bool:
        return self.cadence.due(step, last=last)

    def save(self, engine: Any, state: TrainState) -> Path:
        return save(
            engine,
            state,
            cfg=self.cfg,
            config_yaml=self.config_yaml,
            run_dir=self.run_dir,
            world_size=self.world_size,
            rank=self.rank,
            meta=self.meta,
        )

    def load(self, engine: Any, resume: Resume) -> TrainState:
        path = resume.load_dir(self.run_dir)
        return load(engine, path, universal=resume.universal, rank=self.rank, world_size=self.world_size)


def to_universal(path: Path, run_dir: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (world-size independent). Rank 0 only."""
    out_root = checkpoint_root(run_dir) / ".universal"
    out = out_root / path.name
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(path),
        "--output_folder",
        str(out),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"converting {path} to a universal checkpoint failed: {result.stderr.strip()[-400:]}")
    (out / "done").write_text("ok")
    return out


def load(engine: Any, path: Path, *, universal: bool, rank: int, world_size: int) -> TrainState:
    """Load model, optimizer and our state; restore this rank's RNG when the world size is unchanged."""
    load_dir, tag = str(path.parent), path.name
    _, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if client is None:
        raise UserError(f"DeepSpeed could not load the checkpoint in {path}")
    state = TrainState(**client["scalegpt"])  # checkpoints from before the spike window load with an empty one
    rng_file = path / f"rng_rank_{rank}.pt"
    if not universal and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
