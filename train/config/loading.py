"""Loading a run config: files, presets, command-line overrides and the init_from shape merge.

A run YAML may name presets under `defaults:` (``model: gpt3-small``, ``data: builtin``); they are
looked up as configs/<section>/<name>.yaml next to the run file (or above it, or among the presets
shipped in the package) and merged first, then the run file, then command-line ``key=value``
overrides. An unknown key, a wrong type or an inconsistent value fails at load time with
``<key> in <file>: <what is wrong>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ...model.config import ModelConfig
from ..errors import UserError
from ..rundir import CONFIG
from .schema import Config, read_config_file
from .validation import problems

PRESET_SECTIONS = ("model", "data")


PACKAGED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The presets shipped inside the package (package data of `scalegpt`; in a checkout, the repository's
configs/), so that an installed `scalegpt` finds them from any directory."""


def find_config(spec: str | Path) -> Path:
    """A run config: a YAML file, else a packaged preset by name (``smoke``, ``gpt3-small``) or by its
    path in the repository (``configs/smoke.yaml``). A file of that path in the current directory wins."""
    path = Path(spec)
    if path.is_file() or (path.is_absolute() and not path.is_dir()):
        return path
    candidates = [PACKAGED_CONFIGS / path, PACKAGED_CONFIGS / f"{spec}.yaml"]
    if path.parts and path.parts[0] == "configs":
        candidates.append(PACKAGED_CONFIGS.parent / path)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and path.is_dir():  # a folder named like a preset (./continue-gpt2) does not hide it
        raise UserError(f"config {spec} is a directory; pass a YAML file, such as configs/smoke.yaml")
    if found is None:
        names = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
        raise UserError(f"config file {spec} does not exist; pass a YAML file or a packaged preset: {names}")
    return found


def _find_preset(section: str, name: str, near: Path) -> Path:
    """configs/<section>/<name>.yaml beside the run file or in a folder above it, else the packaged one."""
    for base in (near, *near.parents):
        candidate = base / section / f"{name}.yaml"
        if candidate.is_file():
            return candidate
        candidate = base / "configs" / section / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    packaged = PACKAGED_CONFIGS / section / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in (PACKAGED_CONFIGS / section).glob("*.yaml")))
    raise UserError(
        f"defaults.{section} in {near}: no preset {section}/{name}.yaml beside the run file, above it or "
        f"packaged; packaged {section} presets: {known}"
    )


def _read_yaml(path: Path) -> DictConfig:
    if path.is_dir():
        raise UserError(f"config {path} is a directory; pass a YAML file, such as configs/smoke.yaml")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a YAML file such as configs/smoke.yaml")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path} must hold a mapping of sections, not a {type(loaded).__name__}")
    return loaded


def _layers(path: Path) -> list[tuple[str, DictConfig]]:
    """(origin, partial config) pairs in merge order: presets, then the run file itself."""
    run = _read_yaml(path)
    layers: list[tuple[str, DictConfig]] = []
    defaults = run.pop("defaults", None) or {}
    if isinstance(defaults, ListConfig):  # also accept hydra-style [{model: x}, {data: y}]
        merged: dict[str, Any] = {}
        for item in defaults:
            merged.update(OmegaConf.to_container(item))
        defaults = merged
    for section, name in dict(defaults).items():
        if section not in PRESET_SECTIONS:
            raise UserError(f"defaults.{section} in {path}: presets exist only for {', '.join(PRESET_SECTIONS)}")
        preset_path = _find_preset(section, str(name), path.parent)
        layers.append((str(preset_path), OmegaConf.create({section: _read_yaml(preset_path)})))
    layers.append((str(path), run))
    return layers


def _origin(key: str, layers: list[tuple[str, DictConfig]]) -> tuple[int, str]:
    """(index, name) of the last layer that sets `key`; the run file when none does."""
    for index in range(len(layers) - 1, -1, -1):
        origin, layer = layers[index]
        try:
            if OmegaConf.select(layer, key, throw_on_missing=False) is not None:
                return index, origin
        except OmegaConfBaseException:
            continue
    return len(layers) - 1, layers[-1][0]


