"""The weighted mixture sampler: global sample index -> (source, window of n_ctx+1 tokens).

GPT-3 draws each training sequence from source i with probability weight_i (Table 2.2), and within a
source samples without replacement until an epoch boundary (Appendix B). Here sample g is a pure
function of (seed, g, manifest, weights, stages): no state, no RNG stream, so any rank can compute any
sample, and world size, micro batch and resume cannot change the order.

- Source choice is stratified: within each block of B samples, source i gets exactly its apportioned
  share (Hamilton's largest-remainder rule on the cumulative count, so counts over any prefix of whole
  blocks are within one sample of weight_i * n), at keyed pseudo-random positions.
- A source's k-th sample is window perm_e(k mod W) of epoch e = k // W, where W windows of n_ctx+1
  tokens tile the train split (adjacent windows share one token, so each token is a target once per
  epoch) and perm_e is a keyed Feistel permutation: O(1) memory even for a 400B-token source.
- Stages change the weights from a token boundary on. Each stage is stratified on its own, counting
  positions from its first sample, and a source's k in a stage starts where the stages before it left
  off (a closed form of their counts), so a source's order runs on across boundaries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made, so `scalegpt prepare` starts faster
    import torch

    from ..config.schema import Config

from ..errors import UserError
from .sampling import M64, Stratum, feistel, key, name_key
from .tokenizer import file_sha256, load_tokenizer, tokenizer_hash

MANIFEST = "manifest.json"
FORMAT = 1
"""Manifest layout version; prepare re-makes data written with another."""

_MAX_SAMPLES = 1 << 38  # wq * n must stay below 2^63 (the stratum's apportionment, sampling.py)


def read_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    """The manifest in data_dir, or None when there is none; UserError when it is unreadable."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); delete it to re-prepare every source") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "sources" not in manifest:
        raise UserError(f"{path} is not a scalegpt manifest of format {FORMAT}; delete it to re-prepare every source")
    return manifest


def check_tokenizer_file(data_dir: str | Path, manifest: dict[str, Any]) -> None:
    """The tokenizer.json beside the tokens must be the one that made them, or decoding is wrong."""
    path = Path(data_dir) / manifest["tokenizer_file"]
    if path.is_file() and file_sha256(path) == manifest.get("tokenizer_file_sha256"):
        return  # the very bytes prepare wrote
    if not path.is_file():
        raise UserError(f"{path} is missing, so the tokens in {data_dir} cannot be decoded; re-run scalegpt prepare")
    found = tokenizer_hash(load_tokenizer(path))
    if found != manifest["tokenizer_hash"]:
        raise UserError(
            f"{Path(data_dir) / MANIFEST} was made by a different tokenizer (sha256 "
            f"{manifest['tokenizer_hash'][:12]}) than {path} (sha256 {found[:12]}); restore the original "
            f"tokenizer.json, or delete {Path(data_dir) / MANIFEST} to re-prepare every source"
        )


@dataclass(frozen=True)
class Stage:
    """Mixture weights from a token boundary on: sample g is in the last stage whose start_tokens
    g x n_ctx has reached. A source the weights leave out is not drawn in that stage."""

    start_tokens: int
    weights: dict[str, float]


_ID_CHECK_TOKENS = 1 << 26
"""A token file up to this size is scanned whole at load (a fraction of a second); a larger one in 64
evenly spaced slices of 1M tokens, so that a start never reads hundreds of GB just to check."""


def _check_ids(tokens: np.ndarray, path: Path, vocab_size: int) -> None:
    """Ids at or above the vocabulary mean a damaged or foreign file of the right size; found at load,
    they are reported as such instead of failing in the embedding at step 1."""
    if len(tokens) <= _ID_CHECK_TOKENS:
        top = int(tokens.max(initial=0))
    else:
        starts = np.linspace(0, len(tokens) - (1 << 20), 64, dtype=np.int64)
        top = max(int(tokens[s : s + (1 << 20)].max()) for s in starts)
    if top >= vocab_size:
        raise UserError(
            f"token file {path} is corrupt: it holds id {top}, but the tokenizer has {vocab_size} tokens; "
            "re-run scalegpt prepare"
        )


