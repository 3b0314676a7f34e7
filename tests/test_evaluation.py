"""Tests of the evaluation package: perplexity, zero-shot scoring, agreement, efficiency, tables."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluation
import evaluation.zeroshot_data as zd
from depgraph.paths import data_dir, models_dir
from evaluation import (
    MCItem,
    compare,
    count_parameters,
    efficiency_report,
    evaluate_task,
    evaluate_zeroshot,
    format_table,
    load_task,
    load_text,
    loglikelihoods,
    macs_per_token,
    next_token_agreement,
    peak_forward_memory,
    perplexity,
    score_items,
    token_windows,
    weight_memory_bytes,
)

torch.set_num_threads(2)

TINY = models_dir() / "stories260K"
WIKI = data_dir() / "wikitext-2-raw" / "test.txt"
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")
needs_wiki = pytest.mark.skipif(not WIKI.is_file(), reason="offline WikiText-2 missing")
needs_piqa = pytest.mark.skipif(
    not (data_dir() / "zeroshot" / "piqa.jsonl").is_file(), reason="offline piqa missing"
)


# ---------------------------------------------------------------- fakes with known log-probs

class CharTokenizer:
    """One token per latin-1 character, no BOS, EOS = 0."""

    bos_token_id = None
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("latin-1"))


class UnigramLM(nn.Module):
    """Same next-token distribution at every position."""

    def __init__(self, probs: dict[str, float]) -> None:
        super().__init__()
        rest = (1.0 - sum(probs.values())) / (256 - len(probs))
        table = torch.full((256,), rest, dtype=torch.float64)
        for char, p in probs.items():
            table[ord(char)] = p
        self.register_buffer("logp", table.log().float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logp.expand(*ids.shape, 256).clone()


class SuccessorLM(nn.Module):
    """p(next = prev + 1) = 0.9, every other token 0.1 / 255."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.full((*ids.shape, 256), math.log(0.1 / 255))
        return out.scatter(-1, ((ids + 1) % 256)[..., None], math.log(0.9))


HIT, MISS = math.log(0.9), math.log(0.1 / 255)


# ---------------------------------------------------------------- real tiny model fixtures

@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(TINY)).eval()
    return model, AutoTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def wiki_ids(tiny):
    """The text's own tokens (no BOS)."""
    _, tokenizer = tiny
    return torch.tensor(tokenizer(load_text("wikitext2"), add_special_tokens=False).input_ids)


# ---------------------------------------------------------------- perplexity

