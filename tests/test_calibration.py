"""Calibration windows: shapes, determinism, sources and bad input (stories260K tokenizer)."""

from __future__ import annotations

import pytest
import torch

from depgraph.paths import data_dir, models_dir
from pruning import calibration
from pruning.calibration import PAPER_DEFAULTS, calibration_tokens, describe_source

STORIES = models_dir() / "stories260K"
GUTENBERG = data_dir() / "calib" / "gutenberg"
WIKI_VALID = data_dir() / "wikitext-2" / "valid.txt"

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="stories260K model missing")
needs_bundled = pytest.mark.skipif(not GUTENBERG.is_dir(), reason="bundled Gutenberg text missing")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(STORIES).eval()


def _check_deterministic(tokenizer, source, **kwargs) -> torch.Tensor:
    tokens = calibration_tokens(tokenizer, source, seed=0, **kwargs)
    assert tokens.dtype == torch.long and tokens.device.type == "cpu"
    assert torch.equal(tokens, calibration_tokens(tokenizer, source, seed=0, **kwargs))
    assert not torch.equal(tokens, calibration_tokens(tokenizer, source, seed=1, **kwargs))
    assert int(tokens.min()) >= 0 and int(tokens.max()) < len(tokenizer)
    return tokens


@needs_bundled
def test_bundled_default_shape_matches_llm_pruner(tokenizer):
    tokens = _check_deterministic(tokenizer, "bundled")
    assert tokens.shape == (10, 128)
    assert PAPER_DEFAULTS["llm_pruner"]["n_samples"] == 10
    assert PAPER_DEFAULTS["greedy_output_approximation"]["n_samples"] == 16
    assert len({tuple(row.tolist()) for row in tokens}) == 10  # windows from different places


@needs_bundled
def test_windows_start_with_bos_where_the_tokenizer_adds_one(tokenizer):
    """stories260K's (Llama) tokenizer puts BOS before every text: so does every window,
    followed by seq_len - 1 tokens of real text; a tokenizer that adds none gets plain text."""
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_token_id  # the premise
    tokens = calibration_tokens(tokenizer, "bundled", n_samples=3, seq_len=64, seed=5)
    assert tokens.shape == (3, 64) and (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert tokenizer.bos_token_id not in tokens[:, 1:].flatten().tolist()
    text = tokenizer.decode(tokens[0, 1:])
    assert sum(c.isalpha() for c in text) > len(text) / 2
    plain = calibration_tokens(_NoBos(tokenizer), "bundled", n_samples=3, seq_len=64, seed=5)
    assert plain.shape == (3, 64) and tokenizer.bos_token_id not in plain.flatten().tolist()
    assert torch.equal(plain[0, :32], tokens[0, 1:33])  # the same place in the same book


class _NoBos:
    """A tokenizer that knows a BOS id but never adds it (as SmolLM2's, GPT-2's)."""

    def __init__(self, inner):
        self.inner, self.bos_token_id = inner, inner.bos_token_id

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text, add_special_tokens=False)


def test_bos_prefix_follows_the_tokenizers_own_encoding(tokenizer):
    from pruning.text import bos_prefix

    assert bos_prefix(tokenizer) == [tokenizer.bos_token_id]
    assert bos_prefix(_NoBos(tokenizer)) == [] and bos_prefix(None) == []


@pytest.mark.parametrize("source", ["hf:wikitext:wikitext-2-raw-v1:test",
                                    "hf:ptb_text_only:penn_treebank:validation"])
