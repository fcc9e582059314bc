"""FLOPs of a training step, for tokens/s → MFU accounting. Each backbone supplies the analytic FLOPs of
its own forward (``forward_flops``, :class:`~.backbone_protocol.Backbone`); this adds up a step."""

from __future__ import annotations

from .backbone_protocol import Backbone


def train_step_flops(model: Backbone, n_data: int, n_context: int = 0, teacher_layer: int | None = None) -> float:
    """Per sample: student forward + backward (3× forward) plus the teacher's forward to its layer."""
    student = 3 * model.forward_flops(n_data, n_context)
    teacher = model.forward_flops(n_data, n_context, upto=teacher_layer) if teacher_layer else 0.0
    return student + teacher
