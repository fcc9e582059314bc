"""selfflow.core: the modality-agnostic spine of the framework.

Backbone (MMDiT), rectified-flow paths, Dual-Timestep Scheduling, the Self-Flow objective, EMA,
samplers, trainer, checkpoints and CLI. Modalities plug in through :mod:`selfflow.core.registry`.
"""

__version__ = "0.1.0"

__all__ = ["Sampler", "load"]


def __getattr__(name: str):
    # `from selfflow.core import load` without importing torch and the model stack for every `selfflow.core.*`
    # import (the CLI sets HF_HUB_OFFLINE before anything imports Hugging Face libraries)
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'selfflow.core' has no attribute {name!r}")