def test_evaluation_text_is_never_calibration_text(tokenizer, source, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is evaluation text"):
        calibration_tokens(tokenizer, source)
    test_file = tmp_path / "wikitext-2-raw" / "test.txt"
    test_file.parent.mkdir()
    test_file.write_text("the evaluation text " * 200)
    monkeypatch.setattr(calibration, "data_dir", lambda: tmp_path)
    for path in (test_file, test_file.parent, tmp_path / "wikitext-2-raw" / ".." /
                 "wikitext-2-raw" / "test.txt"):
        with pytest.raises(ValueError, match=r"is evaluation text \(.*test.txt\)"):
            calibration.check_source(path)
    other = tmp_path / "train.txt"
    other.write_text("training text " * 200)
    calibration.check_source(other)  # any other text is fine


@needs_bundled
def test_file_and_folder_sources(tokenizer, tmp_path):
    book = sorted(GUTENBERG.glob("*.txt"))[0]
    assert _check_deterministic(tokenizer, book, n_samples=4, seq_len=32).shape == (4, 32)
    assert _check_deterministic(tokenizer, str(GUTENBERG), n_samples=5, seq_len=200).shape == (5, 200)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta gamma " * 300)
    (folder / "b.txt").write_text("one two three " * 300)
    (folder / "ignored.md").write_text("not read " * 300)
    tokens = calibration_tokens(tokenizer, folder, n_samples=6, seq_len=16)
    assert "not" not in tokenizer.decode(tokens.flatten())


@pytest.mark.skipif(not WIKI_VALID.is_file(), reason="offline WikiText-2 missing")
def test_wikitext2_offline(tokenizer):
    tokens = _check_deterministic(tokenizer, "wikitext2", n_samples=3, seq_len=128)
    assert tokens.shape == (3, 128)
    assert "wikitext-2" in describe_source("wikitext2").lower()


class _FakeString:
    dtype = "string"


class _FakeDataset(list):
    """Rows of ``{"body": text}`` with a ``features`` map, like a ``datasets.Dataset``."""

    features = {"id": object(), "body": _FakeString()}


def test_hf_source_uses_load_dataset(tokenizer, monkeypatch):
    calls = []

    def fake_load(*args, split):
        calls.append((args, split))
        return _FakeDataset({"id": i, "body": f"Row {i} says hello to the tiny model."}
                            for i in range(200))

    monkeypatch.setattr(calibration, "load_hf_dataset", fake_load)
    tokens = calibration_tokens(tokenizer, "hf:some/corpus:cfg", n_samples=4, seq_len=40)
    assert tokens.shape == (4, 40) and calls[0] == (("some/corpus", "cfg"), "train")
    again = calibration_tokens(tokenizer, "hf:some/corpus:cfg", n_samples=4, seq_len=40)
    assert torch.equal(tokens, again)
    calibration_tokens(tokenizer, "hf:name", n_samples=1, seq_len=8)
    assert calls[-1] == (("name",), "train")
    assert "split 'validation'" in describe_source("hf:name:cfg:validation")


def test_wikitext2_falls_back_to_hf_train_split(tokenizer, monkeypatch, tmp_path):
    calls = []

    def fake_load(*args, split):
        calls.append((args, split))
        return _FakeDataset({"id": i, "body": " = Heading = \n" + "word " * 50} for i in range(30))

    monkeypatch.setattr(calibration, "data_dir", lambda: tmp_path)
    monkeypatch.setattr(calibration, "load_hf_dataset", fake_load)
    assert calibration_tokens(tokenizer, "wikitext2", n_samples=2, seq_len=64).shape == (2, 64)
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), "train")]
    with pytest.raises(ValueError, match="bundled calibration text not found"):
        calibration_tokens(tokenizer, "bundled")


def test_self_generated_is_seeded_and_in_vocab(tokenizer, model):
    tokens = _check_deterministic(tokenizer, "self", n_samples=3, seq_len=24, model=model)
    assert tokens.shape == (3, 24)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    assert "self-generated" in describe_source("self")
    assert not model.training


class _Tokenizer:
    """stories260K's tokenizer with other special ids, to exercise the EOS handling."""

    def __init__(self, inner, bos, eos):
        self.inner, self.bos_token_id, self.eos_token_id = inner, bos, eos

    def __len__(self):
        return len(self.inner)


def test_self_generated_restarts_after_eos(tokenizer, model):
    common = int(calibration_tokens(tokenizer, "self", 4, 64, model=model)[:, 1:].mode().values[0])
    fake = _Tokenizer(tokenizer, bos=1, eos=common)  # a frequent token plays EOS
    tokens = calibration_tokens(fake, "self", n_samples=4, seq_len=64, model=model)
    ends = (tokens[:, :-1] == common).nonzero().tolist()
    assert ends and all(tokens[row, col + 1] == 1 for row, col in ends)
    same = _Tokenizer(tokenizer, bos=common, eos=common)  # GPT-2: one token starts and ends
    tokens = calibration_tokens(same, "self", n_samples=2, seq_len=32, model=model)
    assert len(set(tokens.flatten().tolist())) > 5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_samples": 0}, "n_samples must be an integer >= 1, got 0"),
    ({"seq_len": 1}, "seq_len must be an integer >= 2, got 1"),
    ({"seed": -3}, "seed must be an integer >= 0, got -3"),
    ({"source": "no-such-corpus"}, "unknown calibration source 'no-such-corpus'"),
    ({"source": "hf:"}, "expected 'hf:NAME"),
    ({"source": "hf:a:b:c:d"}, "expected 'hf:NAME"),
    ({"source": "self"}, "source='self' needs the model"),
])
def test_bad_input(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_tokens(tokenizer, **kwargs)


def test_text_too_short(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    with pytest.raises(ValueError, match="too short for seq_len=128"):
        calibration_tokens(tokenizer, short)
    exact = len(tokenizer.encode(short.read_text(), add_special_tokens=False)) + 1  # and BOS
    tokens = calibration_tokens(tokenizer, short, n_samples=2, seq_len=exact)
    assert tokens.shape == (2, exact)  # a whole document may be used up to its last token
    with pytest.raises(ValueError, match=f"too short for seq_len={exact + 1}"):
        calibration_tokens(tokenizer, short, n_samples=2, seq_len=exact + 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        calibration_tokens(tokenizer, empty)
    with pytest.raises(ValueError, match="'nowhere/at/all' does not exist"):
        describe_source("nowhere/at/all")
