"""Find and load a trained model for inference, from whatever directory the user points at.

Three layouts are accepted (the checkpoint writer fixes the first two):

- run directory: ``RUN/config.yaml``, ``RUN/tokenizer.json``, ``RUN/checkpoints/latest`` (a tag such
  as ``step_000200``) and ``RUN/checkpoints/<tag>/``; the latest checkpoint is used.
- checkpoint directory: ``RUN/checkpoints/<tag>/``, a DeepSpeed checkpoint (mp_rank_00_model_states.pt,
  zero_pp_rank_<r>_mp_rank_00_optim_states.pt, ...) plus our scalegpt.json, config.yaml and
  tokenizer.json. Under ZeRO-2 the fp32 master weights are partitioned across the ranks' optimizer
  files, so they are gathered with DeepSpeed's own zero_to_fp32 rather than read from the (possibly
  bf16) module copy.
- export directory: ``model.safetensors`` (fp32, our parameter names, or GPT-2's transposed layout in a
  Hugging Face export), ``config.yaml`` and ``tokenizer.json``.

deepspeed is imported only when a DeepSpeed checkpoint is actually read, so sampling an export needs
none of it.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..model.config import ModelConfig
from ..model.gpt import GPT
from ..model.hf import from_hf_state_dict
from .checkpoint import LATEST, META, checkpoint_root, find_latest
from .config import Config, read_config_file
from .engine import pick_device  # the one owner of device choice; sample and eval import it from here
from .errors import UserError

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPORT_WEIGHTS = "model.safetensors"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP/DeepSpeed wrappers
_WHAT_TO_PASS = (
    "pass a run directory (with checkpoints/latest), a checkpoint directory (RUN/checkpoints/<tag>) "
    "or an export directory (with model.safetensors)"
)


@dataclass(frozen=True)
class ResolvedPath:
    """Where the pieces of a model live, once the user's path has been understood."""

    kind: Literal["run", "checkpoint", "export"]
    weights_dir: Path
    """The DeepSpeed checkpoint directory (run, checkpoint) or the export directory."""
    config_file: Path
    """The resolved config.yaml to rebuild the model from."""
    tokenizer_file: Path | None
    """tokenizer.json, or None when neither the weights' directory nor the run has one."""
    run_dir: Path | None = None
    """The run directory, when the weights belong to one."""


def _is_checkpoint(d: Path) -> bool:
    return (d / MODEL_STATES).is_file() or (d / META).is_file() or any(d.glob("*_optim_states.pt"))


def _latest_checkpoint(run_dir: Path) -> Path:
    latest = find_latest(run_dir)
    if latest is None:
        raise UserError(
            f"{run_dir} has no checkpoint yet ({checkpoint_root(run_dir) / LATEST} is missing); train it first"
        )
    if not latest.complete:
        raise UserError(
            f"{latest.file} names checkpoint {latest.tag!r}, which is not a complete checkpoint in {latest.file.parent}"
        )
    return latest.path


def _first_file(name: str, *dirs: Path | None) -> Path | None:
    for d in dirs:
        if d is not None and (d / name).is_file():
            return d / name
    return None


