"""The pruning pipeline ``depgraph prune`` and ``depgraph demo`` run when not told otherwise.

One place, so that the command and the demo cannot drift apart; each value is the best
measured on SmolLM2-135M at 20% (``benchmarks/RESULTS.md``, same evaluation in every cell:
WikiText-2 raw test, first 16384 tokens, windows of 128):

* criterion ``second_moment``: 143.8 one-shot, against 249 for ``taylor`` (the old default);
* ranking: ``allocate`` where the pruned model is reconstructed (110.9 against 124.1 for the
  global ranking, sequential reconstruction), ``global`` for a one-shot prune (143.8 against
  147.8 for allocation, which also costs a forward pass per group and candidate width);
* rounding: the demo (SmolLM2 by default, and it reports speed) keeps MLP widths at multiples
  of 64: 1.20x generation against 1.15x unrounded, and with allocation and refit 112.6 at
  20%, better than the old unrounded global pipeline (125.4). ``depgraph prune`` rounds to 1:
  it takes any model, and a model whose MLPs are narrower than a few multiples of 64 would
  have nothing left to prune;
* recovery: the demo refits the pruned model and then distils the dense model into it
  (81920 tokens: 90.6 at 20% against 112.6 without, the whole demo in 18.5 minutes;
  ``depgraph_cli.demo.DemoSettings.distill_tokens``).
"""

from __future__ import annotations

__all__ = ["IMPORTANCE", "RANKING", "RANKING_ONE_SHOT", "ROUND_TO", "DEMO_ROUND_TO", "KINDS", "ranking"]

IMPORTANCE = "second_moment"
RANKING = "allocate"  # when the pruned model is reconstructed
RANKING_ONE_SHOT = "global"
ROUND_TO = 1
DEMO_ROUND_TO = 64
KINDS = "mlp,attention"


def ranking(reconstruct: bool) -> str:
    """The default ranking of a run that reconstructs the pruned model or not."""
    return RANKING if reconstruct else RANKING_ONE_SHOT
