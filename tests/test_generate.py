"""Generation (model/generate.py): KV cache against recomputation, sampling filters, seeds, stopping,
and equality with Hugging Face's GPT-2 on the same weights."""

from __future__ import annotations

import pytest
import torch

from scalegpt.model import GPT, ModelConfig
from scalegpt.model.generate import generate, sample_next, top_k_filter, top_p_filter, window_start
from scalegpt.model.hf import hf_config, to_hf_state_dict

from eval_helpers import varied_weights

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


def varied_model(**overrides: object) -> GPT:
    """A small GPT with varied_weights: greedy decoding that depends on the context."""
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 2, "d_model": 32, "n_ctx": 16, "vocab_size": 64, **overrides})
    return varied_weights(GPT(cfg))


def reference_greedy(model: GPT, prompt: list[int], n: int, shift: int) -> list[int]:
    """Greedy decoding written the slow, obvious way: re-run the whole window for every token."""
    seq = list(prompt)
    for _ in range(n):
        start = window_start(len(seq), model.config.n_ctx, shift)
        logits = model(torch.tensor([seq[start:]]))[0][0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("attention", ["dense", "alternating"])
@pytest.mark.parametrize("shift", [None, 1, 5])
def test_cache_equals_recompute_past_n_ctx(attention: str, shift: int | None) -> None:
    model = varied_model(attention=attention, local_window=4)
    n = 3 * model.config.n_ctx  # slides the window several times
    cached = generate(model, PROMPTS, max_new_tokens=n, temperature=0, use_cache=True, shift=shift)
    uncached = generate(model, PROMPTS, max_new_tokens=n, temperature=0, use_cache=False, shift=shift)
    assert cached == uncached
    assert all(len(row) == n for row in cached)
    assert len(set(cached[0])) > 5, "greedy output is degenerate, so the comparison proves little"
    step = shift or model.config.n_ctx // 2
    assert cached[1] == reference_greedy(model, PROMPTS[1], n, step)
    seeded = lambda: [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]  # noqa: E731
    sampled = generate(model, PROMPTS, max_new_tokens=n, shift=shift, generator=seeded())
    assert sampled == generate(model, PROMPTS, max_new_tokens=n, shift=shift, generator=seeded(), use_cache=False)


def test_shift_one_is_the_textbook_sliding_window() -> None:
    """shift=1 conditions every token on exactly the last n_ctx tokens (nanoGPT's crop)."""
    model = varied_model()
    seq = list(PROMPTS[0])
    for _ in range(40):
        seq.append(int(model(torch.tensor([seq[-model.config.n_ctx :]]))[0][0, -1].argmax()))
    assert generate(model, [PROMPTS[0]], max_new_tokens=40, temperature=0, shift=1)[0] == seq[3:]


def test_ragged_batch_equals_rows_alone() -> None:
    model = varied_model()
    batch = generate(model, PROMPTS, max_new_tokens=20, temperature=0)
    assert batch == [generate(model, [p], max_new_tokens=20, temperature=0)[0] for p in PROMPTS]
    tensor_batch = generate(model, torch.tensor([[1, 2, 3], [7, 8, 9]]), max_new_tokens=5, temperature=0)
    assert tensor_batch == generate(model, [[1, 2, 3], [7, 8, 9]], max_new_tokens=5, temperature=0)


def test_prompt_longer_than_context_is_handled_by_the_window() -> None:
    model = varied_model()
    long_prompt = list(range(1, 40))
    out = generate(model, [long_prompt], max_new_tokens=10, temperature=0)[0]
    assert out == reference_greedy(model, long_prompt, 10, model.config.n_ctx // 2)


def test_top_k_one_equals_greedy() -> None:
    model = varied_model()
    gen = torch.Generator().manual_seed(3)
    sampled = generate(model, PROMPTS, max_new_tokens=30, temperature=1.3, top_k=1, generator=gen)
    assert sampled == generate(model, PROMPTS, max_new_tokens=30, temperature=0)


def test_top_p_filter_on_hand_computed_distributions() -> None:
    probs = torch.tensor([[0.10, 0.50, 0.05, 0.35], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))  # noqa: E731
    # sorted row 0: 0.50 (idx 1), 0.35 (idx 3), 0.10 (idx 0), 0.05 (idx 2); cumulative .50 .85 .95 1.0
    assert kept(0.4)[0].tolist() == [False, True, False, False]  # the top token alone reaches 0.4
    assert kept(0.6)[0].tolist() == [False, True, False, True]  # 0.50 < 0.6 <= 0.85
    assert kept(0.9)[0].tolist() == [True, True, False, True]  # 0.85 < 0.9 <= 0.95
    assert kept(0.97)[0].tolist() == [True, True, True, True]
    assert kept(0.6)[1].sum() == 3  # uniform row: 0.25, 0.50 < 0.6, so three tokens
    assert kept(1e-6)[0].sum() == 1 and kept(1e-6)[1].sum() == 1  # never empty
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    filtered = top_p_filter(logits, 0.6)[0].softmax(-1)  # renormalized over the nucleus
    torch.testing.assert_close(filtered, torch.tensor([0.0, 0.50 / 0.85, 0.0, 0.35 / 0.85]))


def test_top_k_filter() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.5]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [
        [False, True, True, False],
        [False, False, True, True],
    ]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 10), logits)


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([[0.10, 0.50, 0.05, 0.35]]).log().expand(4000, 4)
    draws = sample_next(logits, top_p=0.6, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() - 0.50 / 0.85) < 0.03


