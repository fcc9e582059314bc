"""Capacity planning without a GPU: ``selfflow plan --config C [--gpus N --gpu-mem GB]``.

Method. The run's backbone is built on the ``meta`` device (no memory, no compute) under
:func:`~selfflow.core.codec.shapes_only` (absent autoencoders, text-encoder weights and shards stand in as their
published shapes, so nothing needs downloading), and for each modality (a mixed run steps on one at a time, at its
entry's micro-batch) one student forward runs there at micro-batch 1 under ``saved_tensors_hooks``: the bytes
autograd keeps for backward are summed per block and outside the blocks (parameters excluded, shared storages
counted once). Attention is counted as the flash / memory-efficient SDPA kernels (CUDA, and PyTorch's CPU flash
kernel) keep it: q, k, v, the output and ``O(L)`` statistics, no ``(L, L)`` matrices
(:class:`FlashAttentionSaves`). Activation checkpointing keeps each block's input plus one block's activations
while it is recomputed; backward holds about half a block's worth of gradients more. The step's transient memory
(peak − allocated before the step) is the larger of the activations and the gradients (backward frees the one as it
fills the other) plus the teacher's no-grad forward (one block's largest intermediate and the captured features).

Resident between steps, per parameter: fp32 weights, two AdamW moments and the fp32 EMA (16 bytes); DDP adds its
gradient buckets (4 bytes, allocated when it wraps the model); FSDP2 shards all of it over the GPUs and all-gathers
two blocks' parameters at a time. The gradients are not resident: the trainer sets them to ``None`` after each
step, so in every strategy they fill during backward as the activations are freed (sharded under FSDP2). Under bf16
the profiling forward runs with autocast's casts emulated (``torch.autocast`` does nothing to meta tensors, see
:class:`MetaAutocast`), so the saved bytes are those of a bf16 step: matrix products and attention save bf16 copies
of their inputs, the fp32 residual stream and what it feeds stay fp32. Autocast's bf16 copy of every weight (2
bytes per parameter, made once per step and kept by backward) is counted apart; FSDP2's bf16 blocks leave it
nothing to copy. Accuracy: within 15 % of the live-tensor peak of real CPU steps (:func:`live_peak_bytes`, the
quantity a GPU reports as ``max_memory_allocated``), with and without activation checkpointing, fp32 and bf16,
unwrapped and under DDP and FSDP2 on one gloo rank (``core/tests/test_plan.py``).
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

from .codec import shapes_only
from .config import MAX_BATCH_SIZE
from .flops import train_step_flops
from .modality import preview_conditions
from .modulation import TokenTimesteps
from .parallel import Strategy
from .run_setup import build_run
from .tokens import Conditioning

GIB = 2**30
# Resident per parameter between steps: fp32 weights, AdamW's m and v, the EMA (+ DDP's gradient buckets).
RESIDENT_BYTES = {"none": 16, "ddp": 16 + 4, "fsdp2": 16}
# Of a GPU's memory, what a plan may fill: the rest is for the CUDA context, cuBLAS / attention workspaces and the
# caching allocator's fragmentation (what ``max_memory_allocated`` does not count).
USABLE_FRACTION = 0.9


@dataclass
class ActivationProfile:
    """Bytes autograd saves for backward for one sample: outside the blocks, per block, and each block's
    input (what activation checkpointing keeps)."""

    outside: int
    blocks: list[int]
    block_inputs: list[int]
    largest_intermediate: int  # the biggest tensor one block produces (the teacher's no-grad transient)

    def per_sample(self, checkpointing: bool) -> int:
        """Activation bytes per sample at the step's peak. Backward's gradient buffers outgrow what it frees by
        0-0.4 of a block on the CPU cases (the block it runs frees its saved tensors as it fills them): half a
        block is counted. With activation checkpointing what is saved is each block's input, plus the one
        block being recomputed. Against the live-tensor peak of CPU steps: docs/BENCHMARKS.md, "The planner
        against live tensor bytes"."""
        if not checkpointing:
            return self.outside + sum(self.blocks) + max(self.blocks) // 2
        return self.outside + sum(self.block_inputs) + max(self.blocks)


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
        self._held: list[torch.Tensor] = []  # the copies stay alive: a freed storage's address would be reused

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
                self._held.append(copy)
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
                       student_layer: int | None, bf16: bool = False, modality: str | None = None
                       ) -> ActivationProfile:
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
            model(x, ids, t, cond, modality=modality, capture=capture,
                  project=bool(capture) and model.projector is not None)
    finally:
        for h in handles:
            h.remove()
    return ActivationProfile(sizes[-1], sizes[:-1], inputs, largest[0])


