"""`scalegpt export`: consolidated weights as safetensors, or a Hugging Face directory.

The Hugging Face export is GPT2LMHeadModel for a dense model and GPTNeoForCausalLM (EleutherAI's GPT-3
replica, with the same alternating global and local layers) for an alternating one; model/hf.py maps
the weights. Both formats are written to a temporary directory beside OUT_DIR and renamed into place
when complete, so an existing directory is never overwritten and a failed export leaves nothing
behind. The Hugging Face export is verified before it is renamed: transformers loads it offline, its
fp32 logits must equal ours, and its greedy decoding must equal ours up to n_ctx tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from ..model import GPT
from ..model.generate import generate
from ..model.hf import Unmappable, to_hf
from .config.schema import Config, to_yaml
from .data.tokenizer import EOT, eot_id
from .errors import Terminated, UserError, check_writable_dir, disk_full_is_a_user_error, sigterm_raises
from .rundir import CONFIG, TOKENIZER
from .weights import load_for_inference

LOGIT_TOLERANCE = 1e-4
"""Largest |logit difference| between transformers' fp32 forward and ours that an export may show."""
TIE_MARGIN = 1e-4
"""Two tokens whose logits (ours) lie closer than this are a tie that greedy decoding may break either
way: a divergence there is rounding, not a mapping error."""
PROMPT = "The"


@dataclass(frozen=True)
class Verification:
    """What the Hugging Face export was checked against, for the command's report."""

    hf_class: str
    max_logit_diff: float
    greedy_equal: int
    """New tokens that transformers' greedy decoding and ours produced alike."""
    greedy_total: int
    """New tokens asked of both (up to n_ctx)."""
    tie_margin: float | None = None
    """Where the two diverged at a near-tie: our logit gap between the two picks; None if they never did."""


