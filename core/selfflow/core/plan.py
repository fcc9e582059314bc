"""Capacity planning without a GPU: ``selfflow plan --config C [--gpus N --gpu-mem GB]``.

Method. The run's backbone is built on the ``meta`` device (no memory, no compute) and one student forward
runs there at micro-batch 1 under ``saved_tensors_hooks``: the bytes autograd keeps for backward are summed
per block and outside the blocks (parameters excluded, shared storages counted once). Attention is counted
as the flash / memory-efficient SDPA kernels (CUDA, and PyTorch's CPU flash kernel) keep it: q, k, v, the output
and ``O(L)`` statistics, no ``(L, L)`` matrices (:class:`FlashAttentionSaves`). Activation checkpointing keeps each block's input plus one block's activations
while it is recomputed; backward holds about two more blocks' worth of gradients. The step's transient memory (what the CPU bench measures as peak − resident before
the step) is the larger of the activations and the gradients (backward frees the one as it fills the other)
plus the teacher's no-grad forward (one block's largest intermediate and the captured features).

Persistent state per parameter: fp32 weights, gradients, two AdamW moments and the fp32 EMA (20 bytes);
DDP adds its gradient buckets (4 bytes); FSDP2 shards all of it over the GPUs and all-gathers two blocks'
parameters at a time. Under bf16 the profiling forward runs with autocast's casts emulated (``torch.autocast``
does nothing to meta tensors, see :class:`MetaAutocast`), so the saved bytes are those of a bf16 step: matrix
products and attention save bf16 copies of their inputs, the fp32 residual stream and what it feeds stay fp32.
Autocast's bf16 copy of every weight (2 bytes per parameter, made once per step and kept by backward) is
counted apart, in the step and in what the largest batch must leave free. Accuracy against ``benchmarks/memory.py``'s peak-RSS method on the CPU:
see ``core/tests/test_plan.py`` (within 15 % of the measured step transient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .flops import train_step_flops
from .modulation import TokenTimesteps
from .run_setup import build_run
from .tokens import Conditioning

GIB = 2**30
STATE_BYTES = {"ddp": 20 + 4, "fsdp2": 20}  # per parameter: weights, grads, AdamW m and v, EMA (+ DDP buckets)


@dataclass
class ActivationProfile:
    """Bytes autograd saves for backward for one sample: outside the blocks, per block, and each block's
    input (what activation checkpointing keeps)."""

    outside: int
    blocks: list[int]
    block_inputs: list[int]
    largest_intermediate: int  # the biggest tensor one block produces (the teacher's no-grad transient)

    def per_sample(self, checkpointing: bool) -> int:
        # Backward of a block holds gradients of about two blocks' saved activations (its own, and those
        # flowing into it), measured: one block read 0.85-0.94x the CPU step (fp32), two 0.90-1.13x (docs/BENCHMARKS.md).
        if not checkpointing:
            return self.outside + sum(self.blocks) + 2 * max(self.blocks)
        return self.outside + sum(self.block_inputs) + 3 * max(self.blocks)


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast's casts on the meta device, where ``torch.autocast`` leaves tensors alone: the ops autocast
    runs in lower precision (matrix products, convolutions, attention; its CUDA and CPU lists agree on those)
    get bf16 copies of their floating-point inputs; every other op runs on the dtypes it is given, as under
    autocast. The storages of the weights' copies are collected in ``weight_copies`` (autocast caches one copy
    per weight per step; the plan counts those apart)."""

    LOWER_PRECISION = frozenset({F.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
                                 torch.baddbmm, torch.addmm, F.scaled_dot_product_attention, F.conv1d, F.conv2d,
                                 F.conv3d})

    def __init__(self, params: set[int]):
        super().__init__()
        self.params, self.weight_copies = params, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.LOWER_PRECISION:
            return func(*args, **kwargs)

        def cast(value):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()) or value.dtype == torch.bfloat16:
                return value
            copy = value.to(torch.bfloat16)
            if value.untyped_storage()._cdata in self.params:
                self.weight_copies.add(copy.untyped_storage()._cdata)
            return copy

        return func(*tree_map(cast, args), **tree_map(cast, kwargs))


