"""Where the recipes' `save_state` checkpoints live and how `--resume_from_checkpoint` finds one
(a folder, or `latest` in the output folder), checked before anything trains."""

import json
from pathlib import Path

from .errors import RecipeError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.json"


def find_checkpoint(value, output_dir):
    """`--resume_from_checkpoint`: a folder written by `save_state`, or `latest` in output_dir."""
    if value == "latest":
        folder = Path(output_dir or ".") / CHECKPOINT_DIR
        found = sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []
        if not found:
            raise RecipeError(f"`--resume_from_checkpoint latest`: no checkpoint in {folder}; "
                              "pass a checkpoint folder.")
        value = found[-1]
    path = Path(value)
    state = path / STATE_FILE
    if not path.is_dir() or not state.is_file():
        raise RecipeError(
            f"`--resume_from_checkpoint` {path}: not a checkpoint of these recipes (needs a folder with {STATE_FILE} "
            f"and accelerate's state, e.g. {Path(output_dir or 'OUTPUT_DIR') / CHECKPOINT_DIR / 'step_100'})."
        )
    try:
        json.loads(state.read_text())["completed_steps"]
    except (ValueError, KeyError) as err:
        raise RecipeError(f"`--resume_from_checkpoint` {path}: {STATE_FILE} is unreadable ({err}); "
                          "pick another checkpoint.") from err
    if (not any(path.glob("model*.safetensors")) and not any(path.glob("pytorch_model*"))
            and not any(path.glob("*.bin"))):
        raise RecipeError(f"`--resume_from_checkpoint` {path}: no model weights in it; pick another checkpoint.")
    return path
