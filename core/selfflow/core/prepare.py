"""``selfflow prepare <target>``: dataset preparation commands contributed by modality packages.

Packages register through the ``selfflow.commands`` entry point group as usual; their ``register(subparsers)``
calls :func:`prepare_subparsers` to add a target (``imagenet``, later ``video`` / ``audio`` …) under one shared
``prepare`` command, so no package has to know about the others.
"""

from __future__ import annotations

import argparse

_ATTR = "_selfflow_prepare_targets"


def prepare_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-command group of ``selfflow prepare`` (created on first use)."""
    targets = getattr(subparsers, _ATTR, None)
    if targets is None:
        prep = subparsers.add_parser(
            "prepare", help="prepare a dataset (encode to latents, write shards)",
            description="Dataset preparation; each installed modality package adds its targets.")
        targets = prep.add_subparsers(dest="prepare_target", metavar="TARGET")
        prep.set_defaults(func=lambda args: (prep.print_help(), 1)[1])
        setattr(subparsers, _ATTR, targets)
    return targets
