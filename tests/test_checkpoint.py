"""Checkpoint names, `latest` and the fallback order, on directories laid out as the trainer writes them
(tiny stand-in files: the DeepSpeed states themselves are exercised in tests/test_checkpoint_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scalegpt.train.checkpoint import (
    META,
    checkpoint_dir,
    choose_loadable,
    find_latest,
    list_checkpoints,
    resume_point,
    step_of,
    tag_for,
    write_latest,
)
from scalegpt.train.config.loading import load_config
from scalegpt.train.errors import UserError

from conftest import CONFIGS

MILLION = 1_000_000


def fake_checkpoint(run: Path, step: int, *, corrupt: bool = False) -> Path:
    """A one-rank checkpoint with the files resume verifies, then `latest` pointed at it, as save() leaves it."""
    path = checkpoint_dir(run, step)
    path.mkdir(parents=True)
    torch.save({"module": {}}, path / "mp_rank_00_model_states.pt")
    optim = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {}}, optim)
    if corrupt:
        optim.write_bytes(optim.read_bytes()[:20])  # truncated, as by a full disk
    (path / META).write_text(json.dumps({"step": step, "tokens": 0, "samples": 0, "world_size": 1}))
    write_latest(run, step)
    return path


def test_names_round_trip_past_a_million_steps() -> None:
    for step in (0, 5, 999_999, MILLION, 12_345_678):
        assert step_of(tag_for(step)) == step
    assert tag_for(5) == "step_000005" and tag_for(MILLION) == "step_1000000"
    assert step_of("latest") is None and step_of("step_12") is None


def test_checkpoints_are_listed_in_step_order_past_999999(tmp_path: Path) -> None:
    for step in (MILLION, 999_998, 999_999):
        fake_checkpoint(tmp_path, step)
    checkpoint_dir(tmp_path, 2 * MILLION).mkdir()  # a save that died before scalegpt.json: not listed
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, s) for s in (999_998, 999_999, MILLION)]


def test_fallback_walks_back_to_the_previous_step_not_the_previous_name(tmp_path: Path) -> None:
    """step_999999 sorts after step_1000000 as text, but it is the checkpoint just before it."""
    for step in (999_998, 999_999):
        fake_checkpoint(tmp_path, step)
    broken = fake_checkpoint(tmp_path, MILLION, corrupt=True)
    cfg = load_config(CONFIGS / "smoke.yaml", ["checkpoint.fallback=true"])
    path, meta = choose_loadable(broken, cfg, tmp_path)
    assert path == checkpoint_dir(tmp_path, 999_999) and meta["step"] == 999_999
    strict = load_config(CONFIGS / "smoke.yaml")  # fallback is opt-in
    with pytest.raises(UserError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is corrupt or truncated"):
        choose_loadable(broken, strict, tmp_path)


def test_latest_names_the_newest_complete_save(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert find_latest(tmp_path) is None and resume_point(cfg, tmp_path) is None  # a fresh run
    fake_checkpoint(tmp_path, MILLION)
    latest = find_latest(tmp_path)
    assert latest is not None and latest.complete and latest.step == MILLION
    assert resume_point(cfg, tmp_path) == checkpoint_dir(tmp_path, MILLION)
    write_latest(tmp_path, MILLION + 1)  # names a checkpoint that is not there
    latest = find_latest(tmp_path)
    assert latest is not None and not latest.complete
    with pytest.raises(UserError, match=f"names '{tag_for(MILLION + 1)}', which is not a complete checkpoint"):
        resume_point(cfg, tmp_path)