def test_same_seed_same_tokens_and_rows_independent_of_batch() -> None:
    model = varied_model()

    def run(seed: int, prompts: list[list[int]]) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        return generate(model, prompts, max_new_tokens=25, temperature=1.0, top_p=0.9, generator=gens)

    assert run(1, PROMPTS) == run(1, PROMPTS)
    assert run(1, PROMPTS) != run(2, PROMPTS)
    assert run(1, PROMPTS)[0] == run(1, PROMPTS[:1])[0]  # row 0's stream does not depend on rows 1, 2
    shared = torch.Generator().manual_seed(5)
    once = generate(model, PROMPTS, max_new_tokens=10, generator=shared)
    assert once == generate(model, PROMPTS, max_new_tokens=10, generator=torch.Generator().manual_seed(5))


def test_stops_at_eot_per_row() -> None:
    model = varied_model()
    free = generate(model, PROMPTS, max_new_tokens=30, temperature=0)
    k = next(i for i in range(2, 30) if free[0][i] not in free[0][:i])  # row 0 first emits it at k
    eot = free[0][k]
    first = [row.index(eot) if eot in row else len(row) for row in free]
    stopped = generate(model, PROMPTS, max_new_tokens=30, temperature=0, eot_id=eot)
    assert stopped == [row[:i] for row, i in zip(free, first, strict=True)]
    assert len(stopped[0]) == k


def test_eot_inside_a_prompt_does_not_stop_it() -> None:
    model = varied_model()
    prompts = [[1, 2, 3, 9, 9, 9], [9]]  # row 1 is still reading row 0's prompt positions as 9s
    free = generate(model, prompts, max_new_tokens=6, temperature=0)
    assert generate(model, prompts, max_new_tokens=6, temperature=0, eot_id=9) == [
        row[: row.index(9)] if 9 in row else row for row in free
    ]


def test_on_token_sees_each_token_and_can_stop_a_row() -> None:
    model = varied_model()
    seen: list[tuple[int, int]] = []

    def on_token(row: int, token: int) -> bool:
        seen.append((row, token))
        return row == 1 and len([r for r, _ in seen if r == 1]) == 3

    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0, on_token=on_token)
    assert [len(r) for r in out] == [8, 3, 8]
    assert [t for r, t in seen if r == 0] == out[0]
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    assert out == [row[: len(o)] for row, o in zip(free, out, strict=True)]


def test_bad_arguments() -> None:
    model = varied_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=3)
    for kwargs in (
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_new_tokens": -1},
    ):
        with pytest.raises(ValueError):
            generate(model, [[1]], **{"max_new_tokens": 3, **kwargs})
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[]]


def test_generate_restores_training_mode() -> None:
    model = varied_model().train()
    generate(model, [[1]], max_new_tokens=2)
    assert model.training


def test_greedy_matches_hugging_face_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    model = varied_model(n_ctx=48)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(model.config))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to wte
    hf.generation_config.eos_token_id = None  # neither stops early nor suppresses any token
    hf.generation_config.pad_token_id = 0
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    n = model.config.n_ctx - prompt.size(1)  # GPT-2 cannot go past n_positions
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n)
    ours = generate(model, prompt, max_new_tokens=n, temperature=0)
    assert theirs[:, prompt.size(1) :].tolist() == ours
