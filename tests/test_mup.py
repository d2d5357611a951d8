"""model.parametrization=mup: μP's rules (model/gpt.py's table) written out by hand and checked against
Microsoft's `mup` package, the keys as a user sets them, and a μP run that does everything a standard
one does: resume, two processes, the batch ramp, export to Hugging Face, sample and evaluate."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from scalegpt.launch.cli import main
from scalegpt.model import GPT, ModelConfig, build_model
from scalegpt.model.hf import hf_config, to_hf, to_hf_state_dict
from scalegpt.train.checkpoint import checkpoint_dir
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import to_yaml
from scalegpt.train.data.tokenizer import PACKAGED_TOKENIZERS
from scalegpt.train.engine import param_groups, set_lr

from conftest import TEN_STEPS, once_per_session
from e2e import SMOKE, fork_run, losses, metrics, scalegpt, train
from helpers import one_error_line

SHAPE = dict(n_layer=2, n_head=4, n_ctx=16, vocab_size=50)
BASE, WIDE = 32, 128  # m = 4
LR, WD = 1e-3, 0.1


def mup(d_model: int, **changes: object) -> ModelConfig:
    return ModelConfig(**{**SHAPE, "d_model": d_model, "parametrization": "mup", "mup_base_d_model": BASE, **changes})


# μP for Adam written out for width 128 over base 32 (m = 4, L = 2 layers): parameter -> (init std, LR, decay).
# Hidden matrices: std 0.02 / sqrt(m) (residual projections 0.02 / sqrt(2 L) / sqrt(m)), LR / m, decay * m.
HIDDEN = (LR / 4, WD * 4)
BY_HAND = {
    "transformer.wte.weight": (0.02, LR, WD),
    "transformer.wpe.weight": (0.02, LR, WD),
    "attn.c_attn.weight": (0.01, *HIDDEN),
    "mlp.c_fc.weight": (0.01, *HIDDEN),
    "attn.c_proj.weight": (0.005, *HIDDEN),
    "mlp.c_proj.weight": (0.005, *HIDDEN),
}
OUTPUT_MULT = 1 / 4
ATTN_SCALE = math.sqrt(8) / 32  # sqrt(base d_head = 32 / 4 heads) / d_head (128 / 4 heads)


def hand_rule(name: str) -> tuple[float | None, float, float]:
    """(init std or None for biases and LayerNorms, LR, weight decay) for a parameter of the wide model."""
    for suffix, rule in BY_HAND.items():
        if name.endswith(suffix):
            return rule
    return None, LR, 0.0


def our_lr_and_decay(model: GPT) -> dict[str, tuple[float, float]]:
    """Each parameter's LR and weight decay as the trainer sets them: param_groups, then set_lr."""
    opt = torch.optim.AdamW(param_groups(model, WD), lr=123.0)
    set_lr(opt, LR)
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def final_hidden(model: GPT, idx: Tensor) -> Tensor:
    """The final LayerNorm's output (before μP's multiplier), caught on its way to the readout."""
    seen: list[Tensor] = []
    handle = model.transformer.ln_f.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(idx)
    finally:
        handle.remove()
    return seen[0]


IDX = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))


# -- the rules, by hand ----------------------------------------------------------------------------------
def test_learning_rates_and_weight_decay_follow_the_table() -> None:
    model = build_model(mup(WIDE), seed=0)
    for name, (lr, decay) in our_lr_and_decay(model).items():
        _, want_lr, want_decay = hand_rule(name)
        assert lr == pytest.approx(want_lr, rel=1e-12) and decay == pytest.approx(want_decay, rel=1e-12), name
    set_lr_again = torch.optim.AdamW(param_groups(model, WD), lr=1.0)
    set_lr(set_lr_again, 0.5 * LR)  # a later step of the schedule scales every group alike
    assert sorted(g["lr"] for g in set_lr_again.param_groups) == pytest.approx(sorted([LR / 8, LR / 2, LR / 2]))


