"""The defaults of a training run, each written once. train.py's flags (revision/arguments.py), the settings
resolver (revision/settings.py), RevisionConfig (revision/model.py), data_utils.py and the launchers
(script/train/*.sh) all take theirs from here.

    python revision/defaults.py    # the launchers: the values as shell assignments (DEFAULT_VISUAL_TOKENS=576 ...)

This module imports nothing from the package, so the launchers read it as a file, without torch.
"""
from __future__ import annotations

import shlex

# positions one projected embedding fills: Bunny's get_image_feature repeats each embedding over seq = 576
NUM_VISUAL_TOKENS = 576
PROJECTOR_TYPE = "mlp2x_gelu"  # the paper's projector (official scripts)
PROJECTOR_TOKENS = 1  # distinct vectors the projector makes of one embedding (1: one vector, repeated)
TEMPLATE = "plain"  # pretraining (stage 1): train.py's --version and a checkpoint's template unless given
INSTRUCT_TEMPLATE = "chat"  # the launchers' stage 2: the tokenizer's own chat template (README "Training")
MODEL_MAX_LENGTH = 2048  # tokens per sample, visual block included (official scripts)

# the names the launchers read (script/train/launch.sh evaluates this module's output)
SHELL = {
    "DEFAULT_VISUAL_TOKENS": NUM_VISUAL_TOKENS,
    "DEFAULT_PROJECTOR": PROJECTOR_TYPE,
    "DEFAULT_TEMPLATE": TEMPLATE,
    "DEFAULT_INSTRUCT_TEMPLATE": INSTRUCT_TEMPLATE,
    "DEFAULT_MAX_LENGTH": MODEL_MAX_LENGTH,
}


def shell_assignments() -> str:
    """One `NAME=value` line per launcher default, quoted for the shell."""
    return "\n".join(f"{name}={shlex.quote(str(value))}" for name, value in SHELL.items())


if __name__ == "__main__":
    print(shell_assignments())
