"""Starting a fine-tune that adds a trainable part to a trained model (`moeflow train --init CKPT`
with `--pregate` heads or a `--lookahead` router).

The model is built with the part; the checkpoint may or may not hold one. Its own part continues
training when every tensor fits (same names and shapes, e.g. the same rank); otherwise the part
starts from the layers' routers (`init_from_routers`, each part's own rule). Every other tensor
of the checkpoint must fit the model exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def load_with_added_part(model: nn.Module, state: dict[str, torch.Tensor], part: str,
                         dropped: tuple[str, ...] = ()) -> None:
    """Load `state` into `model`, whose attribute `part` is the added module. Checkpoint tensors
    under the `dropped` prefixes are left out (parts the new model no longer uses)."""
    prefix = part + "."
    state = {k: v for k, v in state.items() if not k.startswith(dropped)} if dropped else state
    mine = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    fits = all(k in state and state[k].shape == v.shape for k, v in mine.items()) and \
        not any(k.startswith(prefix) and k not in mine for k in state)
    kept = {k: v for k, v in state.items() if fits or not k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    wrong = unexpected + [k for k in missing if not k.startswith(prefix)]
    if wrong:
        raise ValueError(f"--init checkpoint does not fit the model: tensor {wrong[0]!r}")
    if missing:
        getattr(model, part).init_from_routers([m.router for m in model.moe_layers()])
