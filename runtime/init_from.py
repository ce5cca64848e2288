"""Components that start from a Loom model file (``components.<name>.init_from``) instead of their seeded
initialisation: e.g. a feedback phase's reward-model layers from the reward-model phase's ``@rm/checkpoint``.

A Loom model file (runtime.reference.save_model: ``{"parameters": {"<module>/<layer>/<param>": tensor}}``) names a
parameter by its module (a parameter group such as ``attribute_rm`` or ``unet#2``, ``embed:<component>``,
``adapt:<component>``), layer and parameter name. A module of a component with ``init_from`` is built as usual
(runtime.modules.build_layer, runtime.embeddings.build_embed, runtime.connect.build_adapter), then every parameter takes
the file's tensor of the same name (:func:`load_initial`): the module must be in the file whole, at the same shapes.
Every worker and the single-process reference load the same file, so their modules start equal.

:func:`model_file_of` (torch-free: runtime.checks calls it before anything runs) finds the file a path names.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from planner.errors import LoomError

MODEL_FILE = "model.pt"  # a run's trained parameters, in its --out (runtime.reference.save_model writes it)

if TYPE_CHECKING:
    import torch
    from torch import nn


def model_file_of(path: str | Path) -> Path:
    """The Loom model file ``path`` names: the file itself, or the first ``model.pt`` in the folder or up to two
    folders above (a trained phase's ``@<phase>/checkpoint``, ``OUT/<phase>/ckpt/step_<k>``, finds
    ``OUT/<phase>/model.pt``). FileNotFoundError, one line, otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path.parent, path.parent.parent):
        if (folder / MODEL_FILE).is_file():
            return folder / MODEL_FILE
    raise FileNotFoundError(f"{path}: no {MODEL_FILE} there or up to two folders above; name a Loom run's "
                            f"{MODEL_FILE} or a trained phase's '@<phase>/checkpoint'.")


class ModelFileError(LoomError):
    """A model file is missing, unreadable or made for another job."""


def load_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters runtime.reference.save_model wrote; a ModelFileError naming the file when it is missing or not
    one. (Here, not in runtime.reference, so that a worker loading ``init_from`` imports no single-process trainer.)"""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file; `loom run` writes {MODEL_FILE} into its --out directory.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise ModelFileError(f"{path}: not a Loom model file ({type(err).__name__}).") from None
    if not isinstance(state, dict) or "parameters" not in state:
        raise ModelFileError(f"{path}: not a Loom model file (no 'parameters').")
    return state["parameters"]


@functools.lru_cache(maxsize=4)
def _parameters(path: str) -> dict[str, torch.Tensor]:
    return load_model(model_file_of(path))


def load_initial(module: nn.Module, component: str, init_from: str | None, name: str, layer: int) -> nn.Module:
    """``module`` (module ``name`` layer ``layer`` of ``component``) with every parameter copied from the model file
    ``init_from`` names (unchanged when it is None). A ValueError, one line, when the file lacks one of them or holds
    it at another shape: a file of another job."""
    if init_from is None:
        return module
    import torch

    params = _parameters(init_from)
    prefix = f"{name}/{layer}/"
    for pname, p in module.named_parameters():
        tensor = params.get(prefix + pname)
        if tensor is None or tensor.shape != p.shape:
            found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}, not {tuple(p.shape)}"
            raise ValueError(f"components.{component}.init_from ({init_from}): parameter {prefix + pname} is {found} "
                             f"in {model_file_of(init_from)}; name the model of a run whose component '{component}' "
                             "has this shape.")
        with torch.no_grad():
            p.copy_(tensor)
    return module
