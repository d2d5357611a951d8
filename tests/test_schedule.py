"""The GPT-3 schedules at their key points, and the DeepSpeed JSON derived from Config."""

from __future__ import annotations

import math

import pytest

from scalegpt.train.config.loading import load_config
from scalegpt.train.config.validation import global_batch
from scalegpt.train.engine import deepspeed_config, param_groups
from scalegpt.train.errors import UserError
from scalegpt.train.schedule import Cadence, Schedule

from conftest import CONFIGS


def _small(world: int = 8) -> Schedule:
    return Schedule.from_config(load_config(CONFIGS / "gpt3-small.yaml"), world_size=world)


def test_lr_at_key_points_of_gpt3_small() -> None:
    s = _small()
    assert s.lr(0) == 0.0
    assert s.lr(375_000_000 // 2) == pytest.approx(3e-4)  # half way through warmup
    assert s.lr(375_000_000) == pytest.approx(6e-4)  # end of warmup: the peak
    mid = (375_000_000 + 260_000_000_000) // 2
    assert s.lr(mid) == pytest.approx(0.6e-4 + 0.5 * (6e-4 - 0.6e-4), rel=1e-6)  # cosine half way
    assert s.lr(260_000_000_000) == pytest.approx(0.6e-4)  # the 10% floor
    assert s.lr(300_000_000_000) == pytest.approx(0.6e-4)  # flat after decay
    values = [s.lr(t) for t in range(375_000_000, 260_000_000_000, 5_000_000_000)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_batch_ramp_from_32k_tokens_to_full_batch() -> None:
    s = _small(world=8)  # micro 8 x 8 ranks = 64 sequences per accumulation step
    assert s.batch_size(0) == 64  # 32k tokens = 16 sequences, rounded up to one accumulation step
    assert s.batch_size(2_000_000_000) == 128  # half way: (16 + 256) / 2 = 136 -> 2 accumulation steps
    assert s.batch_size(4_000_000_000) == 256  # the ramp ends at 4B tokens for Small
    assert s.batch_size(10**12) == 4 * s.batch_quantum  # the full batch: 4 accumulation steps
    one_gpu = _small(world=1)  # schedule.ramp_quantum=64: the same batches on one GPU as on eight
    sizes = [one_gpu.batch_size(t) for t in range(0, 4_000_000_001, 250_000_000)]
    assert sizes == [s.batch_size(t) for t in range(0, 4_000_000_001, 250_000_000)]
    assert sizes[0] == 64 and sizes[-1] == 256
    assert all(a <= b for a, b in zip(sizes, sizes[1:], strict=False))
    assert all(size % 64 == 0 for size in sizes)


def test_smoke_schedule_is_scaled_down() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml")
    s = Schedule.from_config(cfg, world_size=2)
    step_tokens = cfg.train.global_batch * cfg.model.n_ctx
    warmup_steps = cfg.schedule.warmup_tokens / step_tokens
    assert 5 <= warmup_steps <= 40 and s.lr(cfg.schedule.warmup_tokens) == pytest.approx(cfg.optim.lr)
    assert s.lr(cfg.train.max_steps * step_tokens) == pytest.approx(0.1 * cfg.optim.lr)


def test_deepspeed_json_comes_from_config() -> None:
    cfg = load_config(CONFIGS / "gpt3-small.yaml")
    ds = deepspeed_config(cfg, world_size=8, device="cuda")
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    adam = {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert ds["optimizer"]["params"] == {**adam, "torch_adam": True, "fused": True}  # torch's AdamW: nothing to compile
    cpu = deepspeed_config(cfg, world_size=1, device="cpu")
    assert cpu["optimizer"]["params"]["torch_adam"] and cpu["gradient_accumulation_steps"] == 32
    assert cpu["optimizer"]["params"]["fused"]  # torch's fused CPU AdamW kernel


def test_passthrough_adds_but_never_contradicts() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", ["deepspeed.zero_optimization.reduce_bucket_size=1000"])
    assert deepspeed_config(cfg, world_size=2, device="cpu")["zero_optimization"]["reduce_bucket_size"] == 1000
    bad = load_config(CONFIGS / "smoke.yaml", ["deepspeed.gradient_clipping=0.5"])
    with pytest.raises(UserError, match="deepspeed.gradient_clipping=0.5 contradicts"):
        deepspeed_config(bad, world_size=2, device="cpu")


def test_batch_that_does_not_divide_names_the_values() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.global_batch=24"])
    assert global_batch(cfg, 3) == 24
    with pytest.raises(UserError, match="train.global_batch=24 is not divisible by train.micro_batch=8 x world size 2"):
        global_batch(cfg, 2)


def test_weight_decay_only_on_matrices() -> None:
    from scalegpt.model import GPT, ModelConfig

    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=16, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params() and not math.isnan(total)


def test_cadence_is_due_on_its_multiples_and_at_the_end() -> None:
    every_5 = Cadence(5, at_end=True)
    assert [s for s in range(1, 13) if every_5.due(s, last=s == 12)] == [5, 10, 12]
    assert not Cadence(0, at_end=False).due(12, last=True)  # eval.every=0: never, not even at the end
    assert [s for s in range(1, 13) if Cadence(0, at_end=True).due(s, last=s == 12)] == [12]  # checkpoint.every=0
