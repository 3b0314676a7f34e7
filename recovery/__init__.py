"""Recovery of pruned models: least-squares reconstruction (no training) and LoRA (peft).

* :func:`reconstruct`: refit a pruned model's linear layers block by block so that each block
  reproduces the dense one on calibration data (arXiv 2407.19126, post-pruning);
* :func:`prune_and_reconstruct`: :func:`pruning.prune` block by block with reconstruction
  before and after each block (the paper's pre-pruning recovery, :func:`prune_sequential`),
  composed from pruning's public steps;
* :func:`prune_streamed`: prune a model bigger than memory block by block from its folder
  into another (the same plan and weights as in memory, resumable);
* :func:`train_lora` / :func:`merge`: LoRA adapters trained with the Hugging Face Trainer on
  Alpaca-style or plain text, merged back into the weights;
* :func:`distill`: the pruned model learns the dense model's next-token distributions (full
  parameters or LoRA; the teacher live or its top-k logits cached on disk), with held-out KL
  early stopping, a NaN guard and checkpoints to resume from.
"""

from .distill import DistillDivergedError, DistillResult, DistillSettings, distill
from .lora import LoraDivergedError, LoraResult, LoraSettings, merge, train_lora
from .lstsq import ReconstructionError
from .reconstruct import kept_channels, reconstruct
from .sequential import (
    SequentialSettings,
    prune_and_reconstruct,
    prune_sequential,
    sequential_settings,
)
from .stream import StreamResult, prune_streamed

__all__ = ["reconstruct", "kept_channels", "prune_sequential", "prune_and_reconstruct",
           "SequentialSettings", "sequential_settings", "prune_streamed", "StreamResult",
           "ReconstructionError", "train_lora", "merge", "LoraSettings", "LoraResult",
           "LoraDivergedError", "distill", "DistillSettings", "DistillResult",
           "DistillDivergedError"]