def test_initialization_follows_the_table() -> None:
    """The weights are those of drawing each matrix at the table's std, in module order, from one generator
    seeded as init_weights is (tests/test_model.py's reference draw)."""
    model = build_model(mup(WIDE), seed=5)
    gen = torch.Generator().manual_seed(5)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            std = hand_rule(name + ".weight")[0]
            assert std is not None
            want = torch.empty(module.weight.shape).normal_(0.0, std, generator=gen)
            assert torch.equal(module.weight.detach(), want), name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_logits_and_attention_follow_the_table() -> None:
    model = build_model(mup(WIDE), seed=1).eval()
    with torch.no_grad():
        logits = model(IDX)[0]
        by_hand = (final_hidden(model, IDX) * OUTPUT_MULT) @ model.transformer.wte.weight.T
        torch.testing.assert_close(logits, by_hand, rtol=1e-6, atol=1e-7)
        attn = model.transformer.h[0].attn
        x = torch.randn(2, 16, WIDE, generator=torch.Generator().manual_seed(4))
        q, k, v = (t.view(2, 16, 4, 32).transpose(1, 2) for t in attn.c_attn(x).split(WIDE, dim=2))
        scores = (q @ k.transpose(-1, -2)) * ATTN_SCALE
        scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, WIDE)
        torch.testing.assert_close(attn(x), attn.c_proj(y), rtol=1e-5, atol=1e-6)


def test_at_its_base_width_a_mup_model_is_the_standard_one() -> None:
    """Every multiplier is 1 there: settings tuned on the standard base model are the μP settings."""
    ours, standard = build_model(mup(BASE), seed=2), build_model(ModelConfig(**SHAPE, d_model=BASE), seed=2)
    assert all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), standard.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(IDX)[0], standard(IDX)[0], rtol=1e-6, atol=1e-6)
    assert set(our_lr_and_decay(ours).values()) == {(LR, WD), (LR, 0.0)}


def test_the_standard_parametrization_keeps_its_two_groups() -> None:
    model = build_model(ModelConfig(**SHAPE, d_model=WIDE), seed=0)
    decay, no_decay = param_groups(model, WD)
    assert (decay["weight_decay"], decay["lr_scale"], no_decay["weight_decay"], no_decay["lr_scale"]) == (WD, 1, 0, 1)
    assert [id(p) for p in decay["params"] + no_decay["params"]] == [
        id(p) for p in model.parameters() if p.dim() >= 2
    ] + [id(p) for p in model.parameters() if p.dim() < 2]


# -- the same figures from Microsoft's mup -----------------------------------------------------------------
def test_groups_init_and_readout_equal_microsofts_mup() -> None:
    """mup's MuAdamW, mup.init.normal_ and MuSharedReadout on our model, its base shapes taken from the
    same model at the base width: the figures the trainer uses are theirs."""
    pytest.importorskip("mup.optim")  # Microsoft's package, not any other folder named mup on the path
    import mup as mup_pkg

    model = build_model(mup(WIDE), seed=9).eval()
    with torch.device("meta"):
        base = GPT(mup(BASE))
    mup_pkg.set_base_shapes(model, base, rescale_params=False)
    # the standard groups go in, μP's come out
    standard = [
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": WD},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    theirs = {
        id(p): (g["lr"], g["weight_decay"]) for g in mup_pkg.MuAdamW(standard, lr=LR).param_groups for p in g["params"]
    }
    for (name, (lr, decay)), p in zip(our_lr_and_decay(model).items(), model.parameters(), strict=True):
        assert (lr, decay) == pytest.approx(theirs[id(p)], rel=1e-12), name
    # mup.init.normal_ takes the standard std (GPT-2's) and scales it by the tensor's infshape
    torch.manual_seed(9)  # our generator and torch's default one give the same stream for one seed
    resid = 0.02 / math.sqrt(2 * SHAPE["n_layer"])
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            drawn = torch.empty(module.weight.shape)
            drawn.infshape = module.weight.infshape
            mup_pkg.init.normal_(drawn, std=resid if name.endswith("c_proj") else 0.02)
            assert torch.equal(drawn, module.weight.detach()), name
    # the tied readout: MuSharedReadout over wte
    readout = mup_pkg.MuSharedReadout(model.transformer.wte.weight, bias=False)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], readout(final_hidden(model, IDX)), rtol=1e-6, atol=1e-7)


# -- export: the multipliers folded into weights ------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [{}, {"bias": False}, {"attention": "alternating", "local_window": 4, "qkv_bias": False}],
    ids=["gpt2", "gpt2-nobias", "gpt-neo"],
)
def test_a_mup_model_exports_as_a_standard_one_with_equal_logits(changes: dict) -> None:
    """Queries times sqrt(d_head) * attn_scale, the final LayerNorm times 1/m: transformers' standard
    GPT-2 (or GPT-Neo) then computes our μP logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = mup(WIDE, **changes)
    ours = GPT(config).eval()
    for p in ours.parameters():  # non-trivial biases and gains, so a missed fold shows
        p.data.add_(0.05 * torch.randn_like(p))
    hf, state = to_hf(config, ours.state_dict(), bos_token_id=49, eos_token_id=49)
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf)).eval()
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert [k for k in missing if not k.endswith(("lm_head.weight", ".attn.bias", ".masked_bias"))] == []
    assert unexpected == []
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDX).logits, ours(IDX)[0], atol=1e-4, rtol=0)
        standard_reading = GPT(replace(config, parametrization="standard", mup_base_d_model=None)).eval()
        standard_reading.load_state_dict(ours.state_dict())
        assert (standard_reading(IDX)[0] - ours(IDX)[0]).abs().max() > 1e-2  # so the fold did something


# -- the keys as a user sets them ------------------------------------------------------------------------
def error_line(*args: str) -> str:
    """`scalegpt ARGS` through the command's own entry point, in-process (test_spike keeps one real process
    to prove the command prints the same line and exits 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    assert code == 2, (code, err.getvalue()[-2000:])
    return one_error_line(err.getvalue())


