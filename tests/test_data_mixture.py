"""The mixture sampler: proportions, purity (ranks, resume, processes), epochs without repeats, windows
that come verbatim from the source, consumption accounting, validation windows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scalegpt.train.config.loading import load_config
from scalegpt.train.data import builtin
from scalegpt.train.data.mixture import Mixture, describe
from scalegpt.train.data.prepare import prepare
from scalegpt.train.data.sampling import feistel
from scalegpt.train.data.tokenizer import EOT, load_tokenizer
from scalegpt.train.errors import UserError

from helpers import story

N_CTX = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sources: a folder of many documents, one long file (small: ~1-2 hundred windows, so its
    epochs are short) and a built-in corpus."""
    root = tmp_path_factory.mktemp("mix")
    (root / "many").mkdir()
    for i in range(60):
        (root / "many" / f"{i:02d}.txt").write_text(story(i, 2))
    (root / "long.txt").write_text(story(1000, 6))
    data = {
        "dir": str(root / "prep"),
        "val_fraction": 0.1,
        "num_proc": 1,
        "sources": [
            {"name": "many", "path": str(root / "many"), "weight": 0.5},
            {"name": "long", "path": str(root / "long.txt"), "weight": 0.3},
            {"name": "prose", "builtin": "prose", "builtin_mb": 0.05, "weight": 0.2},
        ],
    }
    model = {"n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": N_CTX, "vocab_size": 512}
    (root / "run.yaml").write_text(json.dumps({"model": model, "data": data}))
    prepare(load_config(root / "run.yaml"), echo=lambda _: None)
    return root / "prep"


@pytest.fixture(scope="module")
def mix(prepared: Path) -> Mixture:
    return Mixture(prepared, N_CTX, seed=1234)


@pytest.mark.parametrize("weights", [None, {"many": 0.9, "long": 0.07, "prose": 0.03}])
@pytest.mark.parametrize("offset", [0, 123_457])
def test_proportions_within_one_point_over_20000(prepared: Path, weights, offset: int) -> None:
    m = Mixture(prepared, N_CTX, seed=7, weights=weights)
    src, _ = m.resolve(np.arange(offset, offset + 20_000))
    share = np.bincount(src, minlength=3) / 20_000
    assert np.abs(share - m.weights).max() < 0.01
    assert np.abs(share - m.weights).max() < 0.002  # stratified: far tighter than chance (~0.35 points)


def test_weights_are_normalized(prepared: Path) -> None:
    m = Mixture(prepared, N_CTX, seed=0, weights={"many": 60, "long": 22, "prose": 19})
    assert m.weights.sum() == pytest.approx(1.0) and m.weights[0] == pytest.approx(60 / 101)
    text = describe(m, 1000)
    assert "weights sum to 101, normalized to 1" in text and "59.41%" in text and "epochs" in text


def test_same_sample_for_any_world_size_and_across_resume(prepared: Path, mix: Mixture) -> None:
    g = np.arange(0, 96)
    one = mix.batch(g).numpy()
    # 2 ranks, micro batch 4, global batch 16: rank r takes its slices of each step's 16 indices
    ranks = [Mixture(prepared, N_CTX, seed=1234) for _ in range(2)]
    for step in range(6):
        for r, m in enumerate(ranks):
            for micro in range(2):
                idx = [step * 16 + micro * 8 + r * 4 + j for j in range(4)]
                assert np.array_equal(m.batch(idx).numpy(), one[idx])
    resumed = Mixture(prepared, N_CTX, seed=1234)  # a fresh process resuming at sample 50
    assert np.array_equal(resumed.batch(range(50, 96)).numpy(), one[50:])
    assert not np.array_equal(Mixture(prepared, N_CTX, seed=1235).batch(g).numpy(), one)


