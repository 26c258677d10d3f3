"""The reference log-prob cache: keyed by config, tokenizer, weights and data; validated on load; a bad file
is named, deleted and recomputed; an unwritable folder costs a warning, never the computed values."""

import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpo_trainer.reference.precompute
from dpo_trainer import DPOTrainer
from dpo_trainer.reference.cache import (
    CACHE_KEY_FIELD,
    STALE_TEMPORARY_S,
    _temporary_name,
    cache_dir_problem,
    cache_key,
    load_cached,
    model_fingerprint,
    save_cached,
)
from dpo_trainer.testing import tiny_causal_lm, train_tokenizer

from conftest import dpo_config, preference_rows

ROWS = preference_rows(10, seed=21)


def precompute(tmp_path, make_model, tokenizer, cache_dir, name="run", rows=ROWS):
    args = dpo_config(tmp_path / name, precompute_ref_log_probs=True, ref_logps_cache_dir=str(cache_dir))
    trainer = DPOTrainer(make_model(seed=2), args=args, train_dataset=rows, processing_class=tokenizer)
    return torch.tensor(trainer.train_dataset["ref_logps"])


@pytest.fixture
def fresh(tmp_path, make_model, tokenizer):
    """Values computed with no cache, and the folder holding their single cache file."""
    cache = tmp_path / "cache"
    values = precompute(tmp_path, make_model, tokenizer, cache, "fresh")
    (path,) = [cache / name for name in os.listdir(cache)]
    return values, path


def test_the_key_covers_config_and_tokenizer_not_only_weights(tokenizer):
    model = tiny_causal_lm(tokenizer, hidden_size=32, seed=1)
    same = tiny_causal_lm(tokenizer, hidden_size=32, seed=1)
    rope = tiny_causal_lm(tokenizer, hidden_size=32, seed=1, rope_theta=500.0)
    act = tiny_causal_lm(tokenizer, hidden_size=32, seed=1, hidden_act="gelu")
    for other in (rope, act):  # the very same weights, computing other log-probs
        for a, b in zip(model.state_dict().values(), other.state_dict().values()):
            assert torch.equal(a, b)
    key = model_fingerprint(model, tokenizer)
    assert model_fingerprint(same, tokenizer) == key
    assert model_fingerprint(rope, tokenizer) != key
    assert model_fingerprint(act, tokenizer) != key
    other_tokenizer = train_tokenizer(["completely different text " * 20, "more words here"], vocab_size=400)
    assert model_fingerprint(model, other_tokenizer) != key


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("garbage", "cannot be read"),
        ("nan", "non-finite"),
        ("positive", "above 0"),
        ("float16", "float16"),
        ("three responses", "shape"),
        ("fewer rows", "shape"),
    ],
)
def test_an_unusable_cache_file_is_named_deleted_and_recomputed(
    tmp_path, make_model, tokenizer, fresh, damage, reason, caplog
):
    values, path = fresh
    if damage == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        bad = {
            "nan": values.clone().index_put_(
                (torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"))
            ),
            "positive": values.abs() + 1.0,
            "float16": values.half(),
            "three responses": torch.cat([values, values[:, :1]], dim=1),
            "fewer rows": values[:-1],
        }[damage]
        save_file(
            {"ref_logps": bad.contiguous()}, str(path), metadata={CACHE_KEY_FIELD: cache_key(str(path))}
        )
    with caplog.at_level(logging.WARNING):
        again = precompute(tmp_path, make_model, tokenizer, path.parent, "again")
    assert str(path) in caplog.text and reason in caplog.text
    torch.testing.assert_close(again, values)
    torch.testing.assert_close(load_file(str(path))["ref_logps"], values)  # rewritten with good values


def test_a_valid_cache_is_used_as_it_is(tmp_path, make_model, tokenizer, fresh, monkeypatch):
    values, path = fresh

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dpo_trainer.reference.precompute, "compute_reference_column", fail)
    assert torch.equal(precompute(tmp_path, make_model, tokenizer, path.parent, "again"), values)