MUP = ["model.parametrization=mup", "model.mup_base_d_model=32"]


def test_the_keys_reach_the_model_from_the_command_line() -> None:
    cfg = load_config(SMOKE, MUP)
    assert (cfg.model.parametrization, cfg.model.mup_base_d_model, cfg.model.width_mult) == ("mup", 32, 4.0)
    assert cfg.model.attn_scale == pytest.approx(math.sqrt(32 / 4) / 32)
    shown = scalegpt("train", SMOKE, "--dry-run", *MUP).stdout
    assert "  parametrization: mup\n" in shown and "  mup_base_d_model: 32\n" in shown


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (
            ["model.parametrization=mup", "model.mup_base_d_model=0"],
            "model.mup_base_d_model",
            "must be a positive width",
        ),
        (["model.parametrization=mup", "model.mup_base_d_model=-64"], "model.mup_base_d_model", "got -64"),
        (["model.parametrization=mup"], "model.parametrization", "model.mup_base_d_model must be a positive"),
        (["model.mup_base_d_model=32"], "model.mup_base_d_model", "is read only under model.parametrization=mup"),
        (["model.parametrization=mup", "model.mup_base_d_model=30"], "model.mup_base_d_model", "n_head=4"),
        (["model.parametrization=mup", *MUP[1:], "model.mup_base_d_head=0"], "model.mup_base_d_head", "positive"),
        (["model.parametrization=mu-p"], "model.parametrization", "must be 'standard' or 'mup'"),
    ],
)
def test_bad_mup_settings_are_one_line(overrides: list[str], key: str, says: str) -> None:
    line = error_line("train", SMOKE, "--dry-run", *overrides)
    assert line.startswith(f"scalegpt: error: {key} ") and says in line, line


def _standard_hf_folder(folder: Path) -> Path:
    """A Hugging Face GPT-2 folder of the smoke shape, written by our own mapping (no transformers needed)."""
    config = load_config(SMOKE).model
    folder.mkdir()
    save_file(to_hf_state_dict(build_model(config, seed=0).state_dict()), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(config)))
    return folder


def _export_folder(folder: Path, overrides: list[str]) -> Path:
    """A scalegpt export (model.safetensors, config.yaml, tokenizer.json) of the smoke config with `overrides`."""
    cfg = load_config(SMOKE, overrides)
    folder.mkdir()
    state = {k: v.contiguous() for k, v in build_model(cfg.model, seed=0).state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "source": "scalegpt"})
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / "tokenizer.json").write_text((PACKAGED_TOKENIZERS["gpt2"] / "vocab.json").read_text())
    return folder


@pytest.mark.slow  # it exports three models
def test_mup_from_standard_weights_is_refused_and_from_mup_weights_inherited(tmp_path: Path) -> None:
    for source in (_standard_hf_folder(tmp_path / "hf"), _export_folder(tmp_path / "std", [])):
        line = error_line("train", SMOKE, "--dry-run", f"model.init_from={source}", f"data.tokenizer={source}", *MUP)
        assert f"model.parametrization=mup in the command line conflicts with model.init_from {source}" in line
        assert "parametrization=standard" in line and "something else under another" in line
    source = _export_folder(tmp_path / "mup", MUP)  # μP weights: the run takes the parametrization with the shape
    shown = scalegpt("train", SMOKE, "--dry-run", f"model.init_from={source}", f"data.tokenizer={source}").stdout
    assert "  parametrization: mup\n" in shown and "  mup_base_d_model: 32\n" in shown
    line = error_line(
        "train",
        SMOKE,
        "--dry-run",
        f"model.init_from={source}",
        f"data.tokenizer={source}",
        "model.mup_base_d_model=64",
    )
    assert "model.mup_base_d_model=64 in the command line conflicts" in line


