"""An adapter that lets EleutherAI's lm-evaluation-harness evaluate a scalegpt model.

lm-eval talks to a model through three requests (lm_eval.api.model.LM):

- loglikelihood(context, continuation) -> (log P(continuation | context), is greedy): multiple choice;
- loglikelihood_rolling(text) -> log P(text), every token predicted once with as much context as fits:
  perplexity;
- generate_until(context, {until, max_gen_toks, ...}) -> text: free-form answers.

All three reduce to continuation_logprobs and model.generate, the same code as the built-in few-shot
tasks. Use it from `scalegpt eval RUN --lm-eval TASK ...`, or from Python:

    lm_eval.simple_evaluate(model=ScalegptLM("runs/smoke"), tasks=["lambada_openai"])

lm-eval is an optional dependency (`pip install 'scalegpt[eval]'`). Without it the class still works
on any object with an `args` tuple, lm-eval's Instance interface, which is how it is tested there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer
from torch import nn

from ...model.generate import generate
from ..data.tokenizer import EOT
from ..errors import UserError
from ..weights import load_for_inference
from .fewshot import Encoder, continuation_logprobs, shared_context_logprobs

try:
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # the adapter's methods need nothing from lm-eval
    HAVE_LM_EVAL = False
    _Base = object  # type: ignore[assignment,misc]

    def register_model(*_names: str) -> Any:  # type: ignore[no-redef]
        return lambda cls: cls


class Request(Protocol):
    """What the adapter reads of an lm_eval.api.instance.Instance."""

    @property
    def args(self) -> tuple[Any, ...]: ...


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("scalegpt")
class ScalegptLM(_Base):
    """lm-eval's LM on a scalegpt run, checkpoint or export directory (or an already loaded model).

    Arguments may arrive as strings (lm-eval's `model_args`), so numbers and dtypes are parsed here.
    Registered as "scalegpt" in lm-eval's model registry once this module is imported, so
    `simple_evaluate(model="scalegpt", model_args="pretrained=runs/smoke")` works from Python; the
    `lm_eval` command line does not import it, which is what `scalegpt eval --lm-eval` is for."""

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        batch_size: int | str = 16,
        max_batch_size: int | str | None = None,
        max_gen_toks: int | str = 256,
    ) -> None:
        if HAVE_LM_EVAL:
            super().__init__()
        if model is None:
            if pretrained is None:
                raise UserError("ScalegptLM needs pretrained=<run, checkpoint or export directory> or a model")
            if isinstance(dtype, str):
                if dtype not in _DTYPES:
                    raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
                dtype = _DTYPES[dtype]
            model, tokenizer, _ = load_for_inference(pretrained, device=device, dtype=dtype)
        if tokenizer is None:
            raise UserError("ScalegptLM given a model also needs its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = Encoder(tokenizer)
        self.n_ctx: int = model.config.n_ctx
        if str(batch_size).startswith("auto"):  # lm-eval's "auto": no search here, the cap or 16
            batch_size = max_batch_size or 16
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # -- helpers ----------------------------------------------------------------------------------------

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Trailing whitespace of the context belongs to the continuation ("A:" + " 12"), which is how a
        byte-level BPE splits words; an empty context becomes the end-of-text token."""
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        ctx, cont = self.encoder.pair(stripped, continuation)
        if not ctx:  # a tokenizer without end-of-text: condition on the first token instead
            ctx, cont = cont[:1], cont[1:]
        return ctx, cont

    # -- lm-eval's interface --------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives exactly the continuation)."""
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, r in enumerate(requests):  # a question's choices share their context: read it once
            ctx, cont = self._pair(*r.args[:2])
            by_context.setdefault(tuple(ctx), []).append((i, cont))
        items = [(list(ctx), [c for _, c in members]) for ctx, members in by_context.items()]
        scored = shared_context_logprobs(self.model, items, batch_size=self.batch_size)
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for members, scores in zip(by_context.values(), scored, strict=True):
            for (i, _), score in zip(members, scores, strict=True):
                out[i] = score
        return out

    def loglikelihood_rolling(self, requests: Sequence[Request], disable_tqdm: bool = False) -> list[float]:
        """log P(text) conditioned on end-of-text: windows of n_ctx targets, each token predicted once,
        every window given the n_ctx tokens before its last target (the last one overlapping)."""
        out: list[float] = []
        for r in requests:
            (text,) = r.args[:1]
            seq = [*self.encoder.prefix, *self.encoder.encode(text)]
            first = 1 if self.encoder.prefix else min(1, len(seq))  # no end-of-text: the first token is free
            pieces = []
            for start in range(first, len(seq), self.n_ctx):
                end = min(start + self.n_ctx, len(seq))
                ctx_start = max(0, end - 1 - self.n_ctx)
                pieces.append((seq[ctx_start:start], seq[start:end]))
            out.append(sum(lp for lp, _ in continuation_logprobs(self.model, pieces, batch_size=self.batch_size)))
        return out

    def generate_until(self, requests: Sequence[Request], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation (sampled when do_sample and temperature > 0), cut before the first `until`
        string and stopped there, or after max_gen_toks tokens. Requests with the same settings run
        batched."""
        groups: dict[tuple[tuple[str, ...], int, float], list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kwargs.get("until") or [EOT]
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            groups.setdefault((until, max_new, temperature), []).append(i)
        out = [""] * len(requests)
        device = next(self.model.parameters()).device
        for (until, max_new, temperature), members in groups.items():
            for a in range(0, len(members), self.batch_size):
                idx = members[a : a + self.batch_size]
                prompts = [self.encoder.context(requests[i].args[0])[-self.n_ctx :] or [0] for i in idx]
                new: list[list[int]] = [[] for _ in idx]

                def stop(row: int, token: int, new: list[list[int]] = new, until: tuple[str, ...] = until) -> bool:
                    new[row].append(token)
                    text = self.tokenizer.decode(new[row])
                    return any(u in text for u in until)

                generators = [torch.Generator(device=device).manual_seed(1234 + i) for i in idx]
                generate(
                    self.model,
                    prompts,
                    max_new_tokens=max_new,
                    temperature=temperature,
                    generator=generators if temperature > 0 else None,
                    eot_id=self.tokenizer.token_to_id(EOT),
                    on_token=stop,
                )
                for row, i in enumerate(idx):
                    text = self.tokenizer.decode(new[row])
                    cut = min([j for j in (text.find(u) for u in until) if j >= 0], default=len(text))
                    out[i] = text[:cut]
        return out

    # lm-eval reads these for caching and chat templates
    @property
    def tokenizer_name(self) -> str:
        return "scalegpt"

    @property
    def max_length(self) -> int:
        return self.n_ctx


def run_lm_eval(
    lm: ScalegptLM,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """lm_eval.simple_evaluate on `lm`: {task: {metric: value}} (numeric metrics only)."""
    if not HAVE_LM_EVAL:
        raise UserError("lm-evaluation-harness is not installed; run `pip install 'scalegpt[eval]'` (or lm-eval)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # indexing lm-eval's own thousands of tasks takes half a minute: skip it if it can be
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else " (add --lm-eval-include DIR for local YAML tasks)"
        raise UserError(f"lm-eval has no task {', '.join(map(repr, unknown))}{where}")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