@needs_tiny
@needs_wiki
def test_perplexity_matches_plain_loop(tiny, wiki_ids) -> None:
    """stories260K's tokenizer adds BOS: every window is BOS + 127 text tokens, and every
    text token in it is scored (BOS never is)."""
    model, tokenizer = tiny
    bos = tokenizer.bos_token_id
    result = perplexity(model, tokenizer, load_text("wikitext2"), seq_len=128, max_tokens=4064)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 4064, 127):
            window = torch.cat([torch.tensor([bos]), wiki_ids[start : start + 127]])
            logits = model(window[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += 127
    expected = math.exp(nll / count)
    assert result["windows"] == 32 and result["tokens"] == count and result["seq_len"] == 128
    assert result["bos"] == bos
    assert result["ppl"] == pytest.approx(expected, rel=5e-3)
    assert result["nll"] == pytest.approx(nll / count, rel=1e-4)
    # token ids with the tokenizer, or ready windows, give the same; batch size changes nothing
    again = perplexity(model, tokenizer, wiki_ids, seq_len=128, batch_size=7, max_tokens=4064)
    assert again["ppl"] == pytest.approx(result["ppl"], rel=1e-5)
    windows = evaluation.text_windows(tokenizer, load_text("wikitext2"), 128, max_tokens=4064)
    assert windows.shape == (32, 128) and (windows[:, 0] == bos).all()
    ready = perplexity(model, None, windows, batch_size=5)
    assert ready["ppl"] == pytest.approx(result["ppl"], rel=1e-5) and ready["tokens"] == count
    # bos=False: LLM-Pruner's windows (128 text tokens, the first of each not scored)
    plain = perplexity(model, tokenizer, load_text("wikitext2"), seq_len=128, max_tokens=4096,
                       bos=False)
    assert plain["tokens"] == 32 * 127 and plain["bos"] is None
    assert plain["ppl"] != pytest.approx(result["ppl"], rel=1e-3)


class BosCharTokenizer(CharTokenizer):
    """CharTokenizer whose own encoding starts every text with BOS (token 1)."""

    bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * add_special_tokens + super().encode(text)


def test_bos_is_context_never_a_scored_token() -> None:
    """A model that gives BOS (almost) no probability: were BOS ever a target, the NLL would
    blow up; each window's first text token is scored, after BOS."""
    model = UnigramLM({"\x01": 1e-30, "a": 0.5})
    result = perplexity(model, BosCharTokenizer(), "a" * 40, seq_len=5)
    assert result["windows"] == 10 and result["tokens"] == 40 and result["bos"] == 1
    assert result["nll"] == pytest.approx(-math.log(0.5), abs=1e-5)
    windows = evaluation.token_windows(list(range(10, 20)), 4, bos=1)
    assert windows.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]
    assert perplexity(model, CharTokenizer(), "a" * 40, seq_len=5)["bos"] is None


def test_zeroshot_context_starts_with_bos_where_the_tokenizer_adds_one() -> None:
    from evaluation import encode_pair

    ctx, cont = encode_pair(BosCharTokenizer(), "Q:", " a")
    assert ctx == [1, ord("Q"), ord(":")] and cont == [ord(" "), ord("a")]
    assert encode_pair(CharTokenizer(), "Q:", " a")[0] == [ord("Q"), ord(":")]
    assert encode_pair(BosCharTokenizer(), "Q:", " a", add_bos=False)[0] == [ord("Q"), ord(":")]


@needs_wiki
def test_wikitext2_offline_string() -> None:
    text = load_text("wikitext2")  # "\n\n".join(rows), rows = ["", " = Robert Boulter = \n", "", ...]
    assert "\r" not in text and len(text.encode("utf-8")) == 1_296_370
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")


def test_ptb_offline_joins_sentences(tmp_path, monkeypatch) -> None:
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_bytes(b" a b c \r\n d e \r\n")
    monkeypatch.setenv("DEPGRAPH_DATA", str(tmp_path))
    assert load_text("ptb") == "a b c\n\nd e"


def test_token_windows_drop_remainder() -> None:
    windows = token_windows(list(range(10)), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(torch.arange(10), 3, max_tokens=7).shape == (2, 3)


# ---------------------------------------------------------------- zero-shot

def test_zeroshot_hand_computed_acc_and_acc_norm(tmp_path) -> None:
    model = UnigramLM({" ": 0.25, "a": 0.5, "b": 0.125})
    # " aaaa": log .25 + 4 log .5 = -4.159 (per char -1.040); " b": log .25 + log .125 = -3.466
    # so acc picks "b" (index 1) and acc_norm picks "aaaa" (index 0).
    path = tmp_path / "mytask.jsonl"
    rows = [{"query": "Q:", "choices": ["aaaa", "b"], "gold": 0},
            {"query": "Q:", "choices": ["aaaa", "b"], "gold": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = CharTokenizer()
    both = evaluate_task(model, tok, str(path))
    assert both == {"acc": 0.5, "acc_norm": 0.5, "acc_stderr": 0.5, "acc_norm_stderr": 0.5, "n": 2}
    first = score_items(model, tok, [MCItem(("Q:", "Q:"), ("aaaa", "b"), 0)])
    assert {k: first[k] for k in ("acc", "acc_norm", "n")} == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert math.isnan(first["acc_stderr"])  # one item: no standard error
    scores = loglikelihoods(model, tok, [("Q:", " aaaa"), ("Q:", " b")])
    assert scores[0][0] == pytest.approx(math.log(0.25) + 4 * math.log(0.5), abs=1e-5)
    assert scores[1][0] == pytest.approx(math.log(0.25) + math.log(0.125), abs=1e-5)
    results = evaluate_zeroshot(model, tok, [path], limit=1)
    assert {k: results["mytask"][k] for k in ("acc", "acc_norm", "n")} == \
        {"acc": 0.0, "acc_norm": 1.0, "n": 1}


@pytest.mark.parametrize("correct, n", [(27, 60), (1, 7), (0, 5), (400, 1000)])
def test_accuracy_stderr_is_lm_eval_mean_stderr(correct, n) -> None:
    """lm-evaluation-harness: sample standard deviation of the 0/1 scores over sqrt(n)."""
    import numpy as np

    from evaluation import accuracy_stderr

    scores = np.array([1.0] * correct + [0.0] * (n - correct))
    expected = scores.std(ddof=1) / math.sqrt(n)
    assert accuracy_stderr(correct / n, n) == pytest.approx(expected, abs=1e-12)


def test_loglikelihood_alignment_and_batching() -> None:
    model, tok = SuccessorLM(), CharTokenizer()
    requests = [("ab", "cd"), ("ab", "x"), ("abc ", "d"), ("", "a"), ("xyz", "{|")]
    expected = [(2 * HIT, True), (MISS, False), (2 * MISS, False), (MISS, False), (2 * HIT, True)]
    for batch_size in (1, 2, 16):
        got = loglikelihoods(model, tok, requests, batch_size=batch_size)
        for (score, greedy), (want, want_greedy) in zip(got, expected, strict=True):
            assert score == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_winogrande_partial_scoring(tmp_path) -> None:
    # the shared continuation " b" scores log .9 after a context ending in "a", else a miss
    path = tmp_path / "wino.jsonl"
    row = {"context_options": ["x z", "x a"], "continuation": "b", "gold": 1}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    tok = CharTokenizer()

    class AfterSpaceB(SuccessorLM):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out = super().forward(ids)
            # boost "b" after " " only when the token two back is "a"
            prev2 = torch.roll(ids, 1, dims=1) == ord("a")
            out[..., ord("b")] = torch.where(prev2 & (ids == ord(" ")), 0.0, -20.0)
            return out

    assert evaluate_task(AfterSpaceB(), tok, path)["acc"] == 1.0


@needs_tiny
@needs_piqa
def test_piqa_real_items(tiny) -> None:
    model, tokenizer = tiny
    result = evaluate_zeroshot(model, tokenizer, "piqa", limit=10)["piqa"]
    assert result["n"] == 10
    assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0


@needs_piqa
def test_harness_prompts() -> None:
    _, items = load_task("piqa", limit=2)
    assert items[0].contexts[0].startswith("Question: ") and items[0].contexts[0].endswith("\nAnswer:")
    _, raw = load_task("piqa", limit=2, prompt_style="raw")
    assert raw[0].contexts[0].endswith("\n") and len(raw) == 2


def test_hf_fallback_converts_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DEPGRAPH_DATA", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))
    rows = {
        ("allenai/winogrande", "winogrande_xl"): [
            {"sentence": "Sam beat Max so _ won.", "option1": "Sam", "option2": "Max", "answer": "1"}],
        ("allenai/ai2_arc", "ARC-Easy"): [
            {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}],
        ("Rowan/hellaswag",): [{"activity_label": "Act", "ctx_a": "A man", "ctx_b": "he",
                                "endings": ["runs [title] away.", "sits."], "label": "0"}],
    }
    monkeypatch.setattr(zd, "_hf_load", lambda args, split: rows[args])
    _, [wino] = load_task("winogrande")
    assert wino == MCItem(("Sam beat Max so Sam", "Sam beat Max so Max"), ("won.", "won."), 0)
    _, [arc] = load_task("arc_easy")
    assert arc == MCItem(("Question: Q?\nAnswer:",) * 2, ("x", "y"), 1)
    _, [hella] = load_task("hellaswag")
    assert hella.contexts[0] == "Act: A man He" and hella.continuations == ("runs. away.", "sits.")


# ---------------------------------------------------------------- agreement

@needs_tiny
def test_agreement_self_and_perturbed(tiny, wiki_ids) -> None:
    model, _ = tiny
    windows = token_windows(wiki_ids, 64, max_tokens=512)
    same = next_token_agreement(model, model, windows)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["top1"] == 1.0
    assert same["tokens"] == 512
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diff = next_token_agreement(model, noisy, windows, batch_size=3)
    assert diff["kl"] > 0 and diff["kl_max"] >= diff["kl"] and 0 <= diff["top1"] <= 1


# ---------------------------------------------------------------- efficiency

@needs_tiny
def test_efficiency_numbers(tiny) -> None:
    model, _ = tiny
    n_params = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == n_params
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_memory_bytes(model) == 4 * n_params + buffers
    macs = macs_per_token(model, seq_len=32)
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    assert macs["linear_macs_per_token"] == linear
    assert macs["attention_macs_per_token"] > 0
    assert macs["macs_per_token"] == pytest.approx(linear + macs["attention_macs_per_token"])
    peak = peak_forward_memory(model, seq_len=32, batch_size=2)
    assert peak["peak_bytes"] >= 2 * 32 * 512 * 4  # at least the logits
    report = efficiency_report(model, seq_len=16, batch_sizes=(1, 2), new_tokens=3, repeats=1)
    for key in ("params", "weight_bytes", "macs_per_token", "peak_forward_bytes",
                "prefill_b1_ms", "prefill_b2_tok_s", "gen_b1_ms", "gen_b2_tok_s"):
        assert report[key] > 0, key


def test_side_by_side_latency_alternates_models_and_takes_medians(tiny, monkeypatch) -> None:
    from evaluation import efficiency

    calls = []

    def fake(model, prompt_len, batch_sizes, new_tokens, repeats, warmup, device):
        calls.append((model, tuple(batch_sizes), warmup))
        return {"prefill_b1_tok_s": float(len(calls)), **({"decode_b1_tok_s": 1.0}
                                                          if len(calls) != 3 else {})}

    monkeypatch.setattr(efficiency, "measure_latency", fake)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    out = efficiency.measure_latency_side_by_side({"a": a, "b": b}, rounds=3,
                                                  batch_sizes={"a": (1, 4), "b": (1,)})
    assert [(m is a, bs, w) for m, bs, w in calls] == [
        (True, (1, 4), 1), (False, (1,), 1), (True, (1, 4), 0), (False, (1,), 0),
        (True, (1, 4), 0), (False, (1,), 0)]
    assert out == {"a": {"prefill_b1_tok_s": 3.0}, "b": {"prefill_b1_tok_s": 4.0,
                                                         "decode_b1_tok_s": 1.0}}
    with pytest.raises(ValueError, match="no entry for model 'b'"):
        efficiency.measure_latency_side_by_side({"a": a, "b": b}, batch_sizes={"a": (1,)})
    monkeypatch.undo()
    model, _ = tiny
    real = efficiency.measure_latency_side_by_side({"x": model, "y": model}, rounds=2,
                                                   batch_sizes=(1,), prompt_len=8, new_tokens=2)
    assert set(real) == {"x", "y"} and real["x"]["gen_b1_tok_s"] > 0


# ---------------------------------------------------------------- tables

def test_format_table_and_compare() -> None:
    dense = {"ppl": 20.0, "params": 1000, "piqa": {"acc": 0.5}, "note": "x"}
    pruned = {"ppl": 30.0, "params": 800, "piqa": {"acc": 0.4}, "note": "y"}
    table = compare(dense, pruned)
    assert table["ppl"] == {"dense": 20.0, "pruned": 30.0, "ratio": 1.5, "delta": 10.0}
    assert table["params"]["ratio"] == 0.8 and table["piqa.acc"]["ratio"] == pytest.approx(0.8)
    assert "note" not in table
    text = format_table(table, title="dense vs pruned", key_header="metric")
    lines = text.splitlines()
    assert lines[0] == "dense vs pruned" and lines[1].split() == ["metric", "dense", "pruned",
                                                                 "ratio", "delta"]
    assert len({len(line) for line in lines[2:]}) == 1  # aligned
    assert "1,000" in format_table(dense) and "piqa.acc" in format_table(dense)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_value_error(tmp_path, monkeypatch) -> None:
    model, tok = SuccessorLM(), CharTokenizer()
    with pytest.raises(ValueError, match="'no_such_task'"):
        load_task("no_such_task")
    with pytest.raises(ValueError, match="'no_such_task'"):
        evaluate_zeroshot(model, tok, ["no_such_task"])
    with pytest.raises(ValueError, match="seq_len.*0"):
        perplexity(model, tok, "abcdef" * 10, seq_len=0)
    with pytest.raises(ValueError, match="-3"):
        perplexity(model, tok, "abcdef" * 10, seq_len=-3)
    with pytest.raises(ValueError, match="seq_len=100"):
        perplexity(model, tok, "abc", seq_len=100)
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match="missing.txt"):
        load_text(str(missing))
    with pytest.raises(ValueError, match="missing.jsonl"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="'chat'"):
        load_task("piqa", prompt_style="chat")
    with pytest.raises(ValueError, match="limit.*0"):
        load_task("piqa", limit=0)
    with pytest.raises(ValueError, match="batch_size.*0"):
        next_token_agreement(model, model, [[1, 2, 3]], batch_size=0)
    # a named task whose offline file is missing and which cannot be fetched
    monkeypatch.setenv("DEPGRAPH_DATA", str(tmp_path))

    def offline(*_args: object) -> None:
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(zd, "_hf_load", offline)
    with pytest.raises(ValueError, match="'boolq'.*pass a JSONL path"):
        load_task("boolq")


def test_public_api() -> None:
    for name in evaluation.__all__:
        assert hasattr(evaluation, name), name


class NaNLM(nn.Module):
    """Logits that are NaN: what a model with NaN weights produces."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full((*ids.shape, 256), float("nan"))


def test_non_finite_logits_are_an_error_in_every_evaluation() -> None:
    from depgraph.errors import NonFiniteError

    items = [MCItem(("Q:", "Q:"), ("aaaa", "b"), 0)] * 3
    with pytest.raises(NonFiniteError, match="logits are not finite"):
        score_items(NaNLM(), CharTokenizer(), items)  # would score 1.0: argmax of NaNs is 0
    with pytest.raises(NonFiniteError, match="perplexity windows 0..1"):
        perplexity(NaNLM(), None, torch.arange(64), seq_len=16, batch_size=2)
    with pytest.raises(NonFiniteError, match=r"\(compared model\)"):
        next_token_agreement(SuccessorLM(), NaNLM(), torch.arange(32).view(2, 16))
    assert issubclass(NonFiniteError, FloatingPointError)


def test_noise_marks_small_differences_and_noisy_timings() -> None:
    from evaluation.noise import difference_cell, mean_accuracy, speed_ratio_cell

    small = {"acc": 0.453, "acc_stderr": 0.065, "n": 60}
    other = {"acc": 0.473, "acc_stderr": 0.065, "n": 60}
    assert difference_cell((0.453, 0.065), (0.473, 0.065)) == "+0.020 (within noise)"
    assert difference_cell((0.30, 0.01), (0.45, 0.01)) == "+0.150"
    mean, stderr = mean_accuracy({"a": small, "b": other})
    assert mean == pytest.approx(0.463) and stderr == pytest.approx(math.sqrt(2) * 0.065 / 2)
    assert mean_accuracy({"old": {"acc": 0.5, "n": 5}})[1] == pytest.approx(0.25)  # from n
    dense = {"gen_b1_tok_s": 6.9, "timing_spread": {"gen_b1_tok_s": 0.85}}
    pruned = {"gen_b1_tok_s": 1.0, "timing_spread": {"gen_b1_tok_s": 0.05}}
    cell = speed_ratio_cell(dense, pruned, "gen_b1_tok_s")
    assert "no ratio" in cell and "85% / 5%" in cell and "×" not in cell
    dense["timing_spread"]["gen_b1_tok_s"] = 0.1
    assert speed_ratio_cell(dense, pruned, "gen_b1_tok_s") == "×0.145"


def test_report_shows_standard_errors_and_noisy_speed() -> None:
    from evaluation.report import markdown_report

    side = {"perplexity": {"ppl": 20.0, "tokens": 1000, "seq_len": 128},
            "zeroshot": {"piqa": {"acc": 0.453, "acc_norm": 0.5, "acc_stderr": 0.065,
                                  "acc_norm_stderr": 0.065, "n": 60}},
            "efficiency": {"params": 100, "gen_b1_tok_s": 6.9, "timing_rounds": 3,
                           "timing_spread": {"gen_b1_tok_s": 0.9}}}
    pruned = copy.deepcopy(side)
    pruned["zeroshot"]["piqa"]["acc"] = 0.473
    pruned["efficiency"].update(params=80, gen_b1_tok_s=1.0)
    data = {"model": "tiny", "dense": side, "pruned": pruned, "settings": {"new_tokens": 4},
            "pruning": {"ratio_removed": 0.2, "params_before": 100, "params_after": 80,
                        "criterion": "l2"}}
    text = markdown_report(data)
    assert "0.453 ± 0.065" in text and "+0.020 (within noise)" in text
    assert "no ratio: timing rounds spread 90% / 90%" in text and "×0.145" not in text


def test_side_by_side_keeps_rounds_and_their_spread(monkeypatch) -> None:
    from evaluation import efficiency

    values = iter([10.0, 20.0, 12.0, 19.0, 30.0, 21.0])
    monkeypatch.setattr(efficiency, "measure_latency", lambda model, **kw: {"x": next(values)})
    rounds = efficiency.measure_latency_rounds({"a": None, "b": None}, rounds=3)
    assert rounds == {"a": [{"x": 10.0}, {"x": 12.0}, {"x": 30.0}],
                      "b": [{"x": 20.0}, {"x": 19.0}, {"x": 21.0}]}
    assert efficiency.timing_spread(rounds["a"]) == {"x": pytest.approx(20 / 12)}
    assert efficiency.latency_medians(rounds["b"]) == {"x": 20.0}
    assert efficiency.timing_spread(rounds["b"][:1]) == {}
