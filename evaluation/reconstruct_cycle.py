"""The default path of ``depgraph prune --reconstruct``, checked on one model type.

:func:`reconstruct_row` builds a model type's tiny config (:func:`evaluation.cycle.tiny_dense_model`)
and does what a user of that command does: :func:`recovery.prune_and_reconstruct` with the
allocation ranking (the groups that the sequential pass cannot refit kept whole), a forward
of the pruned model, ``save_pretrained``, :func:`pruning.load_pruned` (the same logits) and
``generate`` on the reloaded model. The outcome is a :class:`evaluation.cycle.CycleRow`:
``pass``; ``refused`` when the tool stopped with its own one-line reason (a depgraph error,
or a ``ValueError`` raised in this project's code: "ratio 0.1 cannot be reached", "none of
the groups ... can be pruned with sequential reconstruction"); ``unconstructible`` when the
tiny config fails in transformers itself; ``FAIL`` for anything else (a crash, a mismatch).
``benchmarks/coverage.py --path reconstruct`` runs it over every causal-LM type.
"""

from __future__ import annotations

import copy
import tempfile
import traceback
from pathlib import Path

import torch

from depgraph import DepGraphError
from pruning import load_pruned
from recovery import prune_and_reconstruct

from .cycle import CycleFailure, CycleRow, _logits, _one_line, _same, _tolerance, tiny_dense_model

__all__ = ["reconstruct_row"]

_PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name)
                  for name in ("depgraph", "pruning", "recovery", "evaluation"))


def _refusal(error: BaseException) -> bool:
    """The tool's own reason: a depgraph error, or a ValueError raised in this project."""
    if isinstance(error, DepGraphError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, ValueError) and bool(frames) and frames[-1].filename.startswith(_PACKAGES)


def reconstruct_row(model_type: str, seed: int = 0, *, ratio: float = 0.1,
                    importance: str = "second_moment", ranking: str = "allocate") -> CycleRow:
    """Prune ``model_type``'s tiny model with reconstruction, run, save, reload, generate."""
    try:
        model = tiny_dense_model(model_type, seed).float().eval()
    except ValueError as error:
        return CycleRow(model_type, "unconstructible", _one_line(error))
    vocab = model.config.get_text_config().vocab_size
    tokens = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(seed))
    try:
        result = prune_and_reconstruct(copy.deepcopy(model), ratio=ratio, importance=importance,
                                       ranking=ranking, tokens=tokens, recon_tokens=tokens[:4])
    except Exception as error:  # noqa: BLE001 - sorted into refusals and failures
        status = "refused" if _refusal(error) else "FAIL"
        return CycleRow(model_type, status, f"{type(error).__name__}: {_one_line(error)}")
    try:
        pruned = result.model.eval()
        ids = tokens[:2]
        want = _logits(pruned, ids)
        if not torch.isfinite(want).all():
            return CycleRow(model_type, "FAIL", "non-finite logits after reconstruction")
        with tempfile.TemporaryDirectory() as folder:
            pruned.save_pretrained(folder)
            back = load_pruned(folder).float().eval()
            _same("save_pretrained + load_pruned", _logits(back, ids), want, _tolerance(pruned))
            back.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False)
    except CycleFailure as error:
        return CycleRow(model_type, "FAIL", _one_line(error))
    except Exception as error:  # noqa: BLE001 - after a prune, every error is a failure
        return CycleRow(model_type, "FAIL", f"{type(error).__name__}: {_one_line(error)}")
    stats = result.stats
    detail = (f"removed {100 * stats['ratio_removed']:.1f}%; groups pruned {len(result.plan)}, "
              f"kept whole {len(stats.get('kept_whole', []))}, "
              f"estimated {len(stats.get('allocation_estimated', []))}")
    return CycleRow(model_type, "pass", "", detail)
