"""torch.compile for the training step (hardware.compile), applied to every objective the same way.

Regional compilation, in place: each block of a repeated stack (a ModuleList of one class:
transformer layers, ResNet stages) and each other part that holds parameters (embeddings, heads,
projectors) gets nn.Module.compile(). Why this and not the whole objective or Accelerate's
`dynamo_backend`:
- in place keeps parameter names: state_dict, checkpoints and save_pretrained see no `_orig_mod.`
  prefix, so a checkpoint written with compile on loads with it off and the export is a plain model.
  Accelerate wraps the prepared model in an OptimizedModule (or, regionally, a copy with
  OptimizedModule children), which renames parameters for unwrap_model(...).load_state_dict and
  save_pretrained alike;
- the blocks of one stack share one compiled graph: compile time is one layer's, not the model's;
- an objective's own forward (masked-position gathers, sampling) stays eager, so its
  data-dependent shapes cause no graph breaks or recompiles in the heavy parts;
- the same in-place recipe is what Accelerate applies under FSDP2 and DeepSpeed, so it runs before
  accelerator.prepare whatever the engine.

The token cross-entropy every language objective ends in (objectives/functional.py) is compiled on
its own switch, hardware.compile_loss: fused, it reads the (tokens x vocabulary) logits about twice
instead of slicing, upcasting and normalising them in separate full-size copies, which is most of
the loss's cost at GPT-2's vocabulary (docs/benchmarks.md), and it pays off even where compiling
the model does not (on CPU).
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
from omegaconf import DictConfig

from ssltrain.objectives.functional import use_compiled_loss


def compile_objective(objective: torch.nn.Module, hw: DictConfig) -> int:
    """Compile the objective's regions in place when hw.compile is true (mode: hw.compile_mode), and
    route the token cross-entropy through torch.compile when hw.compile_loss is true (else eager).
    Returns the number of modules compiled (0 when off)."""
    use_compiled_loss(bool(hw.get("compile_loss", False)) and loss_compiler_available(hw.device))
    if not hw.get("compile", False):
        return 0
    return compile_regions(objective, mode=hw.get("compile_mode", "default"))


def loss_compiler_available(device: str) -> bool:
    """Inductor builds CPU kernels with a C++ compiler (CXX, else g++/c++/clang++ on PATH). Without
    one, compile_loss on CPU warns once and the loss runs eagerly: same results, only slower."""
    if device != "cpu" or any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        return True
    warnings.warn("hardware.compile_loss=true needs a C++ compiler on CPU (none found: set CXX or install "
                  "g++); the loss runs eagerly", stacklevel=2)
    return False


def compile_regions(module: torch.nn.Module, **compile_kwargs) -> int:
    """nn.Module.compile(**compile_kwargs) on each block of every repeated stack in `module` and on
    every other subtree that holds parameters; returns the number of modules compiled."""
    if _is_repeated_blocks(module):
        for block in module:
            block.compile(**compile_kwargs)
        return len(module)
    if not any(_is_repeated_blocks(m) for m in module.modules()):
        if next(module.parameters(), None) is None:
            return 0  # nothing to speed up (activations, pooling)
        module.compile(**compile_kwargs)
        return 1
    return sum(compile_regions(child, **compile_kwargs) for child in module.children())


def _is_repeated_blocks(module: torch.nn.Module) -> bool:
    return (isinstance(module, torch.nn.ModuleList) and len(module) > 1
            and all(type(m) is type(module[0]) for m in module))