class Mixture:
    """Global sample index -> (source, n_ctx+1 tokens), over the token files of one prepared data.dir.

    weights default to those recorded by `scalegpt prepare`; a run builds its mixture with for_config,
    from its own resolved config. stages change the weights at token boundaries: within a stage the
    sources are stratified as above, and each source's ordinals continue from the draws of the stages
    before, so its order runs on across a boundary. Pass tokenizer_hash to insist that the data were made
    by that tokenizer (e.g. the one saved in a run directory being resumed).
    """

    def __init__(
        self,
        data_dir: str | Path,
        n_ctx: int,
        seed: int,
        weights: dict[str, float] | None = None,
        *,
        stages: Sequence[Stage] = (),
        tokenizer_hash: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.manifest: dict[str, Any] = self._read(tokenizer_hash)
        self.tokenizer_hash: str = self.manifest["tokenizer_hash"]
        if n_ctx < 1:
            raise UserError(f"n_ctx must be positive, got {n_ctx}")
        entries = self.manifest["sources"]
        self.names: list[str] = [e["name"] for e in entries]
        self.n_ctx, self.seed = int(n_ctx), int(seed)
        self._entries = {e["name"]: e for e in entries}
        self.raw_weights: dict[str, float] = self._check_weights(
            {e["name"]: float(e["weight"]) for e in entries} if weights is None else dict(weights)
        )
        raw = np.array([self.raw_weights[n] for n in self.names], dtype=np.float64)
        self.weights: np.ndarray = raw / raw.sum()
        """The first stage's normalized weights: validation weighs its per-source losses with them."""
        self._tokens = self._open_tokens()
        self._train = np.array([e["train"]["tokens"] for e in entries], dtype=np.int64)
        self.windows = self._windows()
        """Windows of n_ctx+1 tokens per epoch of each source's train split."""
        seed_key = key(self.seed & M64, 0x5EED)
        self.stages: list[Stage] = [Stage(0, dict(self.raw_weights)), *self._check_stages(stages)]
        self.stage_weights: list[np.ndarray] = [self.weights, *(self._normalize(s) for s in self.stages[1:])]
        """Each stage's weights, normalized, in the order of names."""
        block_seed = key(seed_key, 0xB10C)  # the first stage keeps the key a mixture without stages has
        self._strata = [
            Stratum(self.names, w, block_seed if s == 0 else key(block_seed, s))
            for s, w in enumerate(self.stage_weights)
        ]
        self.block = self._strata[0].block
        self.stage_starts = np.array([-(-s.start_tokens // self.n_ctx) for s in self.stages], dtype=np.int64)
        """The global index of each stage's first sample: the first g with g x n_ctx >= start_tokens."""
        self._offsets = self._stage_offsets()
        self._source_keys = np.array([int(key(seed_key, name_key(n))[0]) for n in self.names], dtype=np.uint64)

    @classmethod
    def for_config(
        cls, cfg: Config, *, data_dir: str | Path | None = None, tokenizer_hash: str | None = None
    ) -> Mixture:
        """The mixture a run trains on: the run's own weights and stages (its resolved config, overrides
        included) over the data in data_dir (default cfg.data.dir). A config that names no sources
        samples with the weights recorded by `scalegpt prepare`."""
        weights = {s.name: float(s.weight) for s in cfg.data.sources} or None
        stages = [Stage(int(s.start_tokens), {k: float(v) for k, v in s.weights.items()}) for s in cfg.data.stages]
        where = cfg.data.dir if data_dir is None else data_dir
        return cls(where, cfg.model.n_ctx, cfg.run.seed, weights, stages=stages, tokenizer_hash=tokenizer_hash)

    def _read(self, tokenizer_hash: str | None) -> dict[str, Any]:
        """The manifest, checked: its tokenizer (and the expected one, if given) made every source."""
        manifest = read_manifest(self.data_dir)
        if manifest is None:
            raise UserError(f"no {MANIFEST} in {self.data_dir}; run `scalegpt prepare CONFIG` first")
        check_tokenizer_file(self.data_dir, manifest)
        found = manifest["tokenizer_hash"]
        if tokenizer_hash is not None and tokenizer_hash != found:
            raise UserError(
                f"the data in {self.data_dir} were made by a different tokenizer (sha256 "
                f"{found[:12]}) than expected (sha256 {tokenizer_hash[:12]}); prepare the data "
                f"with the run's tokenizer, or start a new run"
            )
        if not manifest["sources"]:
            raise UserError(f"{self.data_dir / MANIFEST} lists no sources; run scalegpt prepare")
        for e in manifest["sources"]:
            if e["tokenizer_hash"] != found:
                raise UserError(
                    f"source {e['name']!r} in {self.data_dir} was tokenized by another tokenizer than "
                    f"tokenizer.json (an interrupted prepare?); re-run scalegpt prepare"
                )
        return manifest

    def _windows(self) -> np.ndarray:
        windows = (self._train - 1) // self.n_ctx
        for i, name in enumerate(self.names):
            if windows[i] < 1:
                raise UserError(
                    f"source {name!r} has {self._train[i]} training tokens, fewer than one window of "
                    f"n_ctx+1={self.n_ctx + 1}; add data to it, lower data.val_fraction, or use a smaller "
                    f"model.n_ctx"
                )
        return windows

    def _open_tokens(self) -> list[np.ndarray]:
        dtype = np.dtype(self.manifest["dtype"])
        out = []
        for e in self.manifest["sources"]:
            path = self.data_dir / e["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != e["tokens"] * dtype.itemsize:
                raise UserError(f"token file {path} is missing, truncated or changed; re-run scalegpt prepare")
            out.append(np.memmap(path, dtype=dtype, mode="r", shape=(e["tokens"],)))
            _check_ids(out[-1], path, int(self.manifest["vocab_size"]))
        return out

    def _check_weights(self, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(self.names))
        missing = [n for n in self.names if n not in weights]
        if unknown or missing:
            raise UserError(
                f"mixture weights must name exactly the prepared sources {self.names} (unknown: {unknown}, "
                f"missing: {missing}); re-run scalegpt prepare after changing data.sources"
            )
        for name, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise UserError(f"weight of source {name!r} must be a positive number, got {w!r}")
        return {n: float(w) for n, w in weights.items()}

    def _check_stages(self, stages: Sequence[Stage]) -> list[Stage]:
        out, last = [], 0
        for s, stage in enumerate(stages, start=1):
            unknown = sorted(set(stage.weights) - set(self.names))
            if unknown:
                raise UserError(f"stage {s} weighs {unknown}, which are not among the prepared sources {self.names}")
            if stage.start_tokens <= last:
                raise UserError(f"stage {s} starts at {stage.start_tokens} tokens; stage starts must increase from 1")
            w = [stage.weights.get(n, 0.0) for n in self.names]
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
                raise UserError(f"stage {s} needs non-negative weights with at least one positive, got {stage.weights}")
            out.append(Stage(int(stage.start_tokens), {n: float(x) for n, x in zip(self.names, w, strict=True)}))
            last = stage.start_tokens
        return out

    def _normalize(self, stage: Stage) -> np.ndarray:
        raw = np.array([stage.weights[n] for n in self.names], dtype=np.float64)
        return raw / raw.sum()

    def _stage_offsets(self) -> np.ndarray:
        """Per stage, how many samples of each source the stages before it drew: a source's ordinals
        continue from there, so its epoch order never restarts at a boundary."""
        out = np.zeros((len(self._strata), len(self.names)), dtype=np.int64)
        for s in range(1, len(self._strata)):
            length = int(self.stage_starts[s] - self.stage_starts[s - 1])
            out[s] = out[s - 1] + self._strata[s - 1].counts(length)
        return out

    # -- index resolution --

    def resolve(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, start offset in that source's token file) of each global sample index."""
        g = np.asarray(indices, dtype=np.int64).reshape(-1)
        if g.size and (g.min() < 0 or g.max() >= _MAX_SAMPLES):
            raise ValueError(f"sample indices must be in [0, {_MAX_SAMPLES}), got {g.min()}..{g.max()}")
        stage = np.searchsorted(self.stage_starts, g, side="right") - 1
        src = np.empty(g.size, dtype=np.int64)
        ordinal = np.empty(g.size, dtype=np.int64)
        for s in np.unique(stage):
            sel = stage == s
            src[sel], local = self._strata[s].locate(g[sel] - self.stage_starts[s])
            ordinal[sel] = local + self._offsets[s, src[sel]]
        start = np.empty(g.size, dtype=np.int64)
        for i in np.unique(src):
            sel = src == i
            epoch, k = np.divmod(ordinal[sel], self.windows[i])
            window = feistel(k, int(self.windows[i]), key(self._source_keys[i], epoch))
            start[sel] = window.astype(np.int64) * self.n_ctx
        return src, start

    def source_counts(self, indices: Sequence[int] | np.ndarray) -> dict[str, int]:
        """How many of these global samples come from each source: what a step that trains on them draws."""
        src, _ = self.resolve(indices)
        counts = np.bincount(src, minlength=len(self.names))
        return {name: int(counts[i]) for i, name in enumerate(self.names)}

    def _gather(self, src: np.ndarray, start: np.ndarray) -> np.ndarray:
        out = np.empty((src.size, self.n_ctx + 1), dtype=np.int64)
        offsets = np.arange(self.n_ctx + 1)
        for i in np.unique(src):
            sel = np.flatnonzero(src == i)
            out[sel] = self._tokens[i][start[sel, None] + offsets]
        return out

    def step_batch(self, first: int, batch: int, rows: Sequence[int]) -> tuple[torch.Tensor, dict[str, int]]:
        """One optimizer step over global samples [first, first + batch): the tokens of the `rows` this rank
        trains on (as `batch` gives them) and the whole step's per-source counts, from one resolve."""
        import torch

        src, start = self.resolve(np.arange(first, first + batch))
        mine = np.asarray(rows, dtype=np.int64) - first
        counts = np.bincount(src, minlength=len(self.names))
        tokens = torch.from_numpy(self._gather(src[mine], start[mine]))
        return tokens, {name: int(counts[i]) for i, name in enumerate(self.names)}

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), n_ctx+1) int64 tokens; inputs are [:, :-1], targets [:, 1:]."""
        import torch

        src, start = self.resolve(indices)
        return torch.from_numpy(self._gather(src, start))

    def stage_counts(self, num_samples: int) -> np.ndarray:
        """Samples of each source drawn in each stage among the first num_samples: (stages, sources)."""
        if not 0 <= num_samples < _MAX_SAMPLES:
            raise ValueError(f"num_samples must be in [0, {_MAX_SAMPLES}), got {num_samples}")
        ends = np.append(self.stage_starts[1:], _MAX_SAMPLES)
        out = np.zeros((len(self._strata), len(self.names)), dtype=np.int64)
        for s, stratum in enumerate(self._strata):
            n = min(int(num_samples), int(ends[s])) - int(self.stage_starts[s])
            if n > 0:
                out[s] = stratum.counts(n)
        return out

    def consumed(self, num_samples: int) -> dict[str, dict[str, float]]:
        """Per source: samples, tokens (targets, n_ctx per sample) and epochs elapsed after the first
        num_samples global samples -- GPT-3 Table 2.2's last column."""
        counts = self.stage_counts(num_samples).sum(axis=0).astype(np.float64)
        return {
            name: {
                "samples": float(counts[i]),
                "tokens": float(counts[i] * self.n_ctx),
                "epochs": float(counts[i] / self.windows[i]),
            }
            for i, name in enumerate(self.names)
        }

    # -- validation --

    def _entry(self, source: str) -> dict[str, Any]:
        if source not in self._entries:
            raise UserError(f"no source {source!r} in {self.data_dir} (sources: {', '.join(self.names)})")
        return self._entries[source]

    def val_windows(self, source: str) -> int:
        """Non-overlapping n_ctx+1 windows in the source's validation split (0: no validation)."""
        e = self._entry(source)
        val = e["tokens"] - e["train"]["tokens"]
        return max(0, (val - 1) // self.n_ctx)

    def validation_weights(self) -> ValidationWeights:
        """The weights a mixture validation figure weighs its sources with: the first stage's, renormalized
        over the sources whose validation split holds a window. A source without one has no loss; counting
        it as 0 would report a figure lower than any source's (GPT-3 Table 2.2 weighs real losses only)."""
        present = [i for i, name in enumerate(self.names) if self.val_windows(name) > 0]
        raw = np.array([self.raw_weights[self.names[i]] for i in present], dtype=np.float64)
        if len(present) == len(self.names):
            # nothing left out: exactly the training weights, so a figure is bit for bit what it was
            weights = {n: float(w) for n, w in zip(self.names, self.weights, strict=True)}
        else:
            weights = {self.names[i]: float(w) for i, w in zip(present, raw / max(raw.sum(), 1e-300), strict=True)}
        left_out = [n for n in self.names if n not in weights]
        return ValidationWeights(weights, left_out, self.n_ctx)

    def val_batches(self, source: str, batch_size: int, max_batches: int) -> Iterator[torch.Tensor]:
        """Fixed (B, n_ctx+1) windows spread evenly over the validation split: the same every call, so
        validation losses are comparable across steps and runs. Empty when the split has no window."""
        e = self._entry(source)
        if batch_size < 1 or max_batches < 1:
            raise ValueError("batch_size and max_batches must be positive")
        total = self.val_windows(source)
        m = min(total, batch_size * max_batches)
        i = self.names.index(source)
        starts = e["train"]["tokens"] + (np.arange(m, dtype=np.int64) * total // max(m, 1)) * self.n_ctx
        src = np.full(m, i, dtype=np.int64)

        def batches() -> Iterator[torch.Tensor]:
            import torch

            for a in range(0, m, batch_size):
                yield torch.from_numpy(self._gather(src[a : a + batch_size], starts[a : a + batch_size]))

        return batches()

    def val_bytes_per_token(self, source: str) -> float:
        """UTF-8 bytes per token of the validation split (of the whole source when it has none), to turn
        a loss in nats per token into bits per byte: bpb = loss / ln 2 / bytes_per_token."""
        e = self._entry(source)
        part = e["val"] if e["val"]["tokens"] else {"bytes": e["bytes"], "tokens": e["tokens"]}
        return part["bytes"] / part["tokens"]


@dataclass(frozen=True)
class ValidationWeights:
    """Per source with a validation window, its weight in a mixture figure (summing to 1); and the sources
    left out of every mixture figure because their validation split is shorter than n_ctx+1 tokens."""

    weights: dict[str, float]
    left_out: list[str]
    n_ctx: int

    def weigh(self, per_source: dict[str, float]) -> float:
        """The mixture figure of per-source figures (every source in `weights` must have one)."""
        return sum(w * per_source[name] for name, w in self.weights.items())

    def warning(self) -> str | None:
        """The one line a run prints at start when a source is left out, saying how to include it."""
        if not self.left_out:
            return None
        return (
            f"warning: {', '.join(repr(n) for n in self.left_out)} left out of the mixture's val_loss and val_bpb "
            f"(no validation window of n_ctx+1={self.n_ctx + 1} tokens), the other sources' weights renormalized; "
            f"raise data.val_fraction or add data to include it"
        )


REPEAT_LIMIT = 4.0
"""Epochs of one source past which repeating it stops helping (Muennighoff et al. 2023, "Scaling
Data-Constrained Language Models": up to about 4 epochs repeated tokens are worth nearly as much as new
ones, and their value decays quickly after)."""


def repeat_warnings(mixture: Mixture, num_samples: int) -> list[str]:
    """A line for each source a run of num_samples samples would repeat more than REPEAT_LIMIT times."""
    return [
        f"warning: source {name!r} would be seen {use['epochs']:.3g} times, more than {REPEAT_LIMIT:g}: past "
        f"about {REPEAT_LIMIT:g} epochs repeated data stops helping (Muennighoff et al. 2023); add data to it "
        f"or lower its weight"
        for name, use in mixture.consumed(num_samples).items()
        if use["epochs"] > REPEAT_LIMIT
    ]


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return [line(cols), *(line(r) for r in rows)]


def describe(mixture: Mixture, num_samples: int | None = None) -> str:
    """The mixture as GPT-3 Table 2.2: tokens, weight (as given and normalized) and, for a planned run of
    num_samples samples, tokens drawn and epochs elapsed per source, per stage when there are stages."""
    total = sum(mixture.raw_weights.values())
    head = f"mixture of {len(mixture.names)} sources in {mixture.data_dir}"
    head += f"; weights sum to {total:.4g}, normalized to 1" if abs(total - 1.0) > 1e-9 else "; weights sum to 1"
    staged = len(mixture.stages) > 1
    cols = ["source", "train tokens", "val tokens", "weight", "normalized"]
    cols += [f"stage {s}" for s in range(1, len(mixture.stages))]
    by_stage = mixture.stage_counts(num_samples) if num_samples is not None else None
    if by_stage is not None:
        cols += [f"epochs s{s}" for s in range(len(mixture.stages))] if staged else []
        cols += ["planned tokens", "epochs"]
    rows = []
    for i, name in enumerate(mixture.names):
        e = mixture.manifest["sources"][i]
        row = [
            name,
            f"{e['train']['tokens']:,}",
            f"{e['val']['tokens']:,}",
            f"{mixture.raw_weights[name]:g}",
            f"{100 * mixture.weights[i]:.2f}%",
        ]
        row += [f"{100 * w[i]:.2f}%" for w in mixture.stage_weights[1:]]
        if by_stage is not None:
            row += [f"{by_stage[s, i] / mixture.windows[i]:.3g}" for s in range(len(mixture.stages))] if staged else []
            used = int(by_stage[:, i].sum())
            row += [f"{used * mixture.n_ctx:,}", f"{used / mixture.windows[i]:.3g}"]
        rows.append(row)
    out = [head, *_table(cols, rows)]
    for s, stage in enumerate(mixture.stages[1:], start=1):
        out.append(f"stage {s}: from {stage.start_tokens:,} tokens (sample {int(mixture.stage_starts[s]):,})")
    if num_samples is not None:
        out.append(
            f"planned run: {num_samples:,} samples x {mixture.n_ctx} tokens = {num_samples * mixture.n_ctx:,} tokens"
        )
        out += repeat_warnings(mixture, num_samples)
    return "\n".join(out)