def test_mup_set_in_yaml_over_standard_weights_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """The same refusal when the run file, not the command line, asks for μP."""
    source = _export_folder(tmp_path / "std", [])
    run = tmp_path / "run.yaml"
    mup = "model:\n  parametrization: mup\n  mup_base_d_model: 32\n"
    run.write_text(Path(SMOKE).read_text() + mup + f"  init_from: {source}\ndata:\n  tokenizer: {source}\n")
    line = error_line("train", str(run), "--dry-run")
    assert f"model.parametrization=mup in {run} conflicts with model.init_from {source}" in line, line


# -- a μP run end to end -----------------------------------------------------------------------------------
# micro batch 4 and a ramp from 8 to 16 sequences in quanta of 8: 6 steps of 8, then 16, on 1 or 2 processes
RAMP = [
    "train.micro_batch=4",
    "schedule.ramp_start_tokens=1024",
    "schedule.ramp_tokens=6144",
    "schedule.ramp_quantum=8",
]


@pytest.fixture(scope="module")
def mup_runs(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    def run(procs: int) -> Path:
        return once_per_session(
            tmp_path_factory, f"mup_{procs}p", lambda d: train(d, prepared, *TEN_STEPS, *RAMP, *MUP, procs=procs)
        )

    return {1: run(1), 2: run(2)}


@pytest.mark.slow
def test_a_mup_run_ramps_resumes_bit_for_bit_and_two_processes_equal_one(
    mup_runs: dict[int, Path], prepared: Path, tmp_path: Path
) -> None:
    one, two = losses(mup_runs[1]), losses(mup_runs[2])
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    first, *_, last = metrics(mup_runs[1])
    assert one[10] < one[1] and last["val_loss"] < first["val_loss"]  # it learns
    tokens = [m["tokens"] for m in metrics(mup_runs[1])[1:]]
    assert [b - a for a, b in zip([0, *tokens[:-1]], tokens, strict=True)] == [1024] * 6 + [2048] * 4  # the ramp ran
    resumed = fork_run(mup_runs[1], tmp_path / "resumed", 5)
    train(resumed, prepared, *TEN_STEPS, *RAMP, *MUP)
    again = losses(resumed)
    assert {s: again[s] for s in range(6, 11)} == {s: one[s] for s in range(6, 11)}
    # DeepSpeed's optimizer held μP's groups, at the last step's LR (the schedule's, as logged) times lr_scale
    last_lr = metrics(mup_runs[2])[-1]["lr"]
    for rank in (0, 1):
        optim = checkpoint_dir(mup_runs[2], 10) / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        groups = torch.load(optim, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        got = sorted((g["lr_scale"], g["weight_decay"], g["lr"]) for g in groups)
        want = sorted([(0.25, 0.4, last_lr / 4), (1.0, 0.1, last_lr), (1.0, 0.0, last_lr)])
        assert [x for g in got for x in g] == pytest.approx([x for w in want for x in w], rel=1e-12)


@pytest.mark.slow
def test_a_mup_model_exports_samples_and_evaluates(mup_runs: dict[int, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    run = mup_runs[2]
    out = tmp_path / "hf"
    assert "verified" in scalegpt("export", str(run), "--format", "hf", str(out)).stdout  # export's own check
    from scalegpt.train.weights import load_for_inference

    ours, tok, _ = load_for_inference(run, device="cpu")
    assert ours.config.parametrization == "mup"
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    x = torch.tensor([tok.encode("Q: What is 12 plus 7? A: 19").ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=0)
    greedy = ["--prompt", "Q: What is", "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"]
    assert scalegpt("sample", str(run), *greedy).stdout == scalegpt("sample", str(out), *greedy).stdout
    reports = []
    for source in (run, out):  # the run, and its export read as a Hugging Face model
        report = tmp_path / f"eval-{source.name}.json"
        args = ["--device", "cpu", "--tasks", "2D+", "--num-examples", "8", "--val-batches", "1"]
        scalegpt("eval", str(source), *args, "--json", str(report))
        reports.append(json.loads(report.read_text()))
    for part in ("fewshot", "validation"):
        ours_, theirs_ = (_numbers(r[part]) for r in reports)
        assert ours_ and ours_ == pytest.approx(theirs_, abs=1e-3), part


def _numbers(report: object) -> list[float]:
    """Every number in a JSON report, in order."""
    if isinstance(report, dict):
        return [x for v in report.values() for x in _numbers(v)]
    if isinstance(report, list):
        return [x for v in report for x in _numbers(v)]
    return [float(report)] if isinstance(report, (int, float)) and not isinstance(report, bool) else []
