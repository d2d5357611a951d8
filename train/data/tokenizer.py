"""Byte-level BPE tokenizers: train one on the mixture, or load GPT-2's / any tokenizer.json.

GPT-3 reuses GPT-2's reversible byte-level BPE (Section 2.1); a small model on a small corpus wants a
small vocabulary of the same kind, trained with the `tokenizers` library on a sample of its own data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import UserError
from ..osutil import atomic_write

EOT = "<|endoftext|>"
"""The end-of-text token that separates packed documents (GPT-3 Appendix B)."""

PACKAGED_TOKENIZERS = {"gpt2": Path(__file__).resolve().parent / "gpt2"}
"""Tokenizers that ship inside the package, by the name data.tokenizer gives them: GPT-2's 50257-token
byte-level BPE, which GPT-3 reuses (Section 2.1), so its presets work without a download."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab < 65536, halving the token files), else uint32."""
    if vocab_size <= 0:
        raise UserError(f"model.vocab_size must be positive, got {vocab_size}")
    if vocab_size < 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise UserError(
        f"model.vocab_size={vocab_size} is too large for the token files' largest dtype (uint32 holds "
        f"{2**32} ids); use a smaller vocabulary"
    )


def byte_level_bpe(model: models.BPE | None = None) -> Tokenizer:
    """GPT-2's pipeline around a BPE model: no normalizer, the GPT-2 split regex, bytes as symbols."""
    tok = Tokenizer(model or models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, *, length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE of exactly vocab_size tokens (256 bytes + merges + EOT)."""
    if vocab_size < 257:
        raise UserError(
            f"model.vocab_size={vocab_size} is too small for a byte-level BPE (256 byte tokens + "
            f"{EOT}); use at least 257"
        )
    tok = byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise UserError(
            f"the BPE sample only supports {got} tokens, fewer than model.vocab_size={vocab_size}; "
            f"raise data.tokenizer_sample_mb, add data, or lower model.vocab_size"
        )
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A packaged tokenizer by name ('gpt2'), a tokenizer.json file, or a folder holding tokenizer.json or
    GPT-2's vocab.json + merges.txt. A name wins over a folder of that name in the current directory;
    write ./gpt2 to mean the folder."""
    p = PACKAGED_TOKENIZERS.get(str(path), Path(path))
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            try:
                tok = byte_level_bpe(models.BPE.from_file(str(p / "vocab.json"), str(p / "merges.txt")))
            except Exception as exc:
                raise UserError(f"cannot read the BPE files in {p}: {exc}") from exc
            if tok.token_to_id(EOT) is not None:
                tok.add_special_tokens([EOT])  # GPT-2 keeps EOT in vocab.json; mark it special
            return tok
        else:
            raise UserError(f"tokenizer folder {p} has neither tokenizer.json nor vocab.json + merges.txt")
    if not p.is_file():
        raise UserError(
            f"tokenizer {path} does not exist; set data.tokenizer to a tokenizer.json, a folder with "
            f"one (or with vocab.json + merges.txt), {' or '.join(map(repr, PACKAGED_TOKENIZERS))} for a "
            f"packaged one, or 'bpe' to train one"
        )
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:
        raise UserError(f"{p} is not a valid tokenizer.json: {str(exc).splitlines()[0]}") from exc


def eot_id(tok: Tokenizer) -> int:
    """Id of <|endoftext|>, which packing needs between documents."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise UserError(f"the tokenizer has no {EOT} token, which packing needs between documents")
    return int(i)


def canonical_json(tok: Tokenizer) -> str:
    """The tokenizer's JSON with sorted keys, so equal tokenizers serialize (and hash) equally."""
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the canonical JSON: ties token files and runs to the tokenizer that made them."""
    return hashlib.sha256(canonical_json(tok).encode("utf-8")).hexdigest()


_PROBE = "Hello, world! It's 2026: naïve café, 東京, \t tabs\n\nand <|endoftext|> 12 plus 7 is 19."
"""Text that exercises the pipeline around the vocabulary: spaces, digits, accents, CJK, EOT."""


def _merges(tok_json: dict) -> list[tuple[str, ...]]:
    """BPE merges, whichever of the two JSON spellings (``"a b"`` or ``["a", "b"]``) the file uses."""
    merges = tok_json.get("model", {}).get("merges") or []
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether `a` and `b` give text the same ids: the same vocabulary, merges and pipeline. Unlike
    tokenizer_hash, files that differ only in spelling count as one tokenizer: GPT-2's vocab.json +
    merges.txt, its hub tokenizer.json and the packaged copy are all the same."""
    if a.get_vocab(with_added_tokens=True) != b.get_vocab(with_added_tokens=True):
        return False
    if _merges(json.loads(a.to_str())) != _merges(json.loads(b.to_str())):
        return False
    return a.encode(_PROBE).ids == b.encode(_PROBE).ids


def vocab_size(tok: Tokenizer) -> int:
    """All ids the tokenizer can emit, special tokens included."""
    return tok.get_vocab_size(with_added_tokens=True)


def check_tokenizer(tok: Tokenizer, model_vocab: int, origin: str) -> None:
    """The model's embedding must have a row for every id, and no rows the data never uses."""
    n = vocab_size(tok)
    if n != model_vocab:
        raise UserError(
            f"tokenizer {origin} has {n} tokens but model.vocab_size is {model_vocab}; set "
            f"model.vocab_size={n} or use a tokenizer of {model_vocab} tokens"
        )
    token_dtype(n)
    eot_id(tok)


def is_byte_level(tok: Tokenizer) -> bool:
    return isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel) and isinstance(tok.decoder, decoders.ByteLevel)


