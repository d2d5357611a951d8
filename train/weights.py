"""Where weights come from: runs, checkpoints, exports and Hugging Face folders, whichever the user points at.

Four layouts are accepted (the checkpoint writer fixes the first two, `scalegpt export` the third):

- run directory: ``RUN/config.yaml``, ``RUN/tokenizer.json``, ``RUN/checkpoints/latest`` (a tag such
  as ``step_000200``) and ``RUN/checkpoints/<tag>/``; the latest checkpoint is used.
- checkpoint directory: ``RUN/checkpoints/<tag>/``, a DeepSpeed checkpoint (mp_rank_00_model_states.pt,
  zero_pp_rank_<r>_mp_rank_00_optim_states.pt, ...) plus our scalegpt.json, config.yaml and
  tokenizer.json. Under ZeRO-2 the fp32 master weights are partitioned across the ranks' optimizer
  files, so they are gathered with DeepSpeed's own zero_to_fp32 rather than read from the (possibly
  bf16) module copy.
- export directory: ``model.safetensors`` (fp32, our parameter names), ``config.yaml`` and
  ``tokenizer.json``.
- Hugging Face folder: ``config.json`` of a GPT-2 or GPT-Neo model with its weights in any layout
  transformers reads (safetensors or .bin, one file or sharded, keys with or without the
  ``transformer.`` prefix) and its tokenizer (tokenizer.json, or vocab.json + merges.txt). Our own
  ``export --format hf`` writes one, with config.yaml beside it for the run's other settings.

The same resolution serves ``model.init_from``: `source_model_config` reads only a source's shape (for
load_config) and `source_state_dict` its weights (for the trainer); `load_for_inference` serves sample,
eval and export. deepspeed is imported only when a DeepSpeed checkpoint is read, and transformers only
when a Hugging Face folder is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..model.config import ModelConfig
from ..model.gpt import GPT
from ..model.hf import Unmappable, config_from_hf, from_hf
from .checkpoint import META, checkpoint_root, find_latest
from .config.schema import Config, read_config_file
from .data.tokenizer import load_tokenizer, same_vocabulary
from .engine import pick_device
from .errors import UserError
from .rundir import CONFIG, LATEST, TOKENIZER

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPORT_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP/DeepSpeed wrappers
_WHAT_TO_PASS = (
    "pass a run directory (with checkpoints/latest), a checkpoint directory (RUN/checkpoints/<tag>), "
    "an export directory (with model.safetensors) or a Hugging Face GPT-2 or GPT-Neo folder (with config.json)"
)


@dataclass(frozen=True)
class ResolvedPath:
    """Where the pieces of a model live, once the user's path has been understood."""

    kind: Literal["run", "checkpoint", "export", "hf"]
    weights_dir: Path
    """The DeepSpeed checkpoint directory (run, checkpoint), the export directory or the HF folder."""
    config_file: Path | None
    """The resolved config.yaml: the model's shape, except in an HF folder, where config.json has it and a
    config.yaml (written by our export) only adds the run's other settings."""
    tokenizer_file: Path | None
    """tokenizer.json (or, in an HF folder without one, the folder with vocab.json + merges.txt); None
    when there is none."""
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
    """Work out whether `path` is a run, checkpoint, export or Hugging Face directory, and where its parts are."""
    p = Path(path).expanduser()
    if not p.exists():
        hub = ""
        if not p.is_absolute() and len(p.parts) <= 2:  # a hub name (gpt2, openai-community/gpt2), or the folder for one
            hub = (
                "; weights are read offline, so download a Hugging Face Hub model into a folder first "
                "(`hf download openai-community/gpt2 --local-dir models/gpt2`) and pass the folder"
            )
        raise UserError(f"{p} does not exist; {_WHAT_TO_PASS}{hub}")
    if not p.is_dir():
        raise UserError(f"{p} is a file; {_WHAT_TO_PASS}")
    run_dir: Path | None
    if (p / HF_CONFIG).is_file():
        tokenizer = _first_file(TOKENIZER, p)
        if tokenizer is None and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            tokenizer = p
        return ResolvedPath("hf", p, _first_file(CONFIG, p), tokenizer)
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
    config_file = _first_file(CONFIG, weights, run_dir)
    if config_file is None:
        where = weights if run_dir is None else f"{weights} or {run_dir}"
        raise UserError(f"no config.yaml in {where}; the model's shape cannot be rebuilt without it")
    return ResolvedPath(kind, weights, config_file, _first_file(TOKENIZER, weights, run_dir), run_dir)


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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # slow to import: only here

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


