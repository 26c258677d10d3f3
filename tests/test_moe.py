"""Mixture-of-Experts policies: the router's load-balancing loss is added to the DPO loss as TRL 1.16 does
(`router_aux_loss_coef` x the model's own `aux_loss`), reaches the router, and is logged as `aux_loss`."""

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from dpo_trainer import DPOTrainer
from dpo_trainer.data import PaddedCollator
from dpo_trainer.logprobs import score_responses

from conftest import dpo_config, preference_rows

COEF = 0.5  # large enough that the aux loss moves the loss well past rounding


def mixtral(vocab):
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return MixtralForCausalLM(config)


def qwen3_moe(vocab):
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config)


MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}


def build(name, tmp_path, tokenizer, **overrides):
    torch.manual_seed(0)
    args = dpo_config(tmp_path, **overrides)
    rows = preference_rows(8, seed=0)
    return DPOTrainer(MODELS[name](len(tokenizer)), args=args, train_dataset=rows, processing_class=tokenizer)


def naive_logps(model, features):
    """(B, K): each prompt + response run alone, summed log_softmax(logits) of the response, with grad."""
    out = []
    for row in features:
        scores = []
        for response in row["response_ids"]:
            ids = torch.tensor([row["prompt_ids"] + response])
            logps = torch.log_softmax(model(input_ids=ids, output_router_logits=False).logits.float(), -1)[0]
            p = len(row["prompt_ids"])
            scores.append(
                logps[p - 1 : p - 1 + len(response)].gather(-1, torch.tensor(response)[:, None]).sum()
            )
        out.append(torch.stack(scores))
    return torch.stack(out)


def router_weights(model):
    return {name: p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_is_dpo_plus_coef_times_the_models_own_aux_loss(name, tmp_path, tokenizer):
    trainer = build(name, tmp_path, tokenizer, router_aux_loss_coef=COEF)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == COEF
    assert trainer.layout == "padded"  # the model's aux loss takes a (rows, T) padding mask
    features = [dict(row) for row in trainer.train_dataset.select(range(4))]
    batch = PaddedCollator(tokenizer.pad_token_id)(features)
    model = trainer.model.train()
    routers = router_weights(model)
    assert routers

    loss = trainer.compute_loss(model, batch)
    grads = torch.autograd.grad(loss, list(routers.values()))

    # Oracle: DPO (Eq. 7) from full logits of each sequence alone, plus the aux loss of a plain forward pass
    # of the same padded batch, as the model computes it for itself.
    policy = naive_logps(model, features)
    with torch.no_grad():
        reference = naive_logps(trainer.ref_model, features)
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    dpo = -F.logsigmoid(trainer.args.beta * margin).mean()
    own = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
    )
    expected = dpo + COEF * own.aux_loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert COEF * own.aux_loss > 100 * 1e-6  # the aux term is far above the tolerance

    expected_grads = torch.autograd.grad(expected, list(routers.values()))
    for got, want in zip(grads, expected_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_aux_loss_is_weighted_by_each_micro_batchs_share_of_the_step(tmp_path, tokenizer):
    # under gradient accumulation the training loss of a micro-batch is its share of the step's pairs
    trainer = build("mixtral", tmp_path, tokenizer, router_aux_loss_coef=COEF)
    features = [dict(row) for row in trainer.train_dataset.select(range(4))]
    batch = PaddedCollator(tokenizer.pad_token_id)(features)
    model = trainer.model.train()
    with torch.no_grad():
        whole = trainer.compute_loss(model, batch)
        quarter = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(16))
    torch.testing.assert_close(quarter, whole / 4, rtol=1e-5, atol=1e-7)


def test_training_logs_aux_loss_like_trl(tmp_path, tokenizer):
    trainer = build("qwen3_moe", tmp_path, tokenizer, max_steps=2, logging_steps=1)
    assert trainer.aux_loss_enabled  # None: the config's own router_aux_loss_coef (0.001), as TRL
    assert trainer.router_aux_loss_coef == pytest.approx(0.001)
    trainer.train()
    logged = [entry["aux_loss"] for entry in trainer.state.log_history if "aux_loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)
    metrics = trainer.evaluate(trainer.train_dataset.select(range(4)))
    assert metrics["eval_aux_loss"] > 0


def test_aux_loss_off_or_refused(tmp_path, tokenizer, make_model):
    trainer = build("mixtral", tmp_path, tokenizer, router_aux_loss_coef=0.0)
    assert not trainer.aux_loss_enabled
    features = [dict(row) for row in trainer.train_dataset.select(range(2))]
    with pytest.raises(ValueError, match="padded batch"):
        score_responses(trainer.model, trainer.data_collator(features), return_aux_loss=True)
    with pytest.raises(ValueError, match="router_aux_loss_coef.*LlamaForCausalLM"):
        DPOTrainer(
            make_model(),
            args=dpo_config(tmp_path, router_aux_loss_coef=0.1),
            train_dataset=preference_rows(4, seed=0),
            processing_class=tokenizer,
        )


def test_evaluation_matches_trl_with_the_aux_loss(tmp_path, tokenizer):
    # TRL 1.16 adds coef x aux_loss to its (evaluation) loss and logs aux_loss: same rows, same models.
    import copy

    from test_trl_oracle import assert_same_metrics, assert_same_token_ids, our_trainer, trl_trainer

    rows = preference_rows(16, seed=0)
    torch.manual_seed(0)
    policy = mixtral(len(tokenizer))
    torch.manual_seed(1)
    reference = mixtral(len(tokenizer))
    kwargs = dict(beta=0.2, router_aux_loss_coef=COEF)
    theirs = trl_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(reference), **kwargs
    )
    ours = our_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(reference), **kwargs
    )
    assert theirs.aux_loss_enabled and ours.aux_loss_enabled
    assert_same_token_ids(theirs, ours, tokenizer)
    trl_metrics, our_metrics = theirs.evaluate(), ours.evaluate()
    assert_same_metrics(trl_metrics, our_metrics)
    assert our_metrics["eval_aux_loss"] == pytest.approx(trl_metrics["eval_aux_loss"], rel=1e-4)
    # the aux term is in both losses: without it the loss would be off by far more than the tolerance
    assert COEF * our_metrics["eval_aux_loss"] > 1e-2 * our_metrics["eval_loss"]


def test_a_run_shorter_than_logging_steps_logs_aux_loss_at_the_end_like_trl(tmp_path, tokenizer):
    # TRL adds the metrics gathered since the last log to every training log, the end-of-training summary
    # included: a run of fewer steps than logging_steps logs aux_loss (and the rewards) there.
    import copy

    from test_trl_oracle import our_trainer, trl_trainer

    rows = preference_rows(16, seed=0)
    torch.manual_seed(0)
    policy = mixtral(len(tokenizer))
    kwargs = dict(beta=0.2, router_aux_loss_coef=COEF, max_steps=2, logging_steps=10, learning_rate=1e-3)
    theirs = trl_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(policy), **kwargs
    )
    ours = our_trainer(
        tmp_path, copy.deepcopy(policy), tokenizer, rows, ref_model=copy.deepcopy(policy), **kwargs
    )
    theirs.train()
    ours.train()
    trl_last, our_last = theirs.state.log_history[-1], ours.state.log_history[-1]
    assert "train_loss" in trl_last and "train_loss" in our_last  # the summary, no step was logged before it
    for name in ("aux_loss", "rewards/margins", "logps/chosen"):
        assert name in trl_last and name in our_last, name
        assert our_last[name] == pytest.approx(trl_last[name], rel=1e-4, abs=1e-6), name