def is_chunk_safe(tok: Tokenizer) -> bool:
    """True when splitting text before a newline that follows a non-space cannot change the ids.

    GPT-2's split regex never joins a non-space character with a following newline (newlines only
    start whitespace runs), and BPE merges never cross pre-tokens, so such cuts are invisible. Other
    pre-tokenizers (Metaspace, Llama-3-style regexes, normalizers) get whole documents instead.
    """
    pre = tok.pre_tokenizer
    return (
        tok.normalizer is None
        and isinstance(pre, pre_tokenizers.ByteLevel)
        and not pre.add_prefix_space
        and pre.use_regex
    )


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special tokens): turns token counts into bytes."""
    n = vocab_size(tok)
    out = np.zeros(n, dtype=np.int64)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    if is_byte_level(tok):  # each character of a byte-level token string is one byte
        for token, i in tok.get_vocab(with_added_tokens=True).items():
            out[i] = 0 if token in special else len(token)
    else:
        for i in range(n):
            token = tok.id_to_token(i)
            out[i] = 0 if token in special else len(tok.decode([i], skip_special_tokens=False).encode())
    return out


def split_safe(text: str, target: int) -> list[str]:
    """Cut text into pieces of about target characters, only right before a '\\n' whose preceding
    character is not whitespace (see is_chunk_safe): tokenizing the pieces equals tokenizing the whole."""
    if len(text) <= target:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > target:
        i = text.find("\n", start + target)
        while i != -1 and text[i - 1].isspace():
            i = text.find("\n", i + 1)
        if i == -1:
            break
        pieces.append(text[start:i])
        start = i
    pieces.append(text[start:])
    return pieces


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes: checks a stored tokenizer.json and downloaded sources."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tokenizer(tok: Tokenizer, path: Path) -> str:
    """Write under a temporary name, then rename (a reader never sees half a tokenizer); return the
    sha256 of the bytes written. An identical file is left untouched."""
    data = tok.to_str(pretty=True).encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    if path.is_file() and file_sha256(path) == sha:
        return sha
    atomic_write(path, data)
    return sha
