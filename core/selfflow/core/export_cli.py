"""``selfflow export``: a run (or weights file) as a pretrained directory, optionally pushed to the Hugging Face
Hub (an explicit flag; the CLI is offline by default)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arg_types import ExamplesFormatter, add_model_argument
from .config import ConfigError
from .pretrained import load_model, save_pretrained


def require_hub_online() -> None:
    """Refuse when the Hugging Face Hub is switched off (before an export, not after it)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set (selfflow sets it by "
                          "default): run with HF_HUB_OFFLINE=0")


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload ``folder`` to the model repository ``repo_id`` (created if absent); returns the commit URL."""
    from huggingface_hub import HfApi

    require_hub_online()
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message="Upload selfflow model")
    return str(getattr(info, "commit_url", info))


def run_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():
        # its config.json would make every later `--run OUT` read the export instead of the run's checkpoints
        raise ConfigError(f"--out {out} is a training run directory; export to a directory of its own (training "
                          f"already wrote {out / 'pretrained'})")
    if args.private and not args.push_to_hub:
        raise ConfigError("--private applies to --push-to-hub REPO only")
    if args.push_to_hub:
        require_hub_online()
    loaded = load_model(args.run, "cpu", weights=args.weights, locations=args.locations)
    out = save_pretrained(args.out, loaded.model.state_dict(), loaded.config, loaded.model_config, loaded.data_facts)
    print(f"wrote {out} (config.json, model.safetensors)")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run's model as a pretrained directory (config.json + model.safetensors)",
        description="Write the EMA weights and the configs needed to rebuild the model (backbone, data, codec "
                    "and text-encoder references) as a directory that `selfflow sample --run DIR` and "
                    "`selfflow.core.load(DIR)` read. Training exports RUN/pretrained/ at its end already.",
        epilog="examples:\n"
               "  selfflow export --run runs/tiny-image --out exports/tiny-image\n"
               "  selfflow export --run runs/tiny-image --out exports/tiny-image-model --weights model",
        formatter_class=ExamplesFormatter)
    add_model_argument(p, required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights to export")
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="also upload the directory to this Hugging Face model repository (needs the network "
                        "and HF_HUB_OFFLINE=0; log in with `hf auth login`)")
    p.add_argument("--private", action="store_true", help="--push-to-hub: create the repository private")
    p.set_defaults(func=run_export)
