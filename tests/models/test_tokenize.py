"""Long text is tokenized without transformers' "longer than the specified maximum sequence length" warning
(issue 22, item 10), for HF tokenizers, mlx-lm's wrapper, and plain ones."""

from __future__ import annotations

import pytest

from topkphi.models.tokenize import encode_long

WARNED = "sequence-length-is-longer-than-the-specified-maximum"  # transformers' once-per-tokenizer flag


def hf_tokenizer(limit: int):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, model_max_length=limit)


def test_hf_tokenizer_does_not_warn_and_keeps_its_limit():
    tokenizer = hf_tokenizer(4)
    assert encode_long(tokenizer, "a b " * 10) == [0, 1] * 10
    assert WARNED not in tokenizer.deprecation_warnings and tokenizer.model_max_length == 4
    tokenizer.encode("a b " * 10)  # the control: a plain encode warns
    assert tokenizer.deprecation_warnings.get(WARNED)


def test_mlx_lm_wrapper_does_not_warn():
    pytest.importorskip("mlx_lm")
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    inner = hf_tokenizer(4)
    assert encode_long(TokenizerWrapper(inner), "b a " * 6) == [1, 0] * 6
    assert WARNED not in inner.deprecation_warnings and inner.model_max_length == 4


def test_plain_tokenizers_are_called_as_they_are():
    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    assert encode_long(Chars(), "ab") == [97, 98]