def test_same_sample_in_another_process(prepared: Path, mix: Mixture) -> None:
    code = (
        "import sys, hashlib; from scalegpt.train.data.mixture import Mixture\n"
        f"m = Mixture({str(prepared)!r}, {N_CTX}, 1234)\n"
        "print(hashlib.sha256(m.batch(range(1000, 1500)).numpy().tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == hashlib.sha256(mix.batch(range(1000, 1500)).numpy().tobytes()).hexdigest()


def test_no_repeats_before_the_epoch_boundary(mix: Mixture) -> None:
    src, start = mix.resolve(np.arange(40_000))
    for i, name in enumerate(mix.names):
        w = int(mix.windows[i])
        starts = start[src == i]
        assert len(starts) >= 2 * w, name
        every = set(range(0, w * N_CTX, N_CTX))  # windows tile the train split, sharing one boundary token
        first, second = starts[:w], starts[w : 2 * w]
        assert set(first.tolist()) == every and set(second.tolist()) == every
        assert not np.array_equal(first, second)  # reshuffled for the new epoch
        train = mix.manifest["sources"][i]["train"]["tokens"]
        assert starts.max() + N_CTX + 1 <= train  # never reaches into validation


def test_samples_appear_verbatim_in_their_source(prepared: Path, mix: Mixture) -> None:
    root = prepared.parent
    texts = {
        "many": [(root / "many" / f"{i:02d}.txt").read_text() for i in range(60)],
        "long": [(root / "long.txt").read_text()],
        "prose": list(builtin.generate("prose", 0.05)),
    }
    tok = load_tokenizer(prepared / "tokenizer.json")
    eot = tok.token_to_id(EOT)
    seen = set()
    for g in range(0, 3000, 37):
        i, ids = int(mix.resolve([g])[0][0]), mix.batch([g])[0].numpy()
        seen.add(i)
        assert len(ids) == N_CTX + 1 and ids.dtype == np.int64
        pieces = np.split(ids, np.flatnonzero(ids == eot))
        for k, piece in enumerate(pieces):
            body = piece[1:] if k else piece  # drop the EOT that starts each later piece
            text = tok.decode(body.tolist())
            assert any(text in doc for doc in texts[mix.names[i]]), (g, text)
            if 0 < k < len(pieces) - 1:  # a whole document between two EOTs
                assert text in texts[mix.names[i]]
    assert seen == {0, 1, 2}


def test_consumed_counts_samples_tokens_and_epochs(mix: Mixture) -> None:
    for n in (0, 1, 1000, mix.block, 3 * mix.block + 17, 25_000):
        src, _ = mix.resolve(np.arange(n))
        counts = np.bincount(src, minlength=3)
        got = mix.consumed(n)
        for i, name in enumerate(mix.names):
            assert got[name]["samples"] == counts[i]
            assert got[name]["tokens"] == counts[i] * N_CTX
            assert got[name]["epochs"] == pytest.approx(counts[i] / mix.windows[i])
    far = mix.consumed(300_000_000)  # a GPT-3-length plan resolves instantly
    assert sum(v["samples"] for v in far.values()) == 300_000_000
    assert abs(far["many"]["samples"] / 3e8 - mix.weights[0]) < 1e-8


def test_feistel_is_a_permutation() -> None:
    for n in (1, 2, 3, 5, 64, 1000, 1025, 4097):
        for key in (0, 1, 2**63 + 5):
            p = feistel(np.arange(n), n, np.uint64(key))
            assert sorted(p.tolist()) == list(range(n))
    a = feistel(np.arange(1000), 1000, np.uint64(1))
    b = feistel(np.arange(1000), 1000, np.uint64(2))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    big = 200_000_000_000  # a 400B-token source, with no array of its size
    x = np.array([0, 1, 2, big - 1, 12345678901])
    y = feistel(x, big, np.uint64(9))
    assert (y < big).all() and len(set(y.tolist())) == len(x)
    keys = np.array([1, 2, 1, 2, 1], dtype=np.uint64)  # per-element keys
    assert feistel(x, big, keys)[0] == feistel(x[:1], big, np.uint64(1))[0]


def test_validation_windows_are_fixed_and_from_the_held_out_part(prepared: Path, mix: Mixture) -> None:
    m = mix.manifest["sources"][0]
    ids = np.fromfile(prepared / m["file"], dtype=mix.manifest["dtype"])
    batches = list(mix.val_batches("many", 4, 3))
    assert [tuple(b.shape) for b in batches] == [(4, N_CTX + 1)] * 3
    again = list(Mixture(prepared, N_CTX, seed=999).val_batches("many", 4, 3))
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(batches, again, strict=True))
    val = ids[m["train"]["tokens"] :]
    for row in np.concatenate([b.numpy() for b in batches]):
        hits = [s for s in range(0, len(val) - N_CTX, N_CTX) if np.array_equal(val[s : s + N_CTX + 1], row)]
        assert hits
    windows = mix.val_windows("many")
    assert sum(len(b) for b in mix.val_batches("many", 1000, 1000)) == windows
    assert mix.val_bytes_per_token("many") == pytest.approx(m["val"]["bytes"] / m["val"]["tokens"])
    assert 1.0 < mix.val_bytes_per_token("many") < 8.0


def test_sampler_errors(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `scalegpt prepare CONFIG` first"):
        Mixture(tmp_path, N_CTX, 0)
    with pytest.raises(UserError, match="unknown: \\['nope'\\]"):
        Mixture(prepared, N_CTX, 0, weights={"many": 1, "long": 1, "prose": 1, "nope": 1})
    with pytest.raises(UserError, match="missing: \\['prose'\\]"):
        Mixture(prepared, N_CTX, 0, weights={"many": 1, "long": 1})
    for bad in (0, -1.0, float("nan"), "x"):
        with pytest.raises(UserError, match="must be a positive number"):
            Mixture(prepared, N_CTX, 0, weights={"many": 1, "long": bad, "prose": 1})
    with pytest.raises(UserError, match="weight of source 'long' is under .* too small to stratify"):
        Mixture(prepared, N_CTX, 0, weights={"many": 1e7, "long": 1, "prose": 1e6})
    with pytest.raises(UserError, match="fewer than one window of n_ctx\\+1=100001"):
        Mixture(prepared, 100_000, 0)
    with pytest.raises(UserError, match="made by a different tokenizer"):
        Mixture(prepared, N_CTX, 0, tokenizer_hash="0" * 64)
    with pytest.raises(UserError, match="no source 'nope'"):
        Mixture(prepared, N_CTX, 0).val_batches("nope", 1, 1)


def test_a_run_samples_with_its_own_weights_not_prepares(prepared: Path) -> None:
    """prepare planned 0.5/0.3/0.2; a run's config (file plus overrides) decides what is drawn."""
    run_yaml = prepared.parent / "run.yaml"
    cfg = load_config(run_yaml, ["data.sources.0.weight=0.1", "data.sources.2.weight=0.6"])
    m = Mixture.for_config(cfg)
    assert m.weights.tolist() == pytest.approx([0.1, 0.3, 0.6])
    n = 4 * m.block  # whole blocks: each source within one sample of its share
    counts = m.source_counts(np.arange(n))
    assert sum(counts.values()) == n
    assert all(abs(counts[name] - w * n) <= 1 for name, w in {"many": 0.1, "long": 0.3, "prose": 0.6}.items())
    renamed = load_config(run_yaml, ["data.sources.1.name=short"])
    with pytest.raises(UserError, match="unknown: \\['short'\\], missing: \\['long'\\]"):
        Mixture.for_config(renamed)