def write_safetensors(out: Path, model: GPT, cfg: Config, tokenizer_json: str) -> None:
    """Our parameter names, fp32, with the resolved config and the tokenizer beside them."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": "scalegpt"})
    (out / CONFIG).write_text(to_yaml(cfg))
    (out / TOKENIZER).write_text(tokenizer_json)


def write_hf(out: Path, model: GPT, cfg: Config, tokenizer: Tokenizer) -> str:
    """A directory that AutoModelForCausalLM and AutoTokenizer load offline; returns its model class."""
    eot = eot_id(tokenizer)  # the Hugging Face config's bos and eos
    try:
        config, state = to_hf(cfg.model, model.state_dict(), bos_token_id=eot, eos_token_id=eot)
    except Unmappable as exc:
        raise UserError(f"cannot export to Hugging Face: {exc}") from exc
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=2))
    (out / TOKENIZER).write_text(tokenizer.to_str())
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.n_ctx, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / CONFIG).write_text(to_yaml(cfg))  # the run's other settings, for scalegpt sample/eval
    return str(config["architectures"][0])


def _greedy_agreement(model: GPT, theirs: torch.nn.Module, prompt: list[int]) -> tuple[int, int, float | None]:
    """(new tokens equal, new tokens compared, tie margin or None): transformers' generate(do_sample=False)
    against model/generate.py at temperature 0 (`scalegpt sample --temperature 0`), from `prompt` to n_ctx
    tokens, neither stopping at end-of-text. A divergence where our logits for the two picks differ by
    less than TIE_MARGIN is a near-tie and ends the comparison; any other is a UserError."""
    n_new = model.config.n_ctx - len(prompt)
    ours = generate(model, [prompt], max_new_tokens=n_new, temperature=0)[0]
    x = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: transformers would otherwise mask a prompt's pad (= eot) tokens
        out = theirs.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n_new, eos_token_id=None
        )
    hf = out[0, len(prompt) :].tolist()
    for i, (a, b) in enumerate(zip(ours, hf, strict=False)):
        if a == b:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours[:i]]))[0][0, -1]
        margin = (logits[a] - logits[b]).abs().item()
        if margin < TIE_MARGIN:
            return i, n_new, margin
        raise UserError(
            f"the Hugging Face export's greedy decoding differs from ours at new token {i + 1} of {n_new} "
            f"(transformers picks {b}, we pick {a}, our logits {margin:.2e} apart)"
        )
    return min(len(ours), len(hf)), n_new, None


def verify_hf(out: Path, model: GPT, tokenizer: Tokenizer) -> Verification:
    """Load the export with transformers, offline, and compare its logits and greedy decoding with ours."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    theirs = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).float().eval()
    model = model.float().eval()
    n = model.config.n_ctx
    idx = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(idx).logits - model(idx)[0]).abs().max().item()
    if not diff <= LOGIT_TOLERANCE:
        raise UserError(
            f"the Hugging Face export in {out} does not reproduce our logits (max diff {diff:.2e} > "
            f"{LOGIT_TOLERANCE:.0e})"
        )
    prompt = ([eot_id(tokenizer)] + tokenizer.encode(PROMPT).ids)[: max(1, n // 2)]
    equal, total, tie = _greedy_agreement(model, theirs, prompt)
    return Verification(type(theirs).__name__, diff, equal, total, tie)


_TMP = re.compile(r"\.export@(?P<host>[^@/]+)@(?P<pid>\d+)\.[A-Za-z0-9_]+$")
"""The temporary folder an export writes beside OUT_DIR: `.NAME.export@HOST@PID.RANDOM`, so that a later
export can tell a folder whose writer died (kill -9, a lost node) from one still being written."""


def _temporary_dir(out: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.export@{socket.gethostname()}@{os.getpid()}.", dir=out.parent))


def remove_stale_exports(folder: Path) -> list[Path]:
    """Remove the temporary folders of exports into `folder` whose process died on this host; return them.
    A folder of another host is left alone: this host cannot tell whether its writer still runs."""
    removed = []
    for p in folder.glob(".*.export@*@*.*") if folder.is_dir() else ():
        m = _TMP.search(p.name)
        if m is None or not p.is_dir() or m["host"] != socket.gethostname() or _alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def export(path: str | Path, fmt: str, out_dir: str | Path) -> tuple[Path, Verification | None]:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new OUT_DIR or remove it")
    check_writable_dir(out, "OUT_DIR")
    model, tokenizer, cfg = load_for_inference(path, device="cpu", dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_exports(out.parent):
        print(f"scalegpt: removed {stale}, left by an export that was killed", file=sys.stderr)
    tmp = _temporary_dir(out)
    try:
        verified = None
        with disk_full_is_a_user_error(out.parent, f"the export (nothing was written to {out})"):
            if fmt == "hf":
                write_hf(tmp, model, cfg, tokenizer)
                verified = verify_hf(tmp, model, tokenizer)
            else:
                write_safetensors(tmp, model, cfg, tokenizer.to_str())
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:  # also on Ctrl-C and, through export_command's handler, on SIGTERM
        shutil.rmtree(tmp, ignore_errors=True)
    return out, verified


def export_command(args: argparse.Namespace) -> int:
    try:
        with sigterm_raises():
            out, v = export(args.path, args.format, args.out_dir)
    except Terminated:
        print(f"scalegpt: terminated; nothing was exported to {args.out_dir}", file=sys.stderr)
        return 128 + signal.SIGTERM
    if v is None:
        print(f"exported {args.path} to {out} ({args.format})")
        return 0
    print(f"exported {args.path} to {out} (Hugging Face {v.hf_class})")
    greedy = f"greedy decoding equal for all {v.greedy_total} new tokens (to n_ctx)"
    if v.tie_margin is not None:
        greedy = (
            f"greedy decoding equal for {v.greedy_equal} of {v.greedy_total} new tokens, then a near-tie "
            f"(our logits for the two picks {v.tie_margin:.1e} apart) that each side breaks its own way"
        )
    elif v.greedy_equal < v.greedy_total:
        greedy = f"greedy decoding equal for all {v.greedy_equal} new tokens transformers gave"
    print(
        f"verified: transformers' {v.hf_class} loads it offline; max |logit difference| {v.max_logit_diff:.2e}; "
        + greedy
    )
    return 0
