"""`scalegpt export`: consolidated weights as safetensors, or a Hugging Face GPT-2 directory.

Both are written to a temporary directory beside OUT_DIR and renamed into place when complete, so an
existing directory is never overwritten and a failed export leaves nothing behind. The Hugging Face
export is verified before it is renamed: transformers loads it offline and its logits must equal ours.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import GPT
from ..model.hf import hf_config, to_hf_state_dict
from .config import Config, to_yaml
from .data.tokenizer import EOT
from .errors import UserError, check_writable_dir
from .inference import load_for_inference


def _eot_id(tokenizer_json: dict) -> int:
    for token in tokenizer_json.get("added_tokens", []):
        if token.get("content") == EOT:
            return int(token["id"])
    raise UserError(f"the tokenizer has no {EOT} token, which GPT-2's tokenizer config needs")


def write_safetensors(out: Path, model: GPT, cfg: Config, tokenizer_json: str) -> None:
    """Our parameter names, fp32, with the resolved config and the tokenizer beside them."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": "scalegpt"})
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "tokenizer.json").write_text(tokenizer_json)


def write_hf(out: Path, model: GPT, cfg: Config, tokenizer_json: str) -> None:
    """A directory that GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load offline."""
    eot = _eot_id(json.loads(tokenizer_json))
    try:
        config = hf_config(cfg.model, eos_token_id=eot)
    except ValueError as exc:
        raise UserError(f"cannot export to Hugging Face GPT-2: {exc}; use --format safetensors") from exc
    state = to_hf_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": eot, "eos_token_id": eot}, indent=2))
    (out / "tokenizer.json").write_text(tokenizer_json)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.model.n_ctx, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "config.yaml").write_text(to_yaml(cfg))  # so scalegpt sample/eval read the export too


def verify_hf(out: Path, model: GPT) -> float:
    """Load the export with transformers, offline, and return max |logit difference| against ours."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return float("nan")
    theirs = GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    n = model.config.n_ctx
    idx = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.float()(idx)[0]
        diff = (theirs(idx).logits - ours).abs().max().item()
    if not diff <= 1e-4:
        raise UserError(f"the Hugging Face export in {out} does not reproduce our logits (max diff {diff:.2e})")
    return diff


def export(path: str | Path, fmt: str, out_dir: str | Path) -> tuple[Path, float | None]:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new OUT_DIR or remove it")
    check_writable_dir(out, "OUT_DIR")
    model, tokenizer, cfg = load_for_inference(path, device="cpu", dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        diff = None
        if fmt == "hf":
            write_hf(tmp, model, cfg, tokenizer.to_str())
            diff = verify_hf(tmp, model)
        else:
            write_safetensors(tmp, model, cfg, tokenizer.to_str())
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, diff


def export_command(args: argparse.Namespace) -> int:
    out, diff = export(args.path, args.format, args.out_dir)
    print(f"exported {args.path} to {out} ({args.format})")
    if diff is not None:
        if diff == diff:  # not NaN
            print(f"verified: transformers' GPT2LMHeadModel loads it offline; max |logit difference| {diff:.2e}")
        else:
            print("not verified: transformers is not installed (pip install 'scalegpt[dev]')")
    return 0
