"""TRL's per-token metrics (`logits/chosen`, `logits/rejected`, `entropy`, `mean_token_accuracy`,
`num_tokens`), computed inside the chunked LM head.

Two oracles: the model's own `logits` (mean over the vocabulary, entropy of their softmax, argmax against
the target), per scored token, in float64; and TRL 1.16's logged metrics on the same model and rows.
TRL averages its per-batch token means over eval batches, ours is the token mean of the whole evaluation:
one eval batch makes the two the same quantity.
"""

import copy

import pytest
import torch
import trl  # the oracle: a dev/test dependency (setup.cfg extras "dev")
from datasets import Dataset
from torch import nn

import dpo_trainer
from dpo_trainer.data import PaddedCollator
from dpo_trainer.data.layouts import GroupedCollator
from dpo_trainer.lm_head import TOKEN_STATS
from dpo_trainer.logprobs import score_responses, sequence_logps
from dpo_trainer.testing import tiny_causal_lm

from conftest import preference_rows

VOCAB = 50


def token_rows(seed=0, count=4):
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    return [{"prompt_ids": ids(1, 6), "response_ids": [ids(1, 7), ids(1, 7)]} for _ in range(count)]


@torch.no_grad()
def plain_stats(model, rows):
    """(B, K, 3) float64 sums over each response's tokens of mean logit, entropy, [argmax == target],
    from `log_softmax(model(prompt + response).logits)`, one sequence at a time."""
    out = torch.zeros(len(rows), 2, 3, dtype=torch.float64)
    for b, row in enumerate(rows):
        for k, response in enumerate(row["response_ids"]):
            ids = torch.tensor([row["prompt_ids"] + response])
            logits = model(input_ids=ids).logits[0, len(row["prompt_ids"]) - 1 : -1].double()
            logps = torch.log_softmax(logits, dim=-1)
            entropy = -(logps.exp() * logps).sum(-1)
            top1 = (logits.argmax(-1) == torch.tensor(response)).double()
            out[b, k] = torch.stack([logits.mean(-1).sum(), entropy.sum(), top1.sum()])
    return out


class SubclassedHead(nn.Linear):
    """Not a plain `nn.Linear`: takes the module path (as a LoRA or quantized head does)."""


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
@pytest.mark.parametrize("head", ["fused", "module"])
def test_token_statistics_match_the_models_own_logits(layout, head):
    model = tiny_causal_lm(VOCAB, hidden_size=32, seed=3)
    if head == "module":
        model.lm_head.__class__ = SubclassedHead
    rows = token_rows()
    collate = PaddedCollator(pad_token_id=0) if layout == "padded" else GroupedCollator(0, layout)
    batch = collate(rows)
    plain_logps = sequence_logps(model, batch, chunk_size=3)
    scores = score_responses(model, batch, chunk_size=3, return_token_stats=True)
    logps, stats = scores.logps, scores.token_stats  # several chunks
    assert TOKEN_STATS == ("mean_logit", "entropy", "is_top1")
    assert not stats.requires_grad and logps.requires_grad
    torch.testing.assert_close(logps, plain_logps)  # the log-probs are those without statistics
    expected = plain_stats(model, rows)
    assert stats.shape == expected.shape
    torch.testing.assert_close(stats.double(), expected, rtol=1e-4, atol=1e-4)
    assert expected[..., 2].sum() > 0  # some argmax hits and some misses: the accuracy column is tested
    assert (expected[..., 2] < batch["response_lengths"]).any()
    # the gradient is unchanged by the statistics
    logps.sum().backward()
    with_stats = model.lm_head.weight.grad.clone()
    model.zero_grad()
    sequence_logps(model, batch, chunk_size=3).sum().backward()
    torch.testing.assert_close(with_stats, model.lm_head.weight.grad)


NUM_ROWS, TRAIN_BATCH = 8, 4
COMPARED = (
    "eval_logits/chosen",
    "eval_logits/rejected",
    "eval_entropy",
    "eval_mean_token_accuracy",
    "eval_num_tokens",
    "eval_logps/chosen",
)


@pytest.fixture(autouse=True)
def no_trl_telemetry(monkeypatch):
    monkeypatch.setattr("trl.trainer.base_trainer._BaseTrainer._send_telemetry", lambda self: None)


def common(tmp_path, name):
    # learning rate 0: one epoch of training counts tokens (num_tokens) and leaves the model as it was
    return dict(
        output_dir=str(tmp_path / name),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=TRAIN_BATCH,
        per_device_eval_batch_size=NUM_ROWS,  # one eval batch: see the module docstring
        num_train_epochs=1,
        learning_rate=0.0,
        logging_steps=1,
        beta=0.1,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )


def fitted(model, tokenizer, rows, steps=40):
    """`model` after a few steps of next-token training on the rows' text: a random tiny model's argmax is
    never the target, and a token accuracy of 0 would test nothing."""
    texts = [row["prompt"] + row["chosen"] for row in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_eval_metrics_match_trl(tmp_path, make_model, tokenizer, layout):
    rows = preference_rows(NUM_ROWS, seed=4)
    policy, reference = fitted(make_model(seed=1), tokenizer, rows), make_model(seed=2)
    theirs = trl.DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=trl.DPOConfig(
            **common(tmp_path, "trl"),
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            prediction_loss_only=True,
            max_length=None,
            disable_dropout=True,
        ),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),
    )
    ours = dpo_trainer.DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=dpo_trainer.DPOConfig(
            **common(tmp_path, "ours"),
            bf16=False,  # as TRL's arm
            gradient_checkpointing=False,
            max_length=4096,
            max_prompt_length=2048,
            layout=layout,
            ref_logps_cache_dir=str(tmp_path / "cache"),
        ),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    assert ours.layout == layout
    for a, b in zip(theirs.eval_dataset, ours.eval_dataset):  # the same token ids, so the same tokens counted
        assert [a["prompt_ids"], a["chosen_ids"], a["rejected_ids"]] == [b["prompt_ids"], *b["response_ids"]]

    before_theirs, before_ours = theirs.evaluate(), ours.evaluate()
    assert before_ours["eval_num_tokens"] == before_theirs["eval_num_tokens"] == 0  # nothing trained yet
    theirs.train()
    ours.train()
    trl_metrics, our_metrics = theirs.evaluate(), ours.evaluate()
    assert our_metrics["eval_num_tokens"] > 0
    assert 0 < our_metrics["eval_mean_token_accuracy"] < 1
    for name in COMPARED:
        assert name in trl_metrics and name in our_metrics, name
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4), name
    for name in ("eval_logits/chosen", "eval_entropy", "eval_mean_token_accuracy"):  # unchanged by lr 0
        assert our_metrics[name] == pytest.approx(before_ours[name], rel=1e-6), name
    # the training logs: the running token total after the epoch
    trl_train = [log for log in theirs.state.log_history if "num_tokens" in log and "loss" in log]
    our_train = [log for log in ours.state.log_history if "num_tokens" in log and "loss" in log]
    assert len(our_train) == len(trl_train) == NUM_ROWS // TRAIN_BATCH
    assert our_train[-1]["num_tokens"] == trl_train[-1]["num_tokens"] == our_metrics["eval_num_tokens"]
    for log in our_train:
        for name in ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"):
            assert name in log, name
