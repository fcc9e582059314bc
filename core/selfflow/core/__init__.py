"""selfflow.core: the modality-agnostic spine of the framework.

Backbone (MMDiT), rectified-flow paths, Dual-Timestep Scheduling, the Self-Flow objective, EMA,
samplers, trainer, checkpoints and CLI. Modalities plug in through :mod:`selfflow.core.registry`.
"""

__version__ = "0.1.0"