def resolve(path: str | Path) -> ResolvedPath:
    """Work out whether `path` is a run, a checkpoint or an export directory, and where its parts are."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist; {_WHAT_TO_PASS}")
    if not p.is_dir():
        raise UserError(f"{p} is a file; {_WHAT_TO_PASS}")
    run_dir: Path | None
    if (p / EXPORT_WEIGHTS).is_file():
        kind, weights, run_dir = "export", p, None
    elif _is_checkpoint(p):
        kind, weights = "checkpoint", p
        run_dir = p.parent.parent if checkpoint_root(p.parent.parent) == p.parent else None
    elif checkpoint_root(p).is_dir():
        kind, weights, run_dir = "run", _latest_checkpoint(p), p
    elif checkpoint_root(p.parent) == p and (p / LATEST).is_file():  # RUN/checkpoints itself
        kind, weights, run_dir = "run", _latest_checkpoint(p.parent), p.parent
    else:
        raise UserError(f"{p} is not a run, checkpoint or export directory; {_WHAT_TO_PASS}")
    if kind != "export" and not _is_checkpoint(weights):
        raise UserError(f"{weights} is not a DeepSpeed checkpoint: it has no {MODEL_STATES}")
    config_file = _first_file("config.yaml", weights, run_dir)
    if config_file is None:
        where = weights if run_dir is None else f"{weights} or {run_dir}"
        raise UserError(f"no config.yaml in {where}; the model's shape cannot be rebuilt without it")
    return ResolvedPath(kind, weights, config_file, _first_file("tokenizer.json", weights, run_dir), run_dir)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for name, tensor in state.items():
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = tensor
    return out


def _unreadable(files: list[Path]) -> tuple[Path, str] | None:
    """The first file that is not an intact torch zip archive, and why; only run after a load failed."""
    for f in files:
        try:
            with zipfile.ZipFile(f) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f, f"member {bad} fails its CRC check"
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f, str(exc) or type(exc).__name__
    return None


def _load_module_states(model_file: Path) -> dict[str, Tensor]:
    try:  # DeepSpeed pickles optimizer settings and client state beside the weights
        states = torch.load(model_file, map_location="cpu", weights_only=False)
        return dict(states["module"])
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"checkpoint file {model_file} is corrupt or truncated ({reason})") from exc


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, Tensor]:
    """The full fp32 state dict of a DeepSpeed checkpoint directory, with our parameter names.

    ZeRO 1-3 (and bf16) checkpoints keep the fp32 master weights partitioned in the ranks' optimizer
    files, gathered here by DeepSpeed's zero_to_fp32; a checkpoint without any (ZeRO stage 0) is read
    from its module states. Raises UserError naming the file when one is missing or corrupt."""
    d = Path(checkpoint_dir)
    model_file = d / MODEL_STATES
    if not d.is_dir():
        raise UserError(f"checkpoint directory {d} does not exist")
    if not model_file.is_file():
        raise UserError(f"checkpoint {d} is incomplete: {model_file} is missing")
    optim_files = sorted(d.glob("*_optim_states.pt"))
    if not optim_files:  # ZeRO stage 0 in fp32: nothing is partitioned, the module holds the weights
        return _strip_prefixes({k: v.float() for k, v in _load_module_states(model_file).items()})
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than let DeepSpeed warn on stderr
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # it prints progress to stdout, which `scalegpt sample` keeps for the text
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)
    except Exception as exc:  # torch.load, pickle and DeepSpeed's own checks raise many types
        broken = _unreadable([model_file, *optim_files])
        if broken is not None:
            raise UserError(
                f"checkpoint file {broken[0]} is corrupt or truncated ({broken[1]}); "
                "use an earlier checkpoint or re-save this one"
            ) from exc
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read the DeepSpeed checkpoint {d}: {reason}") from exc
    return _strip_prefixes(state)


def _export_state_dict(export_dir: Path, model: ModelConfig) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = export_dir / EXPORT_WEIGHTS
    try:
        state = _strip_prefixes(load_file(str(f)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{f} is not a readable safetensors file ({exc}); export the model again") from exc
    c_attn = state.get("transformer.h.0.attn.c_attn.weight")
    if c_attn is not None and tuple(c_attn.shape) == (model.d_model, 3 * model.d_model):
        state = from_hf_state_dict(state)  # a Hugging Face export stores GPT-2's transposed Conv1D layout
    return state


def read_tokenizer(resolved: ResolvedPath) -> Tokenizer:
    """The run's tokenizer.json, or UserError saying where it was looked for."""
    f = resolved.tokenizer_file
    if f is None:
        where = resolved.weights_dir if resolved.run_dir is None else f"{resolved.weights_dir} or {resolved.run_dir}"
        raise UserError(f"no tokenizer.json in {where}; copy the run's tokenizer.json there")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{f} is not a valid tokenizers JSON file ({exc})") from exc


def load_for_inference(
    path: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None
) -> tuple[GPT, Tokenizer, Config]:
    """(model in eval mode, tokenizer, config) from a run, checkpoint or export directory.

    The default dtype is bf16 on CUDA (halves the bytes read per token) and fp32 on CPU, where bf16
    matmuls are slow on most chips."""
    resolved = resolve(path)
    cfg = read_config_file(resolved.config_file)
    tokenizer = read_tokenizer(resolved)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(
            f"{resolved.tokenizer_file} has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{cfg.model.vocab_size}; they come from different runs"
        )
    dev = pick_device(device)
    if resolved.kind == "export":
        state = _export_state_dict(resolved.weights_dir, cfg.model)
    else:
        state = consolidated_state_dict(resolved.weights_dir)
    with torch.device("meta"):
        model = GPT(cfg.model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"weights in {resolved.weights_dir} do not fit {resolved.config_file}: {detail}") from exc
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model.to(device=dev, dtype=dtype)
    model.eval()
    return model, tokenizer, cfg
