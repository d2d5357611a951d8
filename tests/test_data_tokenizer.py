"""Tokenizers: GPT-2's files, a deterministic trained BPE, hashing, and chunk-safe splitting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalegpt.train.data import builtin
from scalegpt.train.data.tokenizer import (
    EOT,
    eot_id,
    is_chunk_safe,
    load_tokenizer,
    save_tokenizer,
    split_safe,
    token_byte_lengths,
    token_dtype,
    tokenizer_hash,
    train_bpe,
)
from scalegpt.train.errors import UserError

GPT2 = "gpt2"  # the packaged copy of GPT-2's vocab.json + merges.txt


def small_corpus() -> list[str]:
    return [d for n in builtin.DOMAINS for d in builtin.generate(n, 0.05)]


@pytest.fixture(scope="module")
def bpe() -> object:
    return train_bpe(small_corpus(), 512)


def test_gpt2_from_vocab_and_merges() -> None:
    tok = load_tokenizer(GPT2)
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.get_vocab_size() == 50257 and eot_id(tok) == 50256
    assert is_chunk_safe(tok)
    text = "Hello world\n\n  indented <|endoftext|> café 🙂"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text  # reversible
    assert tok.encode("a<|endoftext|>b").ids[1] == 50256


def test_trained_bpe_has_exact_vocab_and_eot(bpe) -> None:
    assert bpe.get_vocab_size() == 512
    assert bpe.token_to_id(EOT) is not None
    assert is_chunk_safe(bpe)
    text = "Q: What is 48 plus 76? A: 124\nUnscramble: ésa = ?"
    assert bpe.decode(bpe.encode(text).ids) == text  # byte-level: any text round-trips


def test_training_is_deterministic_across_processes(tmp_path: Path, bpe) -> None:
    code = (
        "import sys; from scalegpt.train.data import builtin; from scalegpt.train.data.tokenizer import *\n"
        "docs = [d for n in builtin.DOMAINS for d in builtin.generate(n, 0.05)]\n"
        "print(tokenizer_hash(train_bpe(docs, 512)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tokenizer_hash(bpe)


def test_hash_survives_save_and_load(tmp_path: Path, bpe) -> None:
    save_tokenizer(bpe, tmp_path / "tokenizer.json")
    assert tokenizer_hash(load_tokenizer(tmp_path / "tokenizer.json")) == tokenizer_hash(bpe)
    assert tokenizer_hash(load_tokenizer(tmp_path)) == tokenizer_hash(bpe)  # a folder with tokenizer.json
    assert not list(tmp_path.glob(".*tmp*"))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzz-new"] = 512
    (tmp_path / "other.json").write_text(json.dumps(spec))
    assert tokenizer_hash(load_tokenizer(tmp_path / "other.json")) != tokenizer_hash(bpe)


def test_too_small_sample_is_a_user_error() -> None:
    with pytest.raises(UserError, match="tokenizer_sample_mb"):
        train_bpe(["tiny text"], 4096)
    with pytest.raises(UserError, match="at least 257"):
        train_bpe(["tiny text"], 100)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(UserError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_token_dtype() -> None:
    assert token_dtype(512) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(50257) == np.uint16
    with pytest.raises(UserError, match="too large"):
        token_dtype(2**32 + 1)


def test_token_byte_lengths_count_utf8_bytes(bpe) -> None:
    lengths = token_byte_lengths(bpe)
    text = "naïve café 🙂 " + "\n".join(small_corpus()[:20])
    ids = bpe.encode(text).ids + [eot_id(bpe)]
    assert lengths[ids].sum() == len(text.encode())
    assert lengths[eot_id(bpe)] == 0


def test_split_safe_cuts_only_before_newline_after_non_space() -> None:
    text = "ab\ncd \nef\n\ngh\n" * 50
    pieces = split_safe(text, 10)
    assert "".join(pieces) == text and len(pieces) > 10
    for p in pieces[1:]:
        assert p.startswith("\n")
    for a in pieces[:-1]:
        assert not a[-1].isspace()
    assert split_safe("no newline at all " * 10, 5) == ["no newline at all " * 10]


def _chunked_equals_whole(tok, text: str, target: int) -> int:
    whole = tok.encode(text).ids
    pieces = split_safe(text, target)
    chunked = [i for enc in tok.encode_batch(pieces) for i in enc.ids]
    assert chunked == whole
    return len(pieces)


def test_chunked_equals_whole_on_shakespeare_with_gpt2(shared_data: Path) -> None:
    text = (shared_data / "corpora" / "drama_tinyshakespeare.txt").read_text(encoding="utf-8")
    assert _chunked_equals_whole(load_tokenizer(GPT2), text, 2000) > 400


def test_chunked_equals_whole_with_trained_bpe(bpe) -> None:
    text = "\n".join(small_corpus()) + "\n  indented\n\ttab\r\nwindows \n trailing  \n\n\nend"
    assert _chunked_equals_whole(bpe, text, 300) > 100


def test_non_byte_level_tokenizers_are_not_chunked(bpe) -> None:
    from tokenizers import normalizers, pre_tokenizers

    spec = json.loads(bpe.to_str())
    from tokenizers import Tokenizer

    t = Tokenizer.from_str(json.dumps(spec))
    t.normalizer = normalizers.NFKC()
    assert not is_chunk_safe(t)
    t = Tokenizer.from_str(json.dumps(spec))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not is_chunk_safe(t)
