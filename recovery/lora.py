"""LoRA recovery of a pruned model with peft and the Hugging Face ``Trainer``.

    >>> result = train_lora(model, tokenizer, "alpaca.json", LoraSettings(max_steps=200))
    ...                                                                  # doctest: +SKIP

What LLM-Pruner does after pruning (rank 8 adapters on every linear layer of the blocks,
Alpaca data), with the guards its recovery lacked:

* adapters on every ``nn.Linear`` / ``Conv1D`` inside the model's blocks (found as in
  :mod:`recovery.blocks`; the head and the embeddings stay frozen), fp32 adapter weights
  whatever the base dtype, bf16 autocast where the device multiplies it natively (a GPU, or
  a CPU with AMX / AVX512-BF16: :mod:`recovery.precision`), torch's fused AdamW;
* a validation split: validation loss and perplexity every ``eval_steps``, the best
  checkpoint kept, training stopped after ``patience`` evaluations without improvement
  (LLM-Pruner's recovery was seen to overfit after a few hundred steps);
* a non-finite training loss stops at once with :class:`LoraDivergedError`;
* it is the ordinary ``Trainer``: ``accelerate launch`` / ``torchrun`` run it on several
  processes or GPUs unchanged (only the main process writes the output).

:func:`merge` folds the adapters into the weights (``merge_and_unload``) and returns the
plain pruned model, which saves as a normal folder.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from depgraph.errors import NonFiniteError
from pruning.checks import check_int

from .blocks import find_blocks
from .precision import check_precision, fused_adamw_ok, resolve_precision
from .structure import linear_layers

__all__ = ["LoraSettings", "LoraDivergedError", "LoraResult", "lora_targets", "train_lora",
           "merge"]


class LoraDivergedError(NonFiniteError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA and training options (defaults: LLM-Pruner's r=8, alpha=16, dropout 0.05)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    learning_rate: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    seq_len: int = 256
    max_examples: int = 1000
    val_fraction: float = 0.1
    eval_steps: int = 50
    patience: int = 3
    warmup_steps: int = 10
    train_on_inputs: bool = False
    seed: int = 0
    precision: str = "auto"  # training forward: bf16 autocast where native (recovery.precision)

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "batch_size", "grad_accum", "seq_len", "eval_steps", "patience"):
            check_int(name, getattr(self, name))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise ValueError(f"epochs must be positive (or set max_steps), got {self.epochs!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check_precision(self.precision)


@dataclass
class LoraResult:
    model: nn.Module  # the peft model (adapters not merged)
    history: list[dict]
    stats: dict


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the model's blocks."""
    path, blocks = find_blocks(model)
    return [f"{path}.{index}.{name}" for index, block in enumerate(blocks)
            for name in linear_layers(block)]


class _Collator:
    """Pads a batch of examples on the right (labels with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _quiet(progress) -> bool:
    """No Trainer bars without a progress callback, or when stderr is not a terminal."""
    return progress is None or not sys.stderr.isatty()


def _trainer_class():
    from transformers import Trainer

    class GuardedTrainer(Trainer):
        """A Trainer that stops at the first non-finite training loss."""

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            if not torch.isfinite(loss.detach()).all():
                raise LoraDivergedError(
                    f"LoRA training loss became {loss.item()} at step {self.state.global_step + 1}; "
                    "lower the learning rate or check the data")
            return loss

    return GuardedTrainer


def _callbacks(settings: LoraSettings, history: list[dict], progress):
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Report(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = float((metrics or {}).get("eval_loss", float("nan")))
            row = {"step": state.global_step, "eval_loss": loss,
                   "eval_ppl": math.exp(loss) if loss < 50 else float("inf")}
            history.append(row)
            if state.is_world_process_zero and progress is not None:
                progress(f"step {row['step']}: validation loss {loss:.4f}, "
                         f"perplexity {row['eval_ppl']:.2f}")

    return [Report(), EarlyStoppingCallback(early_stopping_patience=settings.patience)]


def train_lora(model: nn.Module, tokenizer, data, settings: LoraSettings = LoraSettings(), *,
               output_dir: str | None = None, progress=print) -> LoraResult:
    """Train LoRA adapters on ``data`` (a source for :func:`recovery.lora_data.load_examples`,
    or a ``(train, validation)`` pair of example lists); returns the peft model and history.
    The Trainer's checkpoints go to ``output_dir``, or without one to a temporary folder that
    is removed when training ends (or fails)."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from .lora_data import load_examples

    if output_dir is None:  # the Trainer's checkpoints, removed once the best is loaded back
        with tempfile.TemporaryDirectory(prefix="depgraph-lora-") as workdir:
            return train_lora(model, tokenizer, data, settings, output_dir=workdir,
                              progress=progress)
    start = time.perf_counter()
    if isinstance(data, tuple):
        train, val = data
    else:
        train, val = load_examples(tokenizer, data, seq_len=settings.seq_len,
                                   max_examples=settings.max_examples,
                                   val_fraction=settings.val_fraction, seed=settings.seed,
                                   train_on_inputs=settings.train_on_inputs)
    if not train or not val:
        raise ValueError(f"LoRA needs training and validation examples, got {len(train)} and "
                         f"{len(val)}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=lora_targets(model), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)  # adapters in fp32 (autocast_adapter_dtype)
    history: list[dict] = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    adapters = [p for p in peft_model.parameters() if p.requires_grad]
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        warmup_steps=settings.warmup_steps, eval_strategy="steps", eval_steps=settings.eval_steps,
        save_strategy="steps", save_steps=settings.eval_steps, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=min(10, settings.eval_steps), report_to=[], seed=settings.seed,
        bf16=resolve_precision(settings.precision, device) == "bf16",
        use_cpu=device.type == "cpu", remove_unused_columns=False,
        optim="adamw_torch_fused" if fused_adamw_ok(adapters) else "adamw_torch",
        disable_tqdm=_quiet(progress), save_only_model=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = _trainer_class()(model=peft_model, args=args, train_dataset=train, eval_dataset=val,
                               data_collator=_Collator(int(pad or 0)),
                               callbacks=_callbacks(settings, history, progress))
    first = trainer.evaluate()
    output = trainer.train()
    # the Trainer ran the model's forward in bf16 autocast (a wrapper left on the model): take
    # it off, so that the returned model computes in its own dtype, as it will once merged
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    best = min((row["eval_loss"] for row in history), default=first["eval_loss"])
    stats = {"method": "lora", **asdict(settings), "train_examples": len(train),
             "val_examples": len(val), "steps": int(output.global_step),
             "train_loss": float(output.training_loss), "val_loss_before": float(first["eval_loss"]),
             "val_loss_best": float(best), "val_ppl_before": math.exp(first["eval_loss"]),
             "val_ppl_best": math.exp(best), "bf16": args.bf16,
             "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
             "seconds": round(time.perf_counter() - start, 2),
             "world_size": int(args.world_size), "is_main_process": trainer.is_world_process_zero()}
    peft_model.eval()
    return LoraResult(peft_model, history, stats)


def merge(peft_model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the adapters into the weights; the plain model (config and plan record kept)."""
    merged = peft_model.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    return merged.eval()
