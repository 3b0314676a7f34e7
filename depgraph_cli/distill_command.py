"""``depgraph recover DIR --method distill``: the options and the run (see recover_command).

The pruned model (the student) learns the dense model's next-token distributions on windows
of ``--data`` (text, BOS first where the tokenizer adds one; training windows from the first
90% of every document, held-out windows from the rest). The dense model runs in the same
process, or with ``--top-k K`` it runs once first and its top-K logits are cached on disk
(``--teacher-cache``, default ``OUT.teacher-cache``) and freed before training, for models
that do not fit twice. Checkpoints go to ``--checkpoint`` (default ``OUT.checkpoint``) every
``--checkpoint-steps``; a run that died continues with ``--resume``. Both folders are removed
after a successful run unless named explicitly.
"""

from __future__ import annotations

import argparse
import gc
import shutil
from pathlib import Path

from .argtypes import positive_float, positive_int

__all__ = ["add_distill_arguments", "check_distill_data", "run_distill", "distill_settings",
           "remove_work_folders"]


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``distill`` group (it shares --data, --lr, --batch-size, --seq-len, --eval-steps,
    --patience, --r, --alpha, --dropout, --precision with ``lora``)."""
    group = parser.add_argument_group("distill (also reads --data --lr --batch-size --seq-len "
                                      "--eval-steps --patience --r --alpha --dropout "
                                      "--precision)")
    group.add_argument("--params", default="full", choices=["full", "lora"],
                       help="train every block parameter (full) or LoRA adapters (default full)")
    group.add_argument("--temperature", type=positive_float, default=1.0,
                       help="softmax temperature of the KL (default 1.0)")
    group.add_argument("--lm-weight", type=float, default=0.0,
                       help="share (0-1) of the language-model loss in the mix (default 0)")
    group.add_argument("--tokens", type=positive_int, default=30_000,
                       help="training tokens (the budget; default 30000)")
    group.add_argument("--seconds", type=positive_float, default=None,
                       help="time budget of the run: after the warm-up the steps are set from "
                            "the measured rate, at most what --tokens buys (default: none)")
    group.add_argument("--val-windows", type=positive_int, default=16,
                       help="held-out windows for the KL that stops early (default 16)")
    group.add_argument("--top-k", type=int, default=0,
                       help="cache the teacher's top-K logits on disk and free it before "
                            "training (0: run the teacher alongside, the default)")
    group.add_argument("--teacher-cache", type=Path, default=None,
                       help="folder of the top-K cache (default OUT.teacher-cache)")
    group.add_argument("--checkpoint", type=Path, default=None,
                       help="checkpoint folder (default OUT.checkpoint)")
    group.add_argument("--checkpoint-steps", type=positive_int, default=50)
    group.add_argument("--resume", action="store_true",
                       help="continue the run whose checkpoint is in --checkpoint")


def distill_settings(args: argparse.Namespace):
    from recovery.distill import DistillSettings

    return DistillSettings(params=args.params, temperature=args.temperature,
                           lm_weight=args.lm_weight, learning_rate=args.lr,
                           batch_size=args.batch_size, seq_len=args.seq_len, tokens=args.tokens,
                           val_windows=args.val_windows, eval_steps=args.eval_steps,
                           patience=args.patience, checkpoint_steps=args.checkpoint_steps,
                           r=args.r, alpha=args.alpha, dropout=args.dropout, seed=args.seed,
                           precision=args.precision, seconds=args.seconds)


def check_distill_data(args: argparse.Namespace) -> None:
    """Options and data checked before any work (a ValueError names the bad one)."""
    from pruning.calibration import check_source
    from recovery.lora_data import is_instruction_source

    if args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (live teacher) or a positive integer, got {args.top_k}")
    if is_instruction_source(args.data):
        raise ValueError(f"--data {args.data!r} holds instruction records; distillation reads "
                         "text windows (a text file or folder, 'bundled', 'wikitext2', hf:NAME)")
    check_source(args.data)
    distill_settings(args)  # every value checked
    checkpoint = _checkpoint_dir(args)
    if (checkpoint / "checkpoint.pt").is_file() and not args.resume:
        raise ValueError(f"{str(checkpoint)!r} holds a checkpoint of an earlier run: pass "
                         "--resume to continue it, or remove it")
    if args.resume and not (checkpoint / "checkpoint.pt").is_file():
        raise ValueError(f"--resume: no checkpoint in {str(checkpoint)!r}")


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    return args.checkpoint or args.out.with_name(args.out.name + ".checkpoint")


def _cache_dir(args: argparse.Namespace) -> Path:
    return args.teacher_cache or args.out.with_name(args.out.name + ".teacher-cache")


def _windows(tokenizer, args: argparse.Namespace, settings):
    from pruning.calibration import calibration_tokens

    train = calibration_tokens(tokenizer, args.data, n_samples=settings.train_windows,
                               seq_len=settings.seq_len, seed=args.seed, region=(0.0, 0.9))
    val = calibration_tokens(tokenizer, args.data, n_samples=settings.val_windows,
                             seq_len=settings.seq_len, seed=args.seed + 1, region=(0.9, 1.0))
    return train, val


def _teacher(dense_source, tokens, args: argparse.Namespace):
    """The live dense model, or (``--top-k``) its cached top-k logits, written once."""
    from recovery.teacher import CachedTeacher, read_cache_meta, write_teacher_cache

    from .model_checks import check_finite
    from .models import load_model

    if args.top_k == 0:
        dense = load_model(dense_source)
        check_finite(dense, str(dense_source))
        return dense.float()
    folder = _cache_dir(args)
    if read_cache_meta(folder) is None or read_cache_meta(folder)["top_k"] != args.top_k:
        dense = load_model(dense_source)
        check_finite(dense, str(dense_source))
        print(f"caching the teacher's top-{args.top_k} logits of {tokens.shape[0]} windows in "
              f"{folder} ...", flush=True)
        write_teacher_cache(dense.float(), tokens, folder, top_k=args.top_k,
                            batch_size=args.batch_size)
        del dense
        gc.collect()
    return CachedTeacher(folder, tokens)


def run_distill(model, tokenizer, dense_source, args: argparse.Namespace) -> tuple:
    """Distil the dense model into ``model``; ``(model, stats, None)`` like the other methods."""
    import torch

    from recovery.distill import distill

    settings = distill_settings(args)
    train, val = _windows(tokenizer, args, settings)
    teacher = _teacher(dense_source, torch.cat([train[:settings.train_windows], val]), args)
    dtype = next(model.parameters()).dtype
    checkpoint = _checkpoint_dir(args)
    source = f"top-{args.top_k} cache" if args.top_k else "live teacher"
    print(f"distilling {dense_source} into the pruned model: {settings.steps} steps of "
          f"{settings.batch_size} x {settings.seq_len} tokens of {args.data} "
          f"({settings.params}, {source})", flush=True)
    result = distill(model.float(), teacher, train, val, settings, checkpoint=checkpoint,
                     resume=args.resume, progress=lambda line: print(line, flush=True))
    return result.model.to(dtype), result.stats, None


def remove_work_folders(args: argparse.Namespace) -> None:
    """After the output is saved: the checkpoint and cache folders that were not named."""
    if args.checkpoint is None:
        shutil.rmtree(_checkpoint_dir(args), ignore_errors=True)
    if args.top_k and args.teacher_cache is None:
        shutil.rmtree(_cache_dir(args), ignore_errors=True)