@dataclass
class Plan:
    name: str  # the run's; a mixed run has one plan per modality, each with its ``modality``
    params: int
    tokens: int
    flops_per_sample: float
    profile: ActivationProfile
    grad_bytes: int
    teacher_bytes: int
    bf16: bool
    modality: str | None = None

    def activations(self, batch: int, checkpointing: bool) -> float:
        return batch * self.profile.per_sample(checkpointing)

    @property
    def weight_casts(self) -> int:
        """Under bf16, the bf16 copies of the weights that autocast makes and backward keeps (2 bytes per
        parameter); 0 in fp32."""
        return 2 * self.params if self.bf16 else 0

    def step_transient(self, batch: int, checkpointing: bool = False, strategy: Strategy = "none",
                       gpus: int = 1) -> float:
        """Peak − resident memory of one step: activations or gradients (backward frees the one as it fills the
        other; FSDP2's are sharded), plus the teacher's forward and the weights' bf16 copies (none under FSDP2,
        whose two gathered blocks are counted instead). With activation checkpointing the gradients trade places
        with the saved block inputs while the recomputed block and what is saved outside the blocks stay;
        autocast copies one block's weights at a time there (the forward's copies are gone)."""
        p, fsdp2, blocks = self.profile, strategy == "fsdp2", len(self.profile.blocks)
        grads = self.grad_bytes / gpus if fsdp2 else self.grad_bytes
        casts = 0 if fsdp2 else self.weight_casts
        gathered = 2 * (2 if self.bf16 else 4) * self.params / blocks if fsdp2 else 0
        if checkpointing:
            return (batch * (p.outside + max(p.blocks)) + max(batch * sum(p.block_inputs), grads)
                    + casts / blocks + gathered)
        return max(self.activations(batch, False), grads) + batch * self.teacher_bytes + casts + gathered

    def resident(self, strategy: Strategy, gpus: int) -> float:
        """Weights + AdamW + EMA per GPU between steps (:data:`RESIDENT_BYTES`; FSDP2's sharded over ``gpus``)."""
        per_param = RESIDENT_BYTES[strategy] * self.params
        return per_param / gpus if strategy == "fsdp2" else per_param

    def gpu_memory(self, strategy: Strategy, gpus: int, batch: int, checkpointing: bool) -> float:
        """Peak bytes per GPU at micro-batch ``batch`` under ``strategy`` (``none``: one unwrapped device, what
        ``benchmarks/gpu_check.py`` compares with a GPU's ``max_memory_allocated``): resident + the step's
        transient."""
        return self.resident(strategy, gpus) + self.step_transient(batch, checkpointing, strategy, gpus)

    def largest_batch(self, strategy: Strategy, gpus: int, gpu_mem: float, checkpointing: bool) -> int:
        """The largest micro-batch whose step fits ``gpu_mem`` bytes (:data:`USABLE_FRACTION` of them). The
        memory grows with the batch, but not linearly (below some batch the gradients, not the activations, set
        the peak), so it is searched: doubling, then bisecting."""
        budget = USABLE_FRACTION * gpu_mem
        fits = lambda b: self.gpu_memory(strategy, gpus, b, checkpointing) <= budget  # noqa: E731
        if not fits(1):
            return 0
        if fits(MAX_BATCH_SIZE):  # the most train.batch_size takes
            return MAX_BATCH_SIZE
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def make_plans(cfg) -> list[tuple[Plan, int]]:
    """One plan per modality of a run config, each with the micro-batch the config gives it (a mixed run
    steps on one modality at a time). The run is built on the meta device under
    :func:`~selfflow.core.codec.shapes_only`, so no autoencoder, text-encoder weights or shards are needed."""
    batches = {e.modality: e.batch_size or cfg.train.batch_size for e in cfg.data.entries()}
    with shapes_only():
        run = build_run(cfg, device="meta")
        plans = []
        for name, modality in run.modalities.items():
            with torch.device("meta"):
                ids = modality.sample_ids(1, "meta")
                x = torch.zeros(1, ids.shape[1], modality.token_channels)
            # Made on the CPU (a caption's text encoder runs there), then handed over as meta tensors of its shapes.
            cond, _, _ = preview_conditions(modality, 1, "cpu")
            cond = Conditioning(**{k: v.to("meta") for k, v in cond if v is not None})
            plan = plan_model(cfg.name, run.backbone, x, ids, cond, run.objectives[name],
                              cfg.train.precision == "bf16", modality=name)
            plans.append((plan, batches[name]))
    return plans


