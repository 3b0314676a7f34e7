"""Calibration data: a few windows of tokens that importance scores and reconstruction see.

``calibration_tokens(tokenizer, source, n_samples, seq_len, seed)`` returns a
``(n_samples, seq_len)`` LongTensor. Sources (see :func:`describe_source`):

``"bundled"``
    The public-domain novels in ``<data_dir>/calib/gutenberg`` (12 Gutenberg books, 4.4 MB):
    prose standing in for BookCorpus, which LLM-Pruner samples from.
``"wikitext2"``
    ``<data_dir>/wikitext-2/valid.txt`` when present (the *tokenized* form with ``<unk>``; fine
    for calibration, and never the test split that perplexity is reported on), otherwise the
    train split of ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``.
a path
    A text file, or a folder whose ``*.txt`` files are the documents.
``"hf:NAME[:CONFIG[:SPLIT]]"``
    ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)`` (split defaults to ``"train"``); the
    ``"text"`` column, or the first string column.
``"self"``
    Data-free calibration (arXiv 2407.19126): the model writes its own text, sampled with a
    seeded generator (top-k / top-p, :data:`SELF_SAMPLING`), starting from the BOS token (or,
    without one, from the first token of a generic English word). Needs ``model``.

Sampling follows LLM-Pruner's ``get_examples``: each sample is a random window of
``seq_len`` consecutive tokens from a random place in the corpus. Text is tokenized lazily:
for every sample we pick a document (a file with probability proportional to its size, or a
dataset row), a random byte offset, read a chunk a little longer than ``seq_len`` tokens
should need, drop the partial word at the chunk's start, tokenize it without special tokens
and keep its first ``seq_len`` tokens; a chunk that turns out too short is read again, twice
as long. So 10 × 128 tokens cost ~10 small tokenizer calls, not a pass over 4.4 MB. A window
starts the way the model expects a text to start: with BOS when the tokenizer's own encoding
adds one (Llama, Gemma; :func:`pruning.text.bos_prefix`), followed by ``seq_len - 1`` tokens
of text; otherwise ``seq_len`` tokens of text (LLM-Pruner's windows, cut from the middle of
tokenized documents, never carry it).

The evaluation text is never calibration text: the WikiText-2 raw test split (and PTB's
test and validation splits, which LLM-Pruner reports on) are refused as a source, as a file,
a folder holding them, or a ``hf:`` split (:func:`check_not_evaluation_text`).
Everything random is drawn from one ``numpy`` generator seeded by ``seed``: the same seed
gives the same tensor, different seeds give different windows.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from depgraph.paths import data_dir
from depgraph.progress import progress_bar

from .checks import check_int
from .corpus import MAX_UNDECODABLE, FileCorpus, RowCorpus, text_column
from .text import bos_prefix, encode_text, load_hf_dataset

__all__ = ["MAX_UNDECODABLE", "PAPER_DEFAULTS", "SELF_SAMPLING", "calibration_tokens",
           "check_not_evaluation_text", "check_source", "describe_source", "evaluation_files"]

#: Calibration set sizes of the two papers this project implements. LLM-Pruner (arXiv
#: 2305.11627) estimates importance from 10 BookCorpus samples of 128 tokens; Greedy Output
#: Approximation (arXiv 2407.19126) uses 16 samples of 128 tokens, and also runs data-free on
#: self-generated text (``source="self"``). ``"bundled"`` is our offline stand-in for the text.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "llm_pruner": {"source": "bundled", "n_samples": 10, "seq_len": 128},
    "greedy_output_approximation": {"source": "bundled", "n_samples": 16, "seq_len": 128},
}

#: How ``source="self"`` samples: plain temperature-1 sampling restricted to the ``top_k``
#: most likely tokens and to the smallest set whose probability reaches ``top_p``.
SELF_SAMPLING: dict[str, float] = {"top_k": 50, "top_p": 0.95, "temperature": 1.0}

_START_WORDS = ("The", "A", "In", "It", "When", "This", "He", "She", "We", "There")
_SOURCE_FORMS = ("'bundled'", "'wikitext2'", "'self'", "'hf:NAME[:CONFIG[:SPLIT]]'",
                 "a text file", "a folder of .txt files")
_MAX_TRIES = 48  # reads per sample before giving up (each failed read doubles the chunk)
@dataclass(frozen=True)
class _Source:
    kind: str  # bundled | wikitext2 | self | hf | file | folder
    location: str = ""  # path, or "NAME:CONFIG:SPLIT" for hf


def evaluation_files() -> list[Path]:
    """The offline files perplexity is reported on (``evaluation.load_text``'s test texts)."""
    root = data_dir()
    return [root / "wikitext-2-raw" / "test.txt", root / "ptb" / "ptb.test.txt",
            root / "ptb" / "ptb.valid.txt"]


#: ``hf:`` datasets and the splits that are evaluation text.
_EVALUATION_SPLITS = {"wikitext": {"test"}, "Salesforce/wikitext": {"test"},
                      "ptb_text_only": {"test", "validation"}}


def _same_file(path: Path, other: Path) -> bool:
    try:
        return other.is_file() and path.resolve() == other.resolve()
    except OSError:
        return False


def check_not_evaluation_text(parsed: _Source, source: str | os.PathLike[str]) -> None:
    """ValueError when ``source`` is (or holds) text that perplexity is reported on."""
    hit = None
    if parsed.kind == "file":
        hit = next((f for f in evaluation_files() if _same_file(Path(parsed.location), f)), None)
    elif parsed.kind == "folder":
        hit = next((f for f in evaluation_files() for path in Path(parsed.location).glob("*.txt")
                    if _same_file(path, f)), None)
    elif parsed.kind == "hf":
        name, _config, split = parsed.location.split(":")
        hit = f"{name} split {split}" if split in _EVALUATION_SPLITS.get(name, ()) else None
    if hit is not None:
        raise ValueError(f"calibration text {str(source)!r} is evaluation text ({hit}), which "
                         "perplexity is reported on; calibrate on other text ('bundled', "
                         "'wikitext2' = its validation split, a file of your own)")


def _parse_source(source: str | os.PathLike[str]) -> _Source:
    parsed = _parse_name(source)
    check_not_evaluation_text(parsed, source)
    return parsed


def _parse_name(source: str | os.PathLike[str]) -> _Source:
    if isinstance(source, str) and source in ("bundled", "wikitext2", "self"):
        return _Source(source)
    if isinstance(source, str) and source.startswith("hf:"):
        parts = source[3:].split(":")
        if not parts[0] or len(parts) > 3 or not all(parts):
            raise ValueError(f"bad dataset source {source!r}: expected 'hf:NAME[:CONFIG[:SPLIT]]'")
        name, config, split = (parts + [None, None])[:3]
        return _Source("hf", f"{name}:{config or ''}:{split or 'train'}")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a str or a path, got {type(source).__name__!r}")
    path = Path(source)
    if path.is_file():
        return _Source("file", str(path))
    if path.is_dir():
        return _Source("folder", str(path))
    if path.suffix or os.sep in str(source) or "/" in str(source):
        raise ValueError(f"calibration text {str(source)!r} does not exist (no such file or "
                         "folder)")
    raise ValueError(f"unknown calibration source {str(source)!r}: expected one of "
                     f"{', '.join(_SOURCE_FORMS)}")


def _bundled_dir() -> Path:
    return data_dir() / "calib" / "gutenberg"


def _wikitext_file() -> Path:
    return data_dir() / "wikitext-2" / "valid.txt"


def describe_source(source: str | os.PathLike[str]) -> str:
    """A one-line, human-readable description of a calibration source, for reports.

    Raises ``ValueError`` for a source :func:`calibration_tokens` would refuse by name (it does
    not load anything, so a missing offline folder or dataset is only noticed when sampling).
    """
    parsed = _parse_source(source)
    if parsed.kind == "bundled":
        return f"bundled Gutenberg prose (BookCorpus stand-in) from {_bundled_dir()}"
    if parsed.kind == "wikitext2":
        if _wikitext_file().is_file():
            return f"WikiText-2 validation split (tokenized form) from {_wikitext_file()}"
        return "WikiText-2 train split via datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')"
    if parsed.kind == "self":
        return ("self-generated text (data-free: the model samples from its BOS token or a "
                f"start word, top_k={SELF_SAMPLING['top_k']}, top_p={SELF_SAMPLING['top_p']})")
    if parsed.kind == "hf":
        name, config, split = parsed.location.split(":")
        return f"Hugging Face dataset {name!r}" + (f" config {config!r}" if config else "") + \
            f" split {split!r}"
    return f"text {parsed.kind} {parsed.location}"


# ------------------------------------------------------------------------------- corpora
def _open_corpus(parsed: _Source, label: str, region: tuple[float, float]
                 ) -> FileCorpus | RowCorpus:
    if parsed.kind == "bundled":
        folder = _bundled_dir()
        if not folder.is_dir():
            raise ValueError(f"bundled calibration text not found at {str(folder)!r}: set "
                             "$DEPGRAPH_DATA, or pass 'wikitext2', 'hf:NAME' or a text path")
        return FileCorpus(sorted(folder.glob("*.txt")), label, region)
    if parsed.kind == "wikitext2":
        if _wikitext_file().is_file():
            return FileCorpus([_wikitext_file()], label, region)
        rows = load_hf_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        return RowCorpus(rows, text_column(rows, label), label, region)
    if parsed.kind == "hf":
        name, config, split = parsed.location.split(":")
        rows = load_hf_dataset(*([name, config] if config else [name]), split=split)
        return RowCorpus(rows, text_column(rows, label), label, region)
    if parsed.kind == "folder":
        paths = sorted(Path(parsed.location).glob("*.txt"))
        if not paths:
            raise ValueError(f"folder {parsed.location!r} holds no .txt files")
        return FileCorpus(paths, label, region)
    return FileCorpus([Path(parsed.location)], label, region)


# ------------------------------------------------------------------------------- windows
def _drop_partial_word(text: str) -> str:
    """Text after the first whitespace (the chunk began inside a word)."""
    for index, char in enumerate(text):
        if char.isspace():
            return text[index + 1:]
    return text


def _window(corpus, tokenizer, rng: np.random.Generator, seq_len: int,
            chars: int, window: int) -> tuple[list[int], float]:
    """``seq_len`` tokens from a random place, and the characters per token seen there
    (``window``: the length of the window they go into, for the message)."""
    best = 0
    for _ in range(_MAX_TRIES):
        text, starts_mid, ends_mid = corpus.draw(rng, chars)
        text = _drop_partial_word(text) if starts_mid else text
        ids = encode_text(tokenizer, text)
        # a chunk that ends mid-text may end mid-word: then its last token is unreliable
        if len(ids) >= seq_len + ends_mid:
            return ids[:seq_len], len(text) / len(ids)
        best = max(best, len(ids))
        if corpus.exhausted(chars):
            break
        chars *= 2
    raise ValueError(f"calibration text {corpus.label!r} is too short for seq_len={window}: "
                     f"the longest piece read gave {best} tokens (need {seq_len})")


def _sample_windows(corpus, tokenizer, n_samples: int, seq_len: int, seed: int,
                    progress: bool | None = None) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    prefix = bos_prefix(tokenizer)  # BOS first where the model always saw one
    text_len = seq_len - len(prefix)
    rows, ratios = [], []
    for _ in progress_bar(range(n_samples), desc="calibration windows", enabled=progress):
        chars_per_token = max(ratios) if ratios else 6.0  # a guess until one window is read
        chars = math.ceil(chars_per_token * (text_len + 1) * 1.25) + 32
        ids, seen = _window(corpus, tokenizer, rng, text_len, chars, seq_len)
        rows.append(prefix + ids)
        ratios.append(seen)
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------------------- self-generated
def _start_tokens(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return [int(bos)]
    if not callable(tokenizer):  # a model config without BOS: start from token 0
        return [0]
    starts = [ids[0] for ids in (encode_text(tokenizer, word) for word in _START_WORDS) if ids]
    if not starts:
        raise ValueError("the tokenizer has no BOS token and encodes no start word")
    return sorted(set(starts))


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    outside = probs.cumsum(dim=-1) - probs > top_p  # keeps at least the most likely token
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


@torch.no_grad()
def _self_generated(model: nn.Module, tokenizer: Any, n_samples: int, seq_len: int,
                    seed: int, progress: bool | None = None) -> torch.Tensor:
    """``n_samples`` rows of ``seq_len`` tokens that the model writes itself (seeded).

    Each row starts with a start token; when the model ends a text (EOS), a start token
    follows (unless EOS is itself the start token, as in GPT-2), so every row is a stream of
    whole self-written texts, like a packed pre-training sequence. Only ids the tokenizer
    knows (``< len(tokenizer)``) are sampled. One batch of ``n_samples`` rows, KV-cached.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # without a tokenizer (data-free pruning of a bare model) the config names BOS and EOS
    source = tokenizer if tokenizer is not None else getattr(model, "config", None)
    starts = torch.tensor(_start_tokens(source), dtype=torch.long)
    eos = getattr(source, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    restart_after_eos = eos is not None and int(eos) not in starts.tolist()
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    tokens = starts[torch.randint(len(starts), (n_samples, 1), generator=generator)]
    ended = torch.zeros(n_samples, 1, dtype=torch.bool)  # the last token was a sampled EOS
    was_training = model.training
    model.eval()
    bar = progress_bar(total=seq_len, desc="self-generated calibration", enabled=progress)
    bar.update(1)
    try:
        cache = None
        while tokens.shape[1] < seq_len:
            out = model(input_ids=tokens[:, -1:].to(device) if cache is not None
                        else tokens.to(device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu() / SELF_SAMPLING["temperature"]
            if vocab is not None and logits.shape[-1] > vocab:
                logits[:, vocab:] = float("-inf")
            logits = _filter_logits(logits, int(SELF_SAMPLING["top_k"]), SELF_SAMPLING["top_p"])
            sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            restart = starts[torch.randint(len(starts), (n_samples, 1), generator=generator)]
            sampled = torch.where(ended, restart, sampled)
            ended = (sampled == eos) & ~ended if restart_after_eos else ended
            tokens = torch.cat([tokens, sampled], dim=1)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return tokens


# ------------------------------------------------------------------------------- entry point
def calibration_tokens(tokenizer: Any, source: str | os.PathLike[str] = "bundled",
                       n_samples: int = 10, seq_len: int = 128, seed: int = 0,
                       model: nn.Module | None = None,
                       region: tuple[float, float] = (0.0, 1.0),
                       progress: bool | None = None) -> torch.Tensor:
    """Calibration windows: a ``(n_samples, seq_len)`` LongTensor of token ids.

    Parameters
    ----------
    tokenizer
        A Hugging Face tokenizer (anything with ``encode(text, add_special_tokens=False)``).
    source : str or path-like
        ``"bundled"``, ``"wikitext2"``, ``"self"``, ``"hf:NAME[:CONFIG[:SPLIT]]"``, a text file
        or a folder of ``.txt`` files (see :mod:`pruning.calibration`).
    n_samples, seq_len : int
        How many windows, of how many tokens. LLM-Pruner's defaults are 10 × 128; see
        :data:`PAPER_DEFAULTS` for arXiv 2407.19126's 16 × 128.
    seed : int
        Seeds every random choice: equal seeds give equal tensors.
    model : nn.Module, optional
        The model that writes its own calibration text; required for ``source="self"``.
    region : (float, float)
        Windows come only from this fraction of every document (bytes of a file, rows of a
        dataset): ``(0, 0.9)`` and ``(0.9, 1)`` give disjoint training and validation text.
    progress : bool, optional
        Show a progress bar while sampling (default: only when stderr is a terminal).

    Returns
    -------
    torch.LongTensor
        Shape ``(n_samples, seq_len)``, on the CPU.

    Raises
    ------
    ValueError
        ``n_samples < 1``, ``seq_len < 2``, an unknown source that is not an existing path,
        ``"self"`` without ``model``, text too short for a window of ``seq_len`` tokens, or a
        file that is not UTF-8 text (more than :data:`MAX_UNDECODABLE` of its bytes).

    Example
    -------
    >>> from transformers import AutoTokenizer            # doctest: +SKIP
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
    >>> calibration_tokens(tokenizer).shape                # doctest: +SKIP
    torch.Size([10, 128])
    """
    n_samples = check_int("n_samples", n_samples, 1)
    seq_len = check_int("seq_len", seq_len, 2)
    seed = check_int("seed", seed, 0)
    if not (isinstance(region, (tuple, list)) and len(region) == 2
            and 0 <= region[0] < region[1] <= 1):
        raise ValueError(f"region must be (start, stop) with 0 <= start < stop <= 1, got {region!r}")
    parsed = _parse_source(source)
    if parsed.kind == "self":
        if model is None:
            raise ValueError("source='self' needs the model that generates the text: pass "
                             "model=<the causal LM>")
        return _self_generated(model, tokenizer, n_samples, seq_len, seed, progress)
    corpus = _open_corpus(parsed, str(source), (float(region[0]), float(region[1])))
    return _sample_windows(corpus, tokenizer, n_samples, seq_len, seed, progress)


def check_source(source: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` now for a source :func:`calibration_tokens` would refuse later:
    an unknown name, a missing path, a folder without ``.txt`` files, a file that is not
    UTF-8 text. ``"self"`` and ``"hf:"`` datasets are checked only by name (no download)."""
    parsed = _parse_source(source)
    if parsed.kind in ("file", "folder", "bundled") or (
            parsed.kind == "wikitext2" and _wikitext_file().is_file()):
        _open_corpus(parsed, str(source), (0.0, 1.0))
