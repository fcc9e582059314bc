"""``selfflow simpler``: SIMPLER visual-matching evaluation of an ``rt1`` run (``selfflow.commands`` group).

A top-level command because ``selfflow eval`` belongs to the eval package. ``--env simpler`` (default)
needs SimplerEnv on a GPU machine; ``--env fake`` runs the labelled offline stand-in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfflow.core.arg_types import add_model_argument, device_name, non_negative_int, positive_int
from selfflow.core.config import ConfigError


def _run(args: argparse.Namespace) -> int:
    from .simpler_eval import SIMPLER_INSTALL, TASKS, evaluate

    if args.policy == "oracle" and args.env != "fake":
        print("selfflow: error: --policy oracle is a scripted check of the driver and exists only with --env fake",
              file=sys.stderr)
        return 2
    if args.env == "simpler":
        try:
            import simpler_env  # noqa: F401 - only checks the installation
        except ImportError:
            print(f"selfflow: error: {SIMPLER_INSTALL}", file=sys.stderr)
            return 2
    tasks = list(TASKS) if args.task == "all" else [args.task]
    factory, weights = _policy_factory(args, tasks)
    # the weights' digest, not the run's path, says which model ran: a run trained on in place is another model,
    # a run moved or mounted elsewhere the same one
    settings = {"run": None if args.run is None else str(Path(args.run).resolve()), "weights": weights,
                "policy": args.policy, "steps": args.steps, "exec_horizon": args.exec_horizon,
                "sticky_steps": args.sticky_steps, "video": args.video}
    summary = evaluate(factory, tasks, args.env, args.out, args.limit, args.seed, settings)
    if getattr(args, "validation", None) is not None:
        print("validation on held-out episodes: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in args.validation.items()))
    for task, s in summary["tasks"].items():
        print(f"[env: {summary['env']}] {task}: success_rate {s['success_rate']:.3f} over {s['episodes']} "
              f"episodes (of {s['full_sweep_episodes']} in the sweep), success at the final step, "
              f"max {s['max_episode_steps']} steps")
    print(f"per-episode results and summary in {args.out}")
    return 0


def check_instructions(modality, tasks: list[str]) -> None:
    """Refuse, before any rollout, a class-conditioned run whose classes lack a task's instruction: it stopped at
    the first such episode. (The real SIMPLER's Move Near changes its instruction per episode.)"""
    from .simpler_eval import TASKS

    try:
        modality.with_labels({"captions": [s for t in tasks for s in TASKS[t].subtasks]})
    except ValueError as e:
        raise ConfigError(f"the run is class-conditioned and cannot read SIMPLER's instructions: {e}; or choose a "
                          "--task whose instructions it knows") from None


def _policy_factory(args: argparse.Namespace, tasks: list[str]) -> tuple[Callable[[Any], Any], str | None]:
    """The per-episode policy maker and the digest of the run's weights (``None`` without a run)."""
    import numpy as np

    from .normalize import ActionNormalizer, ActionStats
    from .policy import SelfFlowPolicy, SimplerPolicyAdapter

    # Raw units = normalised units: the scripted checks produce raw actions directly.
    identity = ActionNormalizer(ActionStats(count=1, mean=[0.0] * 7, std=[1.0] * 7, min=[-1.0] * 7,
                                            max=[1.0] * 7, q01=[-1.0] * 7, q99=[1.0] * 7))
    if args.policy == "oracle":
        return lambda env: SimplerPolicyAdapter(
            lambda image, text: env.oracle_action()[None] * [1, 1, 1, 1, 1, 1, 0], identity, exec_horizon=1), None
    if args.run is None:
        if args.policy == "zero":
            return lambda env: SimplerPolicyAdapter(lambda image, text: np.zeros((4, 7), np.float32), identity), None
        raise ConfigError("--policy model needs --run <run directory of an rt1 training>")
    from selfflow.core.pretrained import load_model
    from selfflow.core.sample_many import weights_digest

    loaded = load_model(args.run, args.device, modality_name="rt1", locations=args.locations)
    model, modality = loaded.model, loaded.modality
    device = next(model.parameters()).device
    if args.policy == "model":
        check_instructions(modality, tasks)
        if args.validate:
            args.validation = _validate(model, modality, args, device)
    chunk_fn = SelfFlowPolicy(model, modality, steps=args.steps, seed=args.seed, device=device, video=args.video)
    if args.policy == "zero":
        still = modality.normalizer.normalize(np.zeros((modality.options.chunk, 7), np.float32))  # raw 0
        chunk_fn = lambda image, text: still  # noqa: E731
    return (lambda env: SimplerPolicyAdapter(chunk_fn, modality.normalizer, exec_horizon=args.exec_horizon,
                                             sticky_steps=args.sticky_steps, gripper=modality.options.gripper),
            weights_digest(model))


def _validate(model, modality, args: argparse.Namespace, device) -> dict | None:
    """Validation metrics on the run's held-out episodes (``validation.json`` in ``--out``), if its data is here."""
    import json

    from .validate import val_episodes, validate

    if not (modality.root / "val").is_dir():
        print(f"no validation split at {modality.root / 'val'}: skipping the validation metrics")
        return None
    if val_episodes(modality.root) == 0:
        print(f"{modality.root} holds no validation episodes (prepared with --val-fraction 0, or too few episodes "
              "for its fraction): skipping the validation metrics")
        return None
    metrics = {"split": str(modality.root / "val"), "video": args.video,
               **validate(model, modality, steps=args.steps, seed=args.seed, device=device, video=args.video)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simpler", help="SIMPLER visual-matching rollouts of an rt1 run",
                              description="Move Near and Open Top Drawer and Place Apple (visual matching), "
                                          "SIMPLER's loop and success at the final step.")
    add_model_argument(p, what="an rt1 training: its ")
    p.add_argument("--env", choices=["simpler", "fake"], default="simpler",
                   help="fake: the offline stand-in, results labelled env: fake")
    p.add_argument("--task", choices=["all", "move_near", "open_top_drawer_place_apple"], default="all",
                   help="which visual-matching sweep to run")
    p.add_argument("--policy", choices=["model", "zero", "oracle"], default="model",
                   help="zero: no motion (a floor); oracle: scripted, fake env only — driver checks")
    p.add_argument("--limit", type=positive_int, help="first N episodes of each sweep (smoke runs; default: all)")
    p.add_argument("--steps", type=positive_int, default=10, help="Euler steps per action chunk")
    p.add_argument("--exec-horizon", type=positive_int, default=2, help="actions executed per chunk")
    p.add_argument("--sticky-steps", type=positive_int, default=15,
                   help="steps a gripper change is held")
    p.add_argument("--video", choices=["joint", "marginal"], default="joint",
                   help="future frames: denoised with the actions, or held at pure noise (the schedule's policy mode)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the held-out action/video metrics (validation.json)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling noise and episode seed")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda:N")
    p.add_argument("--out", default="runs/simpler-eval", help="directory for episodes.jsonl, summary.json and validation.json")
    p.set_defaults(func=_run)