def make_plan(cfg) -> Plan:
    """The plan of a run config (of its first modality, for a mixed run: :func:`make_plans` has them all)."""
    return make_plans(cfg)[0][0]


def plan_model(name: str, model: nn.Module, x: torch.Tensor, ids: torch.Tensor, cond, objective, bf16: bool,
               modality: str | None = None) -> Plan:
    """The plan of a backbone already built on the meta device, for one sample ``x (1, L, C)`` of ``modality``
    (None: the model's first), its ``ids`` and conditioning, under a resolved objective (what
    ``benchmarks/gpu_check.py`` compares with a GPU's peak)."""
    length = ids.shape[1]
    with torch.device("meta"):
        if objective.mask_ratio == 0:  # one level per sample (flow matching, REPA, no masking): shared modulation
            t = TokenTimesteps(values=torch.tensor([[0.5]]), index=None, length=length)
        else:  # Dual-Timestep Scheduling: two levels per sample, selected per token
            t = TokenTimesteps.from_levels(torch.tensor([[0.5, 0.25]]), (torch.arange(length) % 2)[None])
    uses_teacher = objective.uses_teacher
    student_layer = objective.student_layer if objective.uses_projector else None
    profile = activation_profile(model, x, ids, t, cond, student_layer, bf16, modality)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    teacher_layer = objective.teacher_layer if uses_teacher else None
    n_context = 0 if cond.context is None else cond.context.shape[1]
    teacher = (profile.largest_intermediate + profile.block_inputs[0]) if uses_teacher else 0
    return Plan(name, params, length, train_step_flops(model, length, n_context, teacher_layer),
                profile, 4 * params, teacher, bf16, modality)