def _export_state_dict(export_dir: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = export_dir / EXPORT_WEIGHTS
    try:
        return _strip_prefixes(load_file(str(f)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{f} is not a readable safetensors file ({exc}); export the model again") from exc


def _hf_config(folder: Path) -> dict:
    f = folder / HF_CONFIG
    try:
        hf = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{f} is not a readable JSON file ({exc})") from exc
    if not isinstance(hf, dict):
        raise UserError(f"{f} must hold a JSON object, not a {type(hf).__name__}")
    return hf


@contextlib.contextmanager
def _unmappable_as_user_error(folder: Path) -> Iterator[None]:
    """model/hf.py's Unmappable, said as the user's error about this folder."""
    try:
        yield
    except Unmappable as exc:
        raise UserError(f"cannot read the Hugging Face model in {folder}: {exc}") from exc


def _hf_model_config(folder: Path) -> ModelConfig:
    with _unmappable_as_user_error(folder):
        return config_from_hf(_hf_config(folder))


def _hf_state_dict(folder: Path) -> dict[str, Tensor]:
    """The folder's weights in our names, read by transformers (every layout it knows) and mapped by
    model/hf.py. Loading fails loudly where transformers would quietly initialize missing weights."""
    hf = _hf_config(folder)
    with _unmappable_as_user_error(folder):
        config_from_hf(hf)  # refuse what we cannot represent before reading any weights
    from transformers import AutoModelForCausalLM  # seconds to import: only for a Hugging Face folder
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as exc:  # OSError, ValueError, safetensors and pickle errors
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"transformers cannot load the weights in {folder}: {reason}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("lm_head.weight")]
    if missing:
        raise UserError(
            f"the weights in {folder} lack {len(missing)} of the model's tensors (first: {missing[0]}); "
            "they do not belong to its config.json"
        )
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    with _unmappable_as_user_error(folder):
        return from_hf(hf, state)[1]


def source_model_config(resolved: ResolvedPath) -> ModelConfig:
    """The model's shape, without reading its weights."""
    if resolved.kind == "hf":
        return _hf_model_config(resolved.weights_dir)
    assert resolved.config_file is not None  # resolve() refuses a scalegpt directory without one
    return read_config_file(resolved.config_file).model


def source_state_dict(resolved: ResolvedPath) -> dict[str, Tensor]:
    """The fp32 weights on the CPU, under our parameter names, whatever layout they were stored in."""
    if resolved.kind == "hf":
        return _hf_state_dict(resolved.weights_dir)
    if resolved.kind == "export":
        return _export_state_dict(resolved.weights_dir)
    return consolidated_state_dict(resolved.weights_dir)


def read_run_config(resolved: ResolvedPath) -> Config:
    """The config to run the model with: its config.yaml, and in an HF folder the shape from config.json
    (a folder from elsewhere has no config.yaml and gets the defaults for everything else)."""
    if resolved.kind != "hf":
        assert resolved.config_file is not None
        return read_config_file(resolved.config_file)
    cfg = read_config_file(resolved.config_file) if resolved.config_file is not None else Config()
    cfg.model = _hf_model_config(resolved.weights_dir)
    return cfg


def read_tokenizer(resolved: ResolvedPath) -> Tokenizer:
    """The model's tokenizer, or UserError saying where it was looked for."""
    f = resolved.tokenizer_file
    if f is None:
        where = resolved.weights_dir if resolved.run_dir is None else f"{resolved.weights_dir} or {resolved.run_dir}"
        raise UserError(f"no tokenizer.json in {where}; copy the run's tokenizer.json there")
    if f.is_dir():
        return load_tokenizer(f)  # an HF folder with GPT-2's vocab.json + merges.txt
    try:
        return Tokenizer.from_file(str(f))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{f} is not a valid tokenizers JSON file ({exc})") from exc


def model_from_state(config: ModelConfig, state: dict[str, Tensor], origin: Path | str) -> GPT:
    """A GPT of `config` holding `state` (on the CPU, in the state's dtype), with nothing drawn at random.
    Position embeddings longer than config.n_ctx keep their first n_ctx rows: a run may start from a
    model with a longer context and train a shorter one."""
    wpe = "transformer.wpe.weight"
    if wpe in state and state[wpe].shape[0] > config.n_ctx:
        state = {**state, wpe: state[wpe][: config.n_ctx].clone()}
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"weights in {origin} do not fit the model's shape: {detail}") from exc
    return model


def check_source_tokenizer(source: str | Path, data_dir: str | Path) -> str | None:
    """data_dir must be tokenized the way model.init_from's weights read text. A source without a tokenizer
    can only be checked by vocabulary size (load_config took it from the weights, the trainer compares it
    with the manifest): the returned note says so."""
    resolved = resolve(source)
    if resolved.tokenizer_file is None:
        return f"{source} has no tokenizer: only its vocabulary size is checked against {data_dir}"
    if not same_vocabulary(read_tokenizer(resolved), load_tokenizer(Path(data_dir) / TOKENIZER)):
        raise UserError(
            f"{data_dir} was prepared with a different tokenizer than the weights of model.init_from {source}; "
            f"set data.tokenizer to {source} (or the tokenizer they were trained with) and run `scalegpt prepare` "
            "again, into a new data.dir"
        )
    return None


def load_for_inference(
    path: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None
) -> tuple[GPT, Tokenizer, Config]:
    """(model in eval mode, tokenizer, config) from a run, checkpoint, export or Hugging Face directory.

    The default dtype is bf16 on CUDA (halves the bytes read per token) and fp32 on CPU, where bf16
    matmuls are slow on most chips."""
    resolved = resolve(path)
    cfg = read_run_config(resolved)
    tokenizer = read_tokenizer(resolved)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(
            f"{resolved.tokenizer_file} has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{cfg.model.vocab_size}; they come from different runs"
        )
    dev = pick_device(device)
    model = model_from_state(cfg.model, source_state_dict(resolved), resolved.weights_dir)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model.to(device=dev, dtype=dtype)
    model.eval()
    return model, tokenizer, cfg
