"""Previews and online evaluation during training, with their rank choreography.

Preview grids (section ``sample``: ``every``, ``num_samples``, ``seed``, ``use_ema``) and online evaluation
(section ``eval``: ``every``, ``num_samples``, ``cfg_scale``; modalities with an evaluator) generate with the
EMA (or the student), each modality with its own sampler (:meth:`RunConfig.sampler`); online evaluation
replaces its guidance by ``eval.cfg_scale`` (default 1: none, as the paper's metrics); a run under FSDP2 in bf16
holds bf16 weights, so it samples and evaluates under bf16 autocast.

Ranks: a preview grid is small — under DDP only rank 0 generates it and the others wait at a barrier; under FSDP2
every rank must join each forward (the weights are sharded), so all generate it and rank 0 writes it. Online
evaluation is the long part, so every rank generates an equal share of its samples, with per-sample seeds (the
same samples on any number of ranks, so a run resumed on another number of ranks scores as it would have), and
rank 0 gathers and scores them while the others wait. Each preview file written is handed to the training log
(TensorBoard / W&B media).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .config import ConfigError, RunConfig
from .distributed import DistInfo, barrier, gather_to_main
from .generate import generate, generate_share_batches
from .modality import Modality
from .parallel import Strategy
from .precision import autocast
from .registry import available_evaluators, get_evaluator
from .training_log import TrainingLog


class Previewer:
    def __init__(self, cfg: RunConfig, modalities: dict[str, Modality], model: nn.Module, dist: DistInfo,
                 strategy: Strategy, device: Any, log: TrainingLog | None = None):
        self.sample_cfg, self.eval_cfg, self.total = cfg.sample, cfg.eval, cfg.train.steps
        self.modalities = modalities
        # Under FSDP2 in bf16 the sharded model computes with bf16 weights (its mixed-precision policy): fp32
        # sampling would need fp32 weights the run never gathers, so previews and evaluation run under autocast.
        bf16_weights = strategy == "fsdp2" and cfg.train.precision == "bf16"
        self.model_precision = "bf16" if bf16_weights else "fp32"  # what a model-reading evaluator runs under
        forced = {"precision": "bf16"} if bf16_weights else {}
        self.samplers = {name: cfg.sampler(m).model_copy(update=forced) for name, m in modalities.items()}
        self.eval_samplers = {name: s.model_copy(update={"cfg_scale": cfg.eval.cfg_scale})
                              for name, s in self.samplers.items()}
        self.model = model
        self.dist, self.strategy, self.device = dist, strategy, device
        self.sample_dir = cfg.run_dir / "samples"
        self.log = log
        # Built at the start: an evaluator that cannot score a modality (the linear probe on audio) is refused
        # before the first step, not at the first evaluation, and an eval.every with nothing to run is said.
        self._evaluators = self._build_evaluators() if cfg.eval.every else None  # else built if evaluate() is called

    def idle_eval_warning(self) -> str | None:
        """What to warn about when ``eval.every`` is set but no modality of the run has an evaluator (the trainer
        logs it where train.log keeps it)."""
        if not self.eval_cfg.every or self._evaluators:
            return None
        return (f"selfflow: warning: eval.every={self.eval_cfg.every} but no online evaluator scores "
                f"{', '.join(self.modalities)} (installed: {', '.join(available_evaluators()) or 'none'}): there is "
                "nothing to evaluate online; score saved samples with `selfflow eval` (e.g. fvd, fad) instead")

    def _build_evaluators(self) -> dict[str, list[Any]]:
        """``{modality: [evaluator, …]}``: the modality's own (e.g. probe-FD on synthetic shapes), then
        ``eval.evaluators``, for each modality that has any; each with its ``eval.options``. An evaluator whose
        factory has ``scores(modality) -> bool`` runs on the modalities it scores (FID on the images of a mixed
        run, not its audio); one that scores none of the run's modalities is an error."""
        names = self._evaluator_names()
        used = {e for group in names.values() for e in group}
        if idle := [e for e in self.eval_cfg.evaluators if e not in used]:
            kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in self.modalities.items())
            raise ConfigError(f"eval.evaluators: {', '.join(idle)} scores none of this run's modalities: {kinds}")
        if unused := sorted(set(self.eval_cfg.options) - used):
            raise ConfigError(f"eval.options has options for {', '.join(unused)}, which this run does not evaluate "
                              f"with (its evaluators: {', '.join(sorted(used)) or 'none'}): add "
                              f"{'them' if len(unused) > 1 else 'it'} to eval.evaluators")
        return {n: [self._evaluator(e, self.modalities[n]) for e in group] for n, group in names.items()}

    def _evaluator_names(self) -> dict[str, list[str]]:
        """``{modality: [evaluator name, …]}`` of the modalities with any: the modality's own, then those of
        ``eval.evaluators`` that score it."""
        names = {n: [e for e in [m.evaluator, *self.eval_cfg.evaluators] if e and (e == m.evaluator or _scores(e, m))]
                 for n, m in self.modalities.items()}
        return {n: group for n, group in names.items() if group}

    def summary(self) -> str | None:
        """``every 250 steps: image: shapes_probe, inception_fid; 200 samples, 100 per rank in batches of 64``
        (``None`` without online evaluation): what the start-up report says of it."""
        if not self.eval_cfg.every or not self._evaluators:
            return None
        n, world = self.eval_cfg.num_samples, self.dist.world_size
        share = -(-n // world)
        where = f"{share} per rank, " if world > 1 else ""
        what = "; ".join(f"{m}: {', '.join(names)}" for m, names in self._evaluator_names().items())
        return f"every {self.eval_cfg.every} steps: {what}; {n} samples, {where}in batches of {self.eval_cfg.batch_size}"

    def _evaluator(self, name: str, modality: Modality) -> Any:
        """The evaluator ``name`` for ``modality``, built with ``eval.options[name]`` (checked against the
        factory's parameters first, so that a misspelt option is named)."""
        factory, options = get_evaluator(name), self.eval_cfg.options.get(name, {})
        signature = inspect.signature(factory)
        named = [p.name for p in list(signature.parameters.values())[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                        p.KEYWORD_ONLY)]
        takes = f"({name} takes {', '.join(named) or 'no options'})"
        any_name = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        if unknown := [k for k in options if k not in named and not any_name]:
            raise ConfigError(f"eval.options.{name}: unknown option {', '.join(map(repr, unknown))} {takes}")
        try:
            signature.bind(modality, **options)
        except TypeError as e:
            raise ConfigError(f"eval.options.{name}: {e} {takes}") from None
        return factory(modality, **options)

    @property
    def _mixed(self) -> bool:
        return len(self.modalities) > 1

    @property
    def _all_ranks_generate(self) -> bool:
        return self.strategy == "fsdp2"

    def samples_due(self, step: int) -> bool:
        """A periodic preview at ``step`` (the final one is written after the loop)."""
        return bool(self.sample_cfg.every) and step % self.sample_cfg.every == 0 and step < self.total

    def eval_due(self, step: int) -> bool:
        return bool(self.eval_cfg.every) and (step % self.eval_cfg.every == 0 or step == self.total)

    def write_samples(self, step: int) -> list[Path]:
        """Preview samples of every modality (a mixed run writes ``samples/<modality>/``); returns the files
        written, one per modality (rank 0; other ranks: none)."""
        s = self.sample_cfg
        if not self._all_ranks_generate and not self.dist.is_main:
            barrier()
            return []
        written = []
        show = self.log is not None and self.log.progress
        for name, modality in self.modalities.items():
            sampler = self.samplers[name]
            with tqdm(total=sampler.steps, desc=f"preview {name}", unit="step", leave=False, disable=not show) as bar:
                media, labels = generate(self.model, modality, s.num_samples, sampler, s.seed, self.device,
                                         progress=bar.update)
            folder = self.sample_dir / name if self._mixed else self.sample_dir
            if self.dist.is_main:
                folder.mkdir(parents=True, exist_ok=True)
                path = modality.save_samples(media, labels, folder / f"step_{step:08d}")
                written.append(path)
                if self.log is not None:
                    self.log.media(step, name, path)
        if not self._all_ranks_generate:
            barrier()
        return written

    def evaluate(self, interrupted: Callable[[], bool] | None = None) -> dict[str, float]:
        """Generate ``eval.num_samples`` for each modality that has evaluators (its own, e.g. probe-FD on
        synthetic shapes, then ``eval.evaluators``) and score them on rank 0 (keys are suffixed ``/<modality>``
        in mixed runs); the other ranks return ``{}``. An evaluator with ``needs_model = True`` is called with
        the model instead of samples (on rank 0; on every rank under FSDP2, whose forwards all ranks join).
        ``interrupted()`` is asked before each batch of samples (every rank asks: it may be a collective); when
        it says yes, the evaluation is abandoned with :class:`EvaluationInterrupted`."""
        if self._evaluators is None:
            self._evaluators = self._build_evaluators()
        main, all_ranks = self.dist.is_main, self._all_ranks_generate
        out: dict[str, float] = {}
        for name, group in self._evaluators.items():
            samples = None  # generated once per modality, on first need
            for evaluator in group:
                if getattr(evaluator, "needs_model", False):
                    if not (main or all_ranks):
                        continue
                    with autocast(self.model_precision, self.device):
                        scores = evaluator(self.model)
                else:
                    samples = samples or self._eval_samples(name, interrupted)
                    if not main:
                        continue
                    scores = evaluator(*samples)
                if main:
                    out.update({(f"{k}/{name}" if self._mixed else k): v for k, v in scores.items()})
        if self._evaluators:
            barrier()  # the other ranks wait for rank 0's scores
        return out

    def _eval_samples(self, name: str, interrupted: Callable[[], bool] | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The ``eval.num_samples`` samples of modality ``name`` for scoring, in rank 0's CPU memory (``(None,
        None)`` on the others). Every rank generates an equal share — the last ones padded with repeats, so that
        the shares gather as one tensor and, under FSDP2, every rank runs as many forwards — with per-sample
        seeds (:func:`~.generate.generate_share_batches`): the same samples on any number of ranks. Each batch is
        gathered to rank 0 and moved off the device as soon as it is made."""
        n, world, rank = self.eval_cfg.num_samples, self.dist.world_size, self.dist.rank
        share = -(-n // world)
        mine = [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]
        show = self.log is not None and self.log.progress and self.dist.is_main
        sampler, batch = self.eval_samplers[name], self.eval_cfg.batch_size
        per_rank: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in range(world)]
        with tqdm(total=sampler.steps * -(-share // batch), desc=f"eval {name}: {n} samples on {world} rank(s)",
                  unit="step", leave=False, disable=not show) as bar:
            batches = generate_share_batches(self.model, self.modalities[name], n, mine, sampler,
                                             self.sample_cfg.seed + 1, self.device, bar.update, batch_size=batch)
            for media, shown in _unless(interrupted, batches):
                media_parts = gather_to_main(media)
                label_parts = None if shown is None else gather_to_main(shown)  # None alike on every rank
                for r, part in enumerate(media_parts or []):  # rank 0 only
                    per_rank[r].append((part.cpu(), None if label_parts is None else label_parts[r].cpu()))
        if not self.dist.is_main:
            return None, None
        made = [part for parts in per_rank for part in parts]  # rank-major: index order
        labels = [shown for _, shown in made]
        return (torch.cat([media for media, _ in made])[:n],
                None if labels[0] is None else torch.cat(labels)[:n])


def _scores(name: str, modality: Modality) -> bool:
    """Whether evaluator ``name`` scores ``modality`` (its factory's ``scores``; without one, every modality)."""
    scores = getattr(get_evaluator(name), "scores", None)
    return True if scores is None else bool(scores(modality))


class EvaluationInterrupted(Exception):
    """A stop came during an online evaluation: it was abandoned between two batches of samples."""


def _unless(interrupted: Callable[[], bool] | None, batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, each after ``interrupted()`` has said no (closing them, and so restoring the model's mode,
    when it says yes)."""
    with contextlib.closing(batches):
        while not (interrupted is not None and interrupted()):
            made = next(batches, None)
            if made is None:
                return
            yield made
    raise EvaluationInterrupted