def test_an_unwritable_cache_folder_keeps_the_computed_values(tmp_path, make_model, tokenizer, fresh, caplog):
    values, _ = fresh
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # makedirs under a file fails, whoever runs the test
    with caplog.at_level(logging.WARNING):
        computed = precompute(tmp_path, make_model, tokenizer, blocker / "cache", "blocked")
    assert "Not caching reference log-probs" in caplog.text and str(blocker) in caplog.text
    torch.testing.assert_close(computed, values)


def test_a_failed_save_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "values.safetensors"

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    assert save_cached(str(path), -torch.ones(4, 2)) is False
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_are_removed_fresh_ones_kept(tmp_path):
    # written on another machine: whether the writer lives cannot be known, so age decides
    stale, fresh = tmp_path / "x.safetensors.tmp-host-1", tmp_path / "y.safetensors.tmp-host-2"
    stale.write_bytes(b"0")
    fresh.write_bytes(b"0")
    old = time.time() - STALE_TEMPORARY_S - 10
    os.utime(stale, (old, old))
    assert cache_dir_problem(str(tmp_path)) is None
    assert sorted(os.listdir(tmp_path)) == [fresh.name]


def test_a_temporary_of_a_dead_writer_on_this_machine_is_removed_at_once(tmp_path, monkeypatch):
    # a save killed between writing its temporary and renaming it: the writer is gone, its temporary too
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    monkeypatch.setattr(os, "getpid", lambda: int(gone.stdout))
    dead = _temporary_name(str(tmp_path / "x.safetensors"))
    monkeypatch.undo()
    live = _temporary_name(str(tmp_path / "y.safetensors"))  # this process's, e.g. a save under way
    parent = live.rpartition("-")[0] + f"-{os.getppid()}"  # another live process of this machine
    for path in (dead, live, parent):
        with open(path, "wb") as handle:
            handle.write(b"0")
    assert cache_dir_problem(str(tmp_path)) is None
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(path) for path in (live, parent))


def test_a_cache_file_copied_under_another_runs_name_is_not_trusted(
    tmp_path, make_model, tokenizer, fresh, caplog
):
    values, path = fresh
    other = path.parent / path.name.replace("-", "-0", 1)  # another run's key: same model prefix, other data
    other.write_bytes(path.read_bytes())
    assert load_cached(str(path), len(values), 2) is not None
    with caplog.at_level(logging.WARNING):
        assert load_cached(str(other), len(values), 2) is None
    assert f"it holds key {cache_key(str(path))}, not its name's" in caplog.text and not other.exists()
    # a file without the key (written by hand, or by an older version) is not trusted either
    save_file({"ref_logps": values.contiguous()}, str(other))
    with caplog.at_level(logging.WARNING):
        assert load_cached(str(other), len(values), 2) is None
    assert "it holds no key" in caplog.text


def test_another_runs_cache_under_this_runs_name_is_recomputed(
    tmp_path, make_model, tokenizer, fresh, caplog
):
    # the same number of rows, valid values: only the key inside tells the file belongs to other data
    values, path = fresh
    other_rows = preference_rows(len(ROWS), seed=99)
    own = precompute(tmp_path, make_model, tokenizer, path.parent, "other", rows=other_rows)
    (other_path,) = [path.parent / name for name in os.listdir(path.parent) if name != path.name]
    other_path.write_bytes(path.read_bytes())  # copied over it
    with caplog.at_level(logging.WARNING):
        again = precompute(tmp_path, make_model, tokenizer, path.parent, "again", rows=other_rows)
    assert str(other_path) in caplog.text and "copied from another run" in caplog.text
    assert not torch.allclose(own, values)
    torch.testing.assert_close(again, own)


def test_load_cached_round_trip_and_missing_file(tmp_path):
    values = -torch.rand(5, 2) * 10
    path = str(tmp_path / "v.safetensors")
    assert load_cached(path, 5) is None
    assert save_cached(path, values)
    assert torch.equal(load_cached(path, 5, 2), values)
