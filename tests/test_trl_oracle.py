"""TRL's DPOTrainer as a test oracle: where the two libraries define a quantity the same way, our
evaluation metrics must equal TRL's on the same policy, the same reference and the same data.

What is compared, and why only that:

* Token ids. TRL appends EOS as text and tokenizes prompt + completion jointly; we tokenize the
  prompt and each response apart and append the EOS id. On these rows (the prompt ends in ":" and
  every response starts with a space, a pre-tokenizer boundary) the ids must be identical, and each
  test asserts that first so that a metric mismatch is never a silent tokenization difference.
* Metrics. TRL logs the mean over eval batches of per-batch means; we log per-example means. They
  coincide when every eval batch has the same size, so the eval batch size divides the row count.
* Loss types. `sigmoid` (label_smoothing 0), `hinge` and `robust` have the same formula in both
  libraries (every name TRL defines, `ipo` included, computes TRL's form; the whole family is compared in
  tests/test_trl_losses.py). Not compared: `sigmoid` with label_smoothing > 0, which TRL trains ignoring
  label_smoothing and ours refuses, naming `cdpo` (conservative DPO, which TRL does not define; both are
  checked in tests/test_trl_losses.py).
"""

import copy

import pytest
import torch
import trl  # the oracle: a dev/test dependency (setup.cfg extras "dev")
from datasets import Dataset
from peft import LoraConfig

import dpo_trainer

from conftest import preference_rows

NUM_ROWS, EVAL_BATCH = 16, 4  # equal eval batches: see the module docstring
COMPARED = (
    "eval_loss",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/margins",
    "eval_rewards/accuracies",
    "eval_logps/chosen",
    "eval_logps/rejected",
)


@pytest.fixture(autouse=True)
def no_trl_telemetry(monkeypatch):
    # TRL's trainers ping the Hub on construction (already off under HF_HUB_OFFLINE); make sure.
    monkeypatch.setattr("trl.trainer.base_trainer._BaseTrainer._send_telemetry", lambda self: None)


@pytest.fixture
def rows():
    return preference_rows(NUM_ROWS, seed=0)


def trl_trainer(tmp_path, model, tokenizer, rows, *, ref_model=None, peft_config=None, beta, **overrides):
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 mixed precision
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults to True
        prediction_loss_only=True,  # else TRL runs an extra forward pass per eval batch to return logits
        per_device_train_batch_size=EVAL_BATCH,
        per_device_eval_batch_size=EVAL_BATCH,
        max_length=None,  # no truncation in either library
        beta=beta,
        disable_dropout=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        **overrides,
    )
    return trl.DPOTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),
        peft_config=peft_config,
    )


def our_trainer(tmp_path, model, tokenizer, rows, *, ref_model=None, peft_config=None, beta, **overrides):
    args = dpo_trainer.DPOConfig(
        output_dir=str(tmp_path / "ours"),
        report_to="none",
        use_cpu=True,
        bf16=False,  # as TRL's arm above
        gradient_checkpointing=False,
        per_device_train_batch_size=EVAL_BATCH,
        per_device_eval_batch_size=EVAL_BATCH,
        max_length=4096,  # far above any row: no truncation
        max_prompt_length=2048,
        beta=beta,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        ref_logps_cache_dir=str(tmp_path / "cache"),
        **overrides,
    )
    return dpo_trainer.DPOTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def assert_same_token_ids(theirs, ours, tokenizer):
    assert len(theirs.eval_dataset) == len(ours.eval_dataset) == NUM_ROWS  # nothing dropped by either
    for index, (a, b) in enumerate(zip(theirs.eval_dataset, ours.eval_dataset)):
        assert a["prompt_ids"] == b["prompt_ids"], f"row {index}: prompt ids differ"
        assert [a["chosen_ids"], a["rejected_ids"]] == b["response_ids"], f"row {index}: response ids differ"
        assert a["chosen_ids"][-1] == a["rejected_ids"][-1] == tokenizer.eos_token_id


def assert_same_metrics(theirs, ours):
    for name in COMPARED:
        assert name in theirs and name in ours, name
        # abs: rewards are differences of ~40-nat sums in float32, so near-zero values only agree to ~1e-6
        assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=2e-6), name


def test_full_finetuning_with_a_separate_reference_matches_trl(tmp_path, make_model, tokenizer, rows):
    policy, reference = make_model(seed=1), make_model(seed=2)  # a reference unlike the policy
    theirs = trl_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(reference), beta=0.2
    )
    ours = our_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(reference), beta=0.2
    )
    assert_same_token_ids(theirs, ours, tokenizer)
    trl_metrics, our_metrics = theirs.evaluate(), ours.evaluate()
    assert abs(our_metrics["eval_rewards/chosen"]) > 1e-3  # policy != reference: a non-trivial comparison
    assert 0 < our_metrics["eval_rewards/accuracies"] < 1
    assert_same_metrics(trl_metrics, our_metrics)


def set_adapter_weights(model, seed=7, scale=0.3):
    """Deterministic non-zero values for every LoRA tensor, assigned by parameter name."""
    generator = torch.Generator().manual_seed(seed)
    named = sorted((name, p) for name, p in model.named_parameters() if "lora_" in name)
    assert named, "no LoRA parameters"
    with torch.no_grad():
        for _, param in named:
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return [name for name, _ in named]


def test_lora_with_the_adapter_disabled_reference_matches_trl(tmp_path, make_model, tokenizer, rows):
    base = make_model(seed=1)

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    theirs = trl_trainer(tmp_path, copy.deepcopy(base), tokenizer, rows, peft_config=lora(), beta=0.2)
    ours = our_trainer(tmp_path, copy.deepcopy(base), tokenizer, rows, peft_config=lora(), beta=0.2)
    assert theirs.ref_model is None and ours.ref_model is None  # both: the policy with its adapter disabled
    # A fresh adapter (lora_B = 0) would make every reward 0; give both the same non-zero adapter. The two
    # libraries consume the RNG differently before get_peft_model, so init_lora_weights=False would not.
    assert set_adapter_weights(theirs.model) == set_adapter_weights(ours.model)
    assert_same_token_ids(theirs, ours, tokenizer)
    trl_metrics, our_metrics = theirs.evaluate(), ours.evaluate()
    assert abs(our_metrics["eval_rewards/margins"]) > 1e-3
    assert_same_metrics(trl_metrics, our_metrics)


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [
        ("hinge", 3.0, 0.0),  # a large beta, so that some pairs sit past the hinge (asserted below)
        ("robust", 0.2, 0.1),
    ],
)
def test_loss_types_defined_identically_match_trl(
    tmp_path, make_model, tokenizer, rows, loss_type, beta, label_smoothing
):
    policy, reference = make_model(seed=1), make_model(seed=2)
    kwargs = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    theirs = trl_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(reference), **kwargs
    )
    ours = our_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(reference), **kwargs
    )
    assert_same_token_ids(theirs, ours, tokenizer)
    trl_metrics, our_metrics = theirs.evaluate(), ours.evaluate()
    assert_same_metrics(trl_metrics, our_metrics)
    if loss_type == "hinge":
        # mean relu(1 - beta h) > 1 - mean(beta h) = 1 - margins exactly when some pair is clipped by the relu
        assert our_metrics["eval_loss"] > 1 - our_metrics["eval_rewards/margins"] + 1e-3