def _blame(key: str, message: str, layers: list[tuple[str, DictConfig]], overridden: list[str]) -> str:
    """`key in origin: message`, against the last place that set the key or a sibling the message names
    (`d_model ... n_head=5`): a value just given on the command line is the likely mistake, not the preset."""
    section = key.rpartition(".")[0]
    siblings = [f"{section}.{name}" for name in re.findall(r"\b([a-z_][a-z0-9_]*)=", message)]
    best, best_index, best_origin = key, -1, layers[-1][0]
    for candidate in [key, *siblings]:
        if any(candidate == k or candidate.startswith(f"{k}.") for k in overridden):  # or a list set whole
            index, origin = len(layers), "the command line"
        else:
            index, origin = _origin(candidate, layers)
        if index > best_index:
            best, best_index, best_origin = candidate, index, origin
    if best != key:
        return f"{best} in {best_origin}: {key} {message}"
    return f"{key} in {best_origin}: {message}"


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, compose, override and validate a run config. Raises UserError naming key and file.

    Overrides are applied one by one with OmegaConf.update, so list items can be addressed by index
    (``data.sources.0.weight=2``), which a merged dot-list cannot do."""
    path = find_config(path)
    layers = _layers(path)
    merged = OmegaConf.structured(Config)
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", "") or "?"
            raise UserError(f"{key} in {origin}: {str(exc).splitlines()[0]}") from exc
    overridden: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (for example model.n_layer=4)")
        try:
            # an interpolation (data.tokenizer='${model.init_from}') is resolved against the whole config, later
            value = text if "${" in text else OmegaConf.from_dotlist([f"value={text}"])["value"]
            _check_override_key(merged, key)
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise UserError(f"{key} in the command line: {str(exc).splitlines()[0]}") from exc
        overridden.append(key)
    _take_shape_from_source(merged, layers, overridden)
    model = ModelConfig.__new__(ModelConfig)  # unvalidated, so that its problems can name their key
    model.__dict__.update(OmegaConf.to_container(merged.model))
    found = [(f"model.{k}", m) for k, m in model.problems()]
    if not found:
        try:
            cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
        except (OmegaConfBaseException, ValueError) as exc:
            raise UserError(f"{path}: {str(exc).splitlines()[0]}") from exc
        found = problems(cfg)
    if found:
        raise UserError(_blame(*found[0], layers, overridden))
    return cfg


SOURCE_FREE = ("init_from", "dropout", "attn_impl")
"""model.* fields that init_from leaves to the run: they change how the weights are used, not which exist."""


def _source_shape(source: str, merged: DictConfig) -> ModelConfig:
    """model.init_from's shape. A source that has gone since the run started is not needed to resume it:
    the run directory's config.yaml, made from the same source, has the shape."""
    from ..weights import resolve, source_model_config  # brings torch: launch and plan start fast without init_from

    try:
        return source_model_config(resolve(source))
    except UserError as exc:
        saved = Path(str(merged.run.dir)) / CONFIG
        if saved.is_file():
            old = read_config_file(saved).model
            if old.init_from == source:
                return old
        raise UserError(f"model.init_from: {exc}") from exc


def _take_shape_from_source(merged: DictConfig, layers: list[tuple[str, DictConfig]], overridden: list[str]) -> None:
    """With model.init_from, every shape field comes from the source. One the user set (in the run file or
    on the command line) must agree with it, except a shorter n_ctx: the position embeddings are cut to it.
    A preset named under defaults: yields, since the weights decide the shape."""
    source = merged.model.init_from
    if not source:
        return
    shape = _source_shape(str(source), merged)
    run_origin, run_layer = layers[-1]
    for name, theirs in vars(shape).items():
        if name in SOURCE_FREE:
            continue
        key = f"model.{name}"
        if key in overridden:
            where = "the command line"
        elif OmegaConf.select(run_layer, key, default=None) is not None:
            where = run_origin
        else:
            merged.model[name] = theirs
            continue
        mine = merged.model[name]
        if mine == theirs or (name == "n_ctx" and 0 < mine < theirs):
            continue
        hint = (
            f"the source's position embeddings cover {theirs} tokens, so n_ctx may be at most that"
            if name == "n_ctx"
            else f"remove {key}: the shape comes from the weights"
        )
        if name in ("parametrization", "mup_base_d_model", "mup_base_d_head"):  # μP's keys say what weights mean
            hint = (
                "weights trained under one parametrization compute something else under another; remove "
                f"{key} to take the source's, or remove model.init_from to train from scratch"
            )
        raise UserError(
            f"{key}={mine} in {where} conflicts with model.init_from {source}, which has {name}={theirs}; {hint}"
        )


def _check_override_key(cfg: DictConfig, key: str) -> None:
    """Every part of `key` must exist, except below a dict-typed field (the deepspeed pass-through),
    which takes new keys; list items are addressed by an index that must be in range."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig):
            if not (part.isdigit() and int(part) < len(node)):
                raise UserError(f"{key} in the command line: {'.'.join(parts[:i])} has {len(node)} items")
            node = node[int(part)]
        elif isinstance(node, DictConfig):
            if part not in node:
                if node._metadata.object_type in (None, dict):  # an open dict: new keys are fine
                    return
                section = node._metadata.object_type.__name__
                raise UserError(f"{key} in the command line: no such key ({part!r} is not in {section})")
            node = node._get_node(part)
        else:
            raise UserError(f"{key} in the command line: {'.'.join(parts[:i])} is a value, not a section")