def live_peak_bytes(step: Callable[[], object]) -> int:
    """Peak of the bytes held by live tensors while ``step`` runs, above those held before it: the torch profiler's
    allocation and free events (every tensor allocation through torch's CPU allocator), summed in time order. This
    is the quantity a GPU reports as ``torch.cuda.max_memory_allocated`` minus what was allocated before; unlike
    the peak RSS (``benchmarks/memory.py``) it holds no allocator overhead (free lists, fragmentation), which
    grows with the churn of activation checkpointing's recomputation. What the plan is checked against."""
    from torch.profiler import ProfilerActivity, profile  # imported here: only the checks measure

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def _count(n: int) -> str:
    """A parameter count as people say it: 675.1M, 1.2B, 40.3k."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _largest(n: int) -> str:
    return {0: "0 (none fits)", MAX_BATCH_SIZE: f"{MAX_BATCH_SIZE} (train.batch_size's limit)"}.get(n, str(n))


def _fitting_advice(batch: int, fits: list[int], strategy: str, gpus: int, checkpointing: bool) -> str:
    """What makes a step that does not fit fit, given the largest micro-batch without / with activation
    checkpointing and whether the run already checkpoints."""
    largest = fits[1] if checkpointing else fits[0]
    if largest:
        return (f"a micro-batch of at most {largest} (train.batch_size; train.grad_accum_steps keeps the global "
                "batch)" + ("" if checkpointing or fits[1] < batch else
                            f", or train.activation_checkpointing: true (up to {fits[1]})"))
    if fits[1]:
        return f"train.activation_checkpointing: true with a micro-batch of at most {fits[1]}"
    if strategy == "ddp":
        return "not even one sample: DDP keeps the whole state on every GPU; try fsdp2 over more GPUs"
    return f"not even one sample on {gpus} GPU{'s' if gpus > 1 else ''}: shard over more (--gpus) or a larger GPU"


def format_plans(plans: list[tuple[Plan, int]], gpus: int, gpu_mem_gb: float, checkpointing: bool = False,
                 compiled: bool = False) -> str:
    """The plans of one run (one per modality, with its micro-batch) as a short table (GiB) for ``gpus`` GPUs
    of ``gpu_mem_gb``: the state once, then per modality FLOPs, activations, memory per GPU and the largest
    micro-batch, with a ``!`` line and what would fit where the configured step does not (``checkpointing``:
    the run's ``train.activation_checkpointing``); a mixed run's peak is its largest modality step. A run with
    ``train.compile`` is told that the plan, made for the eager step, is its upper bound."""
    gib = lambda v: f"{v / GIB:.2f} GiB"  # noqa: E731
    first, mixed, mem = plans[0][0], len(plans) > 1, gpu_mem_gb * 1e9
    what = (f"{len(plans)} modalities, one per step" if mixed else f"{first.tokens} tokens per sample")
    lines = [f"{first.name}: {_count(first.params)} trainable parameters, {what}"
             f"{', bf16 autocast' if first.bf16 else ''}"]
    for strategy in ("ddp", "fsdp2"):
        what = ("weights, AdamW, EMA, DDP's gradient buckets" if strategy == "ddp"
                else f"weights, AdamW, EMA, sharded over {gpus} GPU{'s' if gpus > 1 else ''}")
        lines.append(f"  resident per GPU, {strategy:5s}:  {gib(first.resident(strategy, gpus))} ({what})")
    for plan, batch in plans:
        pad = "  "
        if mixed:
            lines.append(f"  {plan.modality}: {plan.tokens} tokens per sample, micro-batch {batch}")
            pad = "    "
        lines += [
            f"{pad}FLOPs per step (micro-batch {batch}):  {plan.flops_per_sample * batch / 1e12:.2f} TFLOP "
            f"({plan.flops_per_sample / 1e9:.1f} GFLOP per sample)",
            f"{pad}activations per micro-batch:  {gib(plan.activations(batch, False))}   "
            f"with activation checkpointing {gib(plan.activations(batch, True))}",
        ]
        for strategy in ("ddp", "fsdp2"):
            use = [plan.gpu_memory(strategy, gpus, batch, ac) for ac in (False, True)]
            fits = [plan.largest_batch(strategy, gpus, mem, ac) for ac in (False, True)]
            lines.append(f"{pad}{strategy:5s} per GPU at micro-batch {batch}:  {gib(use[0])} "
                         f"(with activation checkpointing {gib(use[1])}); on {gpu_mem_gb:g} GB "
                         f"({100 * USABLE_FRACTION:.0f} % usable) the largest micro-batch is {_largest(fits[0])}, "
                         f"with activation checkpointing {_largest(fits[1])}")
            if (need := use[checkpointing]) > USABLE_FRACTION * mem:
                usable = USABLE_FRACTION * mem
                # as many decimals as show the difference: "67.06 GiB > 67.06 GiB" read as a contradiction
                places = next((p for p in range(2, 10) if f"{need / GIB:.{p}f}" != f"{usable / GIB:.{p}f}"), 9)
                lines.append(f"{pad}  ! {strategy}: micro-batch {batch} does not fit ({need / GIB:.{places}f} GiB > "
                             f"{usable / GIB:.{places}f} GiB usable): "
                             + _fitting_advice(batch, fits, strategy, gpus, checkpointing))
    if mixed:
        for strategy in ("ddp", "fsdp2"):
            peak, name = max((p.gpu_memory(strategy, gpus, b, False), p.modality) for p, b in plans)
            peak_ac = max(p.gpu_memory(strategy, gpus, b, True) for p, b in plans)
            lines.append(f"  peak per GPU, {strategy:5s}:  {gib(peak)} (the {name} step; with activation "
                         f"checkpointing {gib(peak_ac)})")
    if compiled:
        lines.append("  train.compile: these are the eager step's; compiled blocks fuse elementwise intermediates "
                     "away (on an H200, SiT-XL/2 and the 625M MMDiT at batch 64 peaked 19-33 % below the plan: "
                     "docs/BENCHMARKS.md \"On a GPU\"), so for this run the plan is an upper bound")
    return "\n".join(lines)
