"""Config fuzzing: random mutations of every shipped config → a valid run or a clear validation error.

Each mutation is written to a YAML file and goes through what ``selfflow train`` does before its first step:
:func:`load_config`, then the run-building path (modalities, objectives, backbone config, parallel strategy)
and the backbone itself, built on the ``meta`` device so even the 625M paper configs cost nothing.

Outcomes: *valid* (the run would start), *rejected* (the project's :class:`ConfigError`, which names the
file, or a ``ValueError`` / ``FileNotFoundError`` / ``KeyError`` whose message names the mutated key) or
*crash* (any other exception, or an error that does not name the key). A config that needs local weights
(a VAE directory) fails the same way before and after an unrelated mutation; that is counted as valid.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import yaml

from .common import ROOT, Outcome, Timer

KINDS = ("delete", "wrong_type", "out_of_range", "unknown_key", "string_in_number", "bad_enum", "path_traversal")
CLEAR = (ValueError, FileNotFoundError, KeyError)  # ConfigError is a ValueError
TRAVERSALS = ("../../outside", "/tmp/selfflow-abs", "a/../../b", "..", "../" * 12 + "etc/passwd")
PATH_KEYS = ("name", "shards", "vae_path", "vae_dir", "init_from", "model_dir", "cache_dir", "output_dir")


def shipped_configs() -> list[Path]:
    return sorted((ROOT / "configs").rglob("*.yaml"))


def leaves(node: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every (path, value) of a nested mapping/list, leaves and sections alike."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append(((*prefix, k), v))
        out.extend(leaves(v, (*prefix, k)))
    return out


def _set(raw: dict, path: tuple, value: Any) -> None:
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def mutate(raw: dict, kind: str, rng: random.Random) -> tuple[dict, str, Any]:
    """One mutation of ``kind``; returns the mutated copy, the dotted key and the value written."""
    raw = copy.deepcopy(raw)
    paths = leaves(raw)
    scalars = [(p, v) for p, v in paths if not isinstance(v, dict | list)]
    numbers = [(p, v) for p, v in scalars if isinstance(v, int | float) and not isinstance(v, bool)] or scalars
    strings = [(p, v) for p, v in scalars if isinstance(v, str)] or scalars
    if kind == "delete":
        path, _ = rng.choice(paths)
        node = raw
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        return raw, ".".join(map(str, path)), None
    if kind == "unknown_key":
        sections = [()] + [p for p, v in paths if isinstance(v, dict)]
        path = (*rng.choice(sections), f"bogus_{rng.randrange(1000)}")
        value: Any = rng.choice([1, "x", [1]])
    elif kind == "wrong_type":
        path, old = rng.choice(paths)
        value = rng.choice([v for v in ([1, 2], {"x": 1}, True, "text") if type(v) is not type(old)])
    elif kind == "out_of_range":
        path, _ = rng.choice(numbers)
        value = rng.choice([-1, 0, -1e-9, 10**12, 1e300, float("nan"), float("inf"), -(10**9)])
    elif kind == "string_in_number":
        path, _ = rng.choice(numbers)
        value = rng.choice(["abc", "1e", "", "NaN-ish"])
    elif kind == "bad_enum":
        path, _ = rng.choice(strings)
        value = "no_such_choice"
    else:  # path traversal: the run name, or a path-like option
        keys = [(p, v) for p, v in scalars if str(p[-1]) in PATH_KEYS] or [(("name",), None)]
        path, _ = rng.choice(keys)
        value = rng.choice(TRAVERSALS)
    _set(raw, path, value)
    return raw, ".".join(map(str, path)), value


def check_run(path: Path) -> None:
    """What ``selfflow train`` does before training (no data read, backbone on the meta device)."""
    from selfflow.core import parallel
    from selfflow.core.config import ConfigError, load_config
    from selfflow.core.distributed import DistInfo
    from selfflow.core.run_setup import build_run, pick_device

    cfg = load_config(path)
    try:
        pick_device(cfg.train.device if cfg.train.device != "cuda" else "auto")
        build_run(cfg, device="meta")
        try:
            parallel.resolve_strategy(cfg.train.parallel, DistInfo())
        except ValueError as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:  # as the CLI reports it: with the file
        raise ConfigError(f"invalid config {path}: {e}") from None


def _try(path: Path) -> BaseException | None:
    try:
        check_run(path)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return e
    return None


def _names_key(message: str, key: str) -> bool:
    parts = key.split(".")
    named = [key, *(".".join(parts[i:]) for i in range(len(parts))), parts[-1]]
    named += [p for p in parts if not p.isdigit()][-1:]
    return any(k and k in message for k in named)


def run(n_mutations: int = 252, seed: int = 0, workdir: Path | None = None) -> list[Outcome]:
    """``n_mutations`` mutations spread evenly over the shipped configs and the mutation kinds."""
    configs = shipped_configs()
    outcome = {k: Outcome("config", f"config mutation: {k.replace('_', ' ')}",
                          "valid run or an error naming key, value and file") for k in KINDS}
    rng = random.Random(seed)
    work = Path(workdir or ROOT / "runs" / "reliability" / "config_fuzz")
    work.mkdir(parents=True, exist_ok=True)
    old_cwd = Path.cwd()
    os.chdir(work)  # relative output paths (runs/, generated fake data) land here
    try:
        baseline = {c: _try(c) for c in configs}
        valid = dict.fromkeys(KINDS, 0)
        for i in range(n_mutations):
            src = configs[i % len(configs)]
            kind = KINDS[(i // len(configs)) % len(KINDS)]
            raw = yaml.safe_load(src.read_text()) or {}
            mutated, key, value = mutate(raw, kind, rng)
            path = work / f"m{i:04d}-{src.stem}.yaml"
            path.write_text(yaml.safe_dump(mutated, sort_keys=False))
            out = outcome[kind]
            with Timer(out):
                err = _try(path)
            base = baseline[src]
            if err is None or (base is not None and str(err).replace(str(path), "") == str(base).replace(str(src), "")):
                out.record(True)
                valid[kind] += 1
                continue
            msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            if type(err).__name__ == "ConfigError":  # the project's validation error: must name the file
                clear = str(path) in msg
            else:
                clear = isinstance(err, CLEAR) and _names_key(msg, key)
            out.record(clear, crash=not clear,
                       why=f"{src.relative_to(ROOT)} {key}={value!r}: {type(err).__name__}: {msg[:300]}")
    finally:
        os.chdir(old_cwd)
    for kind, out in outcome.items():
        out.note = f"{valid[kind]} still valid, {out.trials - valid[kind]} rejected"
    return list(outcome.values())
