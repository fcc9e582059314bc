"""argparse value types that reject a bad command-line value at parse time, with a message naming the value
(argparse adds the option): ``argument --steps: must be an integer ≥ 1, got '0'``; and the help formatter of
commands with examples."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (counts, steps, batch sizes)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (seeds: numpy's generators refuse negative ones; offsets)."""
    return _int_at_least(text, 0)


def fraction(text: str) -> float:
    """A number in [0, 1) (a held-out fraction)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A finite float (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (memory sizes, rates)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def output_file(text: str) -> Path:
    """A file that a command writes when its work is done, checked before the work starts: not an existing
    folder, and under a folder this user may write in (missing folders are made when it is written)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no permission to write in {str(parent)!r}")
    return path


def add_model_argument(parser: argparse.ArgumentParser, *, required: bool = False, what: str = "") -> None:
    """``--run PATH``: the model a command reads, as :func:`~selfflow.core.pretrained.load_model` takes it (a run
    directory, a pretrained directory or ``ema.safetensors``); ``what`` narrows it (``"an rt1 training: "``). Also
    spelled ``--run-dir``, which torchrun's own parser leaves alone (it takes ``--run`` for its ``--run-path``).
    With it ``--set KEY=VALUE`` (``args.locations``): where a folder the model reads lies on this machine."""
    parser.add_argument("--run", "--run-dir", dest="run", type=Path, required=required,
                        help=f"{what}run directory (config.yaml), pretrained directory (config.json) or "
                             "ema.safetensors; --run-dir under torchrun")
    parser.add_argument("--set", dest="locations", action="append", default=[], metavar="KEY=VALUE",
                        help="where something the model reads lies on this machine, when it differs from its "
                             "config (repeatable): e.g. data.options.vae_path=/models/sd-vae, "
                             "data.options.text.model_dir=…; other keys are refused")


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist on this machine."""
    if text in ("auto", "cpu"):
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    import torch

    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but no CUDA device is available (use cpu or auto)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has {torch.cuda.device_count()} "
                                         "CUDA device(s)")
    return text


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` a :func:`device_name` value means (``auto``: CUDA when available)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ExamplesFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that an ``examples:`` epilog keeps its lines as written (the description
    is still wrapped to the terminal), and an option's help ends with its default where it has one that the
    help does not already state (``--batch-size N  samples per forward (default: 64)``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help, action.default
        # a flag's "off" value, an unset option or an empty list is no default worth printing
        unset = default is None or default is argparse.SUPPRESS or default is False or default == []
        if (not text or not action.option_strings or unset or "default" in text
                or isinstance(action, argparse._StoreFalseAction)):
            return text
        return text + " (default: %(default)s)"


class PreformattedFormatter(ExamplesFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`ExamplesFormatter` for a description laid out by hand (paragraphs, lists): kept as written."""