class FlashAttentionSaves(TorchFunctionMode):
    """Attention as the GPU's flash / memory-efficient kernels keep it for backward: ``q``, ``k``, ``v``, the
    output and a ``(B, H, L)`` fp32 log-sum-exp, handed to ``save``. On the meta device
    ``scaled_dot_product_attention`` runs PyTorch's math decomposition, which saves ``(L, L)`` score matrices
    no such kernel keeps; here it runs without recording them."""

    def __init__(self, save: Callable[[torch.Tensor], object]):
        super().__init__()
        self.save = save

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        with torch.no_grad():
            out = func(*args, **kwargs)
        for saved in (q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)):
            self.save(saved)
        return out.requires_grad_(q.requires_grad or k.requires_grad or v.requires_grad)


def activation_profile(model: nn.Module, x: torch.Tensor, ids: torch.Tensor, t: TokenTimesteps, cond,
                       student_layer: int | None, bf16: bool = False) -> ActivationProfile:
    """Run ``model`` (on the meta device) once and sort the bytes saved for backward by block (attention as
    :class:`FlashAttentionSaves` keeps it; under :class:`MetaAutocast` when ``bf16``)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    autocast = MetaAutocast(params) if bf16 else None
    weight_copies = autocast.weight_copies if autocast else set()  # filled as the forward casts the weights
    seen: set[int] = set()
    kept: list[torch.Tensor] = []  # held so that no storage address is reused within the forward
    current = [-1]  # index of the running block, -1 outside
    sizes = [0] * (model.depth + 1)
    inputs = [0] * model.depth
    largest = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        if key in params or key in seen or key in weight_copies:
            return tensor
        seen.add(key)
        kept.append(tensor)
        sizes[current[0]] += tensor.untyped_storage().nbytes()
        return tensor

    def nbytes(value) -> int:
        values = value if isinstance(value, tuple) else (value,)
        return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))

    def enter(i: int):
        def hook(_module, args):
            current[0] = i
            inputs[i] = nbytes(tuple(args))
        return hook

    def leave(_module, _args, out):
        current[0] = -1

    blocks = list(model.blocks())
    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave) for b in blocks]
    for b in blocks:  # the widest intermediate of a block (the MLP's hidden layer)
        handles += [m.register_forward_hook(lambda _m, _a, out: largest.__setitem__(0, max(largest[0], nbytes(out))))
                    for m in b.modules() if isinstance(m, nn.Linear)]
    try:
        # Entered last, MetaAutocast sees each call first: attention is recorded with its bf16 inputs.
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), FlashAttentionSaves(pack),
              autocast or contextlib.nullcontext()):
            capture = (student_layer,) if student_layer else ()
            model(x, ids, t, cond, capture=capture, project=bool(capture) and model.projector is not None)
    finally:
        for h in handles:
            h.remove()
    return ActivationProfile(sizes[-1], sizes[:-1], inputs, largest[0])


@dataclass
class Plan:
    name: str
    params: int
    tokens: int
    flops_per_sample: float
    profile: ActivationProfile
    grad_bytes: int
    teacher_bytes: int
    bf16: bool

    def activations(self, batch: int, checkpointing: bool) -> float:
        return batch * self.profile.per_sample(checkpointing)

    @property
    def weight_casts(self) -> int:
        """Under bf16, the bf16 copies of the weights that autocast makes and backward keeps (2 bytes per
        parameter); 0 in fp32."""
        return 2 * self.params if self.bf16 else 0

    def step_transient(self, batch: int, checkpointing: bool = False) -> float:
        """Peak − resident memory of one step (activations or gradients, plus the teacher's forward and the
        weights' bf16 copies)."""
        return (max(self.activations(batch, checkpointing), self.grad_bytes) + batch * self.teacher_bytes
                + self.weight_casts)

    def step_peak(self, batch: int, checkpointing: bool = False) -> float:
        """Peak memory of one unwrapped step on one device: fp32 weights, AdamW moments and EMA (16 bytes per
        parameter, resident) plus the step's transient, which holds the gradients."""
        return 16 * self.params + self.step_transient(batch, checkpointing)

    def state(self, strategy: str, gpus: int) -> float:
        """Weights + gradients + AdamW + EMA per GPU (FSDP2: sharded, plus two gathered blocks)."""
        per_param = STATE_BYTES[strategy] * self.params
        if strategy == "ddp":
            return per_param
        gathered = 2 * 4 * self.params / max(1, len(self.profile.blocks))
        return per_param / gpus + gathered

    def largest_batch(self, strategy: str, gpus: int, gpu_mem: float, checkpointing: bool) -> int:
        """The largest micro-batch whose state + activations fit ``gpu_mem`` bytes (90 % usable)."""
        free = 0.9 * gpu_mem - self.state(strategy, gpus) - self.weight_casts
        per_sample = self.activations(1, checkpointing) + self.teacher_bytes
        return max(0, int(free // per_sample))


def make_plan(cfg) -> Plan:
    """The plan of a run config: build it on the meta device and profile one sample's forward."""
    run = build_run(cfg, device="meta")
    name, modality = next(iter(run.modalities.items()))
    with torch.device("meta"):
        ids = modality.sample_ids(1, "meta")
        x = torch.zeros(1, ids.shape[1], modality.token_channels)
    # Made on the CPU (a caption's text encoder runs there), then handed over as meta tensors of its shapes.
    cond, _, _ = modality.sample_conditions(1, "cpu")
    cond = Conditioning(**{k: v.to("meta") for k, v in cond if v is not None})
    return plan_model(cfg.name, run.backbone, x, ids, cond, run.objectives[name], cfg.train.precision == "bf16")


def plan_model(name: str, model: nn.Module, x: torch.Tensor, ids: torch.Tensor, cond, objective, bf16: bool) -> Plan:
    """The plan of a backbone already built on the meta device, for one sample ``x (1, L, C)``, its ``ids`` and
    conditioning, under a resolved objective (what ``benchmarks/gpu_check.py`` compares with a GPU's peak)."""
    length = ids.shape[1]
    with torch.device("meta"):
        if objective.mask_ratio == 0:  # one level per sample (flow matching, REPA, no masking): shared modulation
            t = TokenTimesteps(values=torch.tensor([[0.5]]), index=None, length=length)
        else:  # Dual-Timestep Scheduling: two levels per sample, selected per token
            t = TokenTimesteps.from_levels(torch.tensor([[0.5, 0.25]]), (torch.arange(length) % 2)[None])
    uses_teacher = objective.uses_teacher
    student_layer = objective.student_layer if objective.uses_projector else None
    profile = activation_profile(model, x, ids, t, cond, student_layer, bf16)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    teacher_layer = objective.teacher_layer if uses_teacher else None
    n_context = 0 if cond.context is None else cond.context.shape[1]
    teacher = (profile.largest_intermediate + profile.block_inputs[0]) if uses_teacher else 0
    return Plan(name, params, length, train_step_flops(model, length, n_context, teacher_layer),
                profile, 4 * params, teacher, bf16)


def format_plan(plan: Plan, batch: int, gpus: int, gpu_mem_gb: float) -> str:
    """The plan as a short table (GiB) for micro-batch ``batch`` on ``gpus`` GPUs of ``gpu_mem_gb``."""
    gib = lambda v: f"{v / GIB:8.2f} GiB"  # noqa: E731
    lines = [
        f"{plan.name}: {plan.params / 1e6:.1f}M trainable parameters, {plan.tokens} tokens per sample"
        f"{', bf16 autocast' if plan.bf16 else ''}",
        f"  FLOPs per step (micro-batch {batch}):  {plan.flops_per_sample * batch / 1e12:.2f} TFLOP "
        f"({plan.flops_per_sample / 1e9:.1f} GFLOP per sample)",
        f"  activations per micro-batch:    {gib(plan.activations(batch, False))}   "
        f"with activation checkpointing {gib(plan.activations(batch, True))}",
    ]
    for strategy in ("ddp", "fsdp2"):
        lines.append(f"  weights+grads+AdamW+EMA {strategy:5s}:  {gib(plan.state(strategy, gpus))} per GPU "
                     f"({gpus} GPU{'s' if gpus > 1 else ''})")
    mem = gpu_mem_gb * 1e9
    for strategy in ("ddp", "fsdp2"):
        fits = [plan.largest_batch(strategy, gpus, mem, ac) for ac in (False, True)]
        lines.append(f"  largest micro-batch on {gpu_mem_gb:g} GB, {strategy:5s}:  {fits[0]} "
                     f"(with activation checkpointing {fits[1]})")
    return "\n".join(lines)
