"""`scalegpt sample`: text from a run, checkpoint or export directory, streamed as it is generated.

Every prompt (from --prompt, each line of --prompt-file, or all of stdin when it is piped) is repeated
--num-samples times and the rows run as one batch (model/generate.py). A single row is printed token
by token; several rows are printed whole, one after another, when the batch is done, so that streaming
or not never changes the text. Each row draws from its own random generator, seeded from --seed and
the row's index, so the same command gives the same text.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from ..model.generate import generate
from ..train.data.tokenizer import EOT
from ..train.engine import pick_device
from ..train.errors import UserError
from ..train.weights import load_for_inference

_MAX_CHAR_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so a byte-level BPE needs at most 4 tokens


class TextStream:
    """Turns one row's new tokens into text that is safe to print as it arrives: it never cuts a
    multi-byte character in half and never shows text that may turn out to be the start of a --stop
    string. `text` is the completion so far, cut before the first stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.text = ""
        self.stopped = False
        self._pending: list[int] = []  # tokens whose bytes do not yet end on a character boundary
        self._shown = 0  # characters of `text` already handed out

    def push(self, token: int) -> str:
        """Add a token; return the newly printable text. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self._pending.append(token)
        piece = self.tokenizer.decode(self._pending)
        if piece.endswith("\ufffd") and len(self._pending) < _MAX_CHAR_TOKENS:
            return ""  # half a character: wait for the rest of its bytes
        self._pending.clear()
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        if self._pending and not self.stopped:
            self.text += self.tokenizer.decode(self._pending)
            self._pending.clear()
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        for n in range(min(len(self.text), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._shown)
        out, self._shown = self.text[self._shown : upto], upto
        return out


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad settings before any weights are loaded, each with what to pass instead."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:  # also catches nan
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1 disables it), got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 disables it), got {args.top_k}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give either --prompt or --prompt-file, not both")
    pick_device(args.device)


def _utf8(text: str, what: str) -> str:
    """`text` when it is real Unicode; Python keeps undecodable argv and stdin bytes as lone surrogates,
    which the tokenizer would reject with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{what} is not valid UTF-8 text (byte {exc.start}); pass text, not binary data") from exc
    return text


def _read_stdin() -> str:
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream without bytes underneath (a test's StringIO)
        return _utf8(sys.stdin.read(), "the prompt on stdin")
    try:
        return raw.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"the prompt on stdin is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [_utf8(args.prompt, "--prompt")]
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                lines = [line.rstrip("\r\n") for line in f]
        except OSError as exc:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({exc.reason})") from exc
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"--prompt-file {args.prompt_file} has no prompts (one per line; blank lines skip)")
        return prompts
    if sys.stdin is not None and not sys.stdin.isatty():
        return [_read_stdin().removesuffix("\n")]
    return [""]


def _encode(prompts: list[str], tokenizer: Tokenizer, n_ctx: int, *, strict: bool) -> list[list[int]]:
    """Token ids per prompt: an empty prompt starts from end-of-text, a long one keeps its last n_ctx."""
    eot = tokenizer.token_to_id(EOT)
    rows = []
    for n, text in enumerate(prompts, 1):
        ids = tokenizer.encode(text).ids if text else []
        name = "the prompt" if len(prompts) == 1 else f"prompt {n}"
        if not ids:
            if eot is None:
                raise UserError(f"{name} is empty and the tokenizer has no {EOT} token to start from; give a prompt")
            ids = [eot]
        if len(ids) > n_ctx:
            if strict:
                raise UserError(
                    f"{name} is {len(ids)} tokens but the model's context holds {n_ctx}; "
                    "shorten it or drop --strict-context to keep its last tokens"
                )
            print(
                f"scalegpt: warning: {name} is {len(ids)} tokens, longer than the context of {n_ctx}; "
                f"keeping its last {n_ctx} (--strict-context makes this an error)",
                file=sys.stderr,
            )
            ids = ids[-n_ctx:]
        rows.append(ids)
    return rows


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def sample_command(args: argparse.Namespace) -> int:
    """Entry point of `scalegpt sample` (parser in launch/cli.py)."""
    _check_args(args)
    prompts = _read_prompts(args)
    model, tokenizer, cfg = load_for_inference(args.path, device=args.device)
    rows = _encode(prompts, tokenizer, cfg.model.n_ctx, strict=args.strict_context)
    rows = [r for r in rows for _ in range(args.num_samples)]
    texts = [p for p in prompts for _ in range(args.num_samples)]
    device = next(model.parameters()).device
    seeds = torch.randint(2**62, (len(rows),), generator=torch.Generator().manual_seed(args.seed)).tolist()
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    streams = [TextStream(tokenizer, args.stop) for _ in rows]
    live = len(rows) == 1 and not args.no_stream

    def on_token(row: int, token: int) -> bool:
        piece = streams[row].push(token)
        if live and piece:
            _write(piece)
        return streams[row].stopped

    if live:
        _write(texts[0])
    generate(
        model,
        rows,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generators,
        eot_id=tokenizer.token_to_id(EOT),
        on_token=on_token,
    )
    if live:
        _write(streams[0].finish() + "\n")
        return 0
    for i, (prompt, stream) in enumerate(zip(texts, streams, strict=True)):
        stream.finish()
        if len(rows) > 1:
            _write(f"--- sample {i + 1} of {len(rows)} ---\n")
        _write(prompt + stream.text + "\n")
    return 0
