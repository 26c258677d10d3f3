"""`dpo_trainer.testing` serves the test helpers; the old `dpo_trainer.tiny` and `dpo_trainer.gguf` paths warn."""

import importlib
import sys

import pytest

import dpo_trainer.testing as testing
from dpo_trainer.testing import gguf as new_gguf
from dpo_trainer.testing import tiny as new_tiny


def test_testing_exposes_the_helpers():
    for name in (
        "tiny_causal_lm",
        "train_tokenizer",
        "SPECIAL_TOKENS",
        "CHAT_TEMPLATE",
        "convert_gguf",
        "smollm2_path",
        "smollm2_gguf_file",
        "logits_fingerprint",
        "cache_dir",
        "CONVERSION_RECORD",
    ):
        assert name in testing.__all__
        assert hasattr(testing, name)
    assert testing.tiny_causal_lm is new_tiny.tiny_causal_lm
    assert testing.train_tokenizer is new_tiny.train_tokenizer
    assert testing.smollm2_path is new_gguf.smollm2_path
    assert testing.convert_gguf is new_gguf.convert_gguf
    assert testing.__doc__ and "Example" in testing.__doc__


@pytest.mark.parametrize(("old", "new"), [("dpo_trainer.tiny", new_tiny), ("dpo_trainer.gguf", new_gguf)])
def test_old_path_warns_and_gives_the_same_objects(monkeypatch, old, new):
    monkeypatch.delitem(sys.modules, old, raising=False)  # import afresh, so the module-level warning fires
    with pytest.warns(FutureWarning, match=rf"{old} is deprecated, import from dpo_trainer.testing"):
        module = importlib.import_module(old)
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is getattr(new, name)
        assert getattr(module, name) is getattr(testing, name)
