"""DPOTrainer on tiny models: invariants, reference strategies, metrics, saving and subclassing."""

import math
import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

import dpo_trainer.reference.precompute
from dpo_trainer import DPOTrainer
from dpo_trainer.attention import choose_attention, grouped_layout_unsupported, resolve_layout
from dpo_trainer.data import PaddedCollator
from dpo_trainer.logprobs import sequence_logps

from conftest import DPO_METRICS, dpo_config, preference_rows


def config(tmp_path, **overrides):
    return dpo_config(tmp_path, **overrides)


def train_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def one_sgd_step(folder, make_model, tokenizer, rows, **overrides):
    """One optimizer step of plain SGD from make_model(seed=3): (logged losses, weights by name)."""
    args = config(
        folder,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        **overrides,
    )
    trainer = DPOTrainer(make_model(seed=3), args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    return train_losses(trainer), {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def test_step_zero_policy_equals_reference(tmp_path, make_model, tokenizer, pairs):
    trainer = DPOTrainer(
        make_model(),
        args=config(tmp_path),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[f"eval_{name}"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_logps/chosen"] < 0 and metrics["eval_logps/rejected"] < 0


def test_eval_metrics_match_a_hand_computation(tmp_path, make_model, tokenizer, pairs):
    policy, reference = make_model(seed=1), make_model(seed=2)
    trainer = DPOTrainer(
        policy,
        ref_model=reference,
        args=config(tmp_path, beta=0.3),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()

    batch = PaddedCollator(tokenizer.pad_token_id)(list(trainer.eval_dataset))
    with torch.no_grad():
        pol, ref = sequence_logps(policy.eval(), batch), sequence_logps(reference, batch)
    rewards = 0.3 * (pol - ref)
    loss = -torch.nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
    assert metrics["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["eval_rewards/chosen"] == pytest.approx(rewards[:, 0].mean().item(), abs=1e-5)
    assert metrics["eval_rewards/rejected"] == pytest.approx(rewards[:, 1].mean().item(), abs=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(
        (rewards[:, 0] - rewards[:, 1]).mean().item(), abs=1e-5
    )
    assert metrics["eval_rewards/accuracies"] == pytest.approx(
        (rewards[:, 0] > rewards[:, 1]).float().mean().item()
    )
    assert metrics["eval_logps/chosen"] == pytest.approx(pol[:, 0].mean().item(), rel=1e-5)
    assert metrics["eval_logps/rejected"] == pytest.approx(pol[:, 1].mean().item(), rel=1e-5)


def test_eval_dataset_dict_gets_prefixed_metrics(tmp_path, make_model, tokenizer, pairs):
    trainer = DPOTrainer(
        make_model(),
        args=config(tmp_path),
        train_dataset=pairs,
        eval_dataset={"a": pairs[:8], "b": pairs[8:]},
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert "eval_a_rewards/margins" in metrics and "eval_b_rewards/accuracies" in metrics


def test_training_logs_reward_metrics_and_never_touches_the_reference(tmp_path, make_model, tokenizer, pairs):
    policy, reference = make_model(seed=1), make_model(seed=1)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    trainer = DPOTrainer(
        policy, ref_model=reference, args=config(tmp_path), train_dataset=pairs, processing_class=tokenizer
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for name in DPO_METRICS:
        assert all(name in entry for entry in logged)
    assert not reference.training
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_full_finetuning_reference_is_an_in_memory_copy(tmp_path, make_model, tokenizer, pairs):
    policy = make_model()
    with torch.no_grad():  # weights that differ from anything on disk or from the seed
        policy.lm_head.weight.mul_(1.5)
    snapshot = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = DPOTrainer(policy, args=config(tmp_path), train_dataset=pairs, processing_class=tokenizer)
    assert trainer.ref_model is not policy
    trainer.train()
    ref_state = trainer.ref_model.state_dict()
    assert all(torch.equal(snapshot[k], ref_state[k]) for k in snapshot)
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())


def test_lora_moves_the_adapter_and_never_the_base(tmp_path, make_model, tokenizer, pairs):
    model = make_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    trainer = DPOTrainer(
        model,
        args=config(tmp_path, learning_rate=1e-2),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=lora,
    )
    assert trainer.ref_model is None  # the adapter-disabled policy is the reference: one copy of the weights
    adapter_before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    state = trainer.model.get_base_model().state_dict()
    for key, value in base.items():
        peft_key = key.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight"
        )
        assert torch.equal(state[peft_key], value), key
    moved = [
        not torch.equal(adapter_before[k], v) for k, v in trainer.model.named_parameters() if "lora_B" in k
    ]
    assert moved and all(moved)


def test_gradient_accumulation_matches_a_full_batch(tmp_path, make_model, tokenizer):
    rows = preference_rows(8, seed=5)

    loss_full, weights_full = one_sgd_step(
        tmp_path / "full", make_model, tokenizer, rows, per_device_train_batch_size=8
    )
    loss_accum, weights_accum = one_sgd_step(
        tmp_path / "accum",
        make_model,
        tokenizer,
        rows,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
    )
    assert loss_full == pytest.approx(loss_accum, rel=1e-5)
    # plain SGD: equal weights after one step means equal gradients
    for key, value in weights_full.items():
        torch.testing.assert_close(weights_accum[key], value, rtol=1e-5, atol=1e-6)
    initial = dict(make_model(seed=3).named_parameters())
    assert any(not torch.equal(value, initial[key]) for key, value in weights_full.items())


def test_resume_from_checkpoint_gives_the_same_losses(tmp_path, make_model, tokenizer):
    rows = preference_rows(24, seed=7)
    args = dict(max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3)
    straight = DPOTrainer(
        make_model(seed=4),
        args=config(tmp_path / "a", **args),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    straight.train()

    interrupted = config(tmp_path / "b", save_strategy="steps", save_steps=3, **args)
    first = DPOTrainer(make_model(seed=4), args=interrupted, train_dataset=rows, processing_class=tokenizer)
    first.train()  # writes checkpoint-3 (and checkpoint-6)
    resumed = DPOTrainer(make_model(seed=4), args=interrupted, train_dataset=rows, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=os.path.join(interrupted.output_dir, "checkpoint-3"))
    assert train_losses(resumed)[-3:] == pytest.approx(train_losses(straight)[3:], rel=1e-5)


def test_precomputed_reference_trains_like_the_live_one_and_is_cached(
    tmp_path, make_model, tokenizer, pairs, monkeypatch
):
    held_out = preference_rows(8, seed=99)
    live = DPOTrainer(
        make_model(seed=2),
        args=config(tmp_path / "live"),
        train_dataset=pairs,
        eval_dataset=held_out,
        processing_class=tokenizer,
    )
    live.train()
    args = config(tmp_path / "pre", precompute_ref_log_probs=True)
    pre = DPOTrainer(
        make_model(seed=2), args=args, train_dataset=pairs, eval_dataset=held_out, processing_class=tokenizer
    )
    assert pre.ref_model is None and "ref_logps" in pre.train_dataset.column_names
    pre.train()
    assert train_losses(pre) == pytest.approx(train_losses(live), rel=1e-5)
    for (name, a), b in zip(live.model.named_parameters(), pre.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert len(os.listdir(args.ref_logps_cache_dir)) == 2  # train and eval

    def fail(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dpo_trainer.reference.precompute, "compute_reference_column", fail)
    again = DPOTrainer(
        make_model(seed=2), args=args, train_dataset=pairs, eval_dataset=held_out, processing_class=tokenizer
    )
    assert again.train_dataset["ref_logps"] == pre.train_dataset["ref_logps"]
    assert again.eval_dataset["ref_logps"] == pre.eval_dataset["ref_logps"]
    assert pre.evaluate()["eval_loss"] == pytest.approx(live.evaluate()["eval_loss"], rel=1e-5)


def test_precomputed_reference_with_lora_matches_live(tmp_path, make_model, tokenizer, pairs):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    live = DPOTrainer(
        make_model(seed=2),
        args=config(tmp_path / "live", learning_rate=1e-2),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=lora,
    )
    live.train()
    pre = DPOTrainer(
        make_model(seed=2),
        args=config(tmp_path / "pre", learning_rate=1e-2, precompute_ref_log_probs=True),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=lora,
    )
    pre.train()
    assert train_losses(pre) == pytest.approx(train_losses(live), rel=1e-5)


def test_learns_a_synthetic_preference_on_held_out_pairs(tmp_path, make_model, tokenizer):
    train, held_out = preference_rows(256, seed=11), preference_rows(64, seed=12)
    args = config(
        tmp_path, max_steps=40, per_device_train_batch_size=16, learning_rate=3e-3, beta=0.1, warmup_steps=0
    )
    trainer = DPOTrainer(
        make_model(seed=0), args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_rewards/accuracies"] == 0.0  # policy == reference: no strict preference yet
    assert after["eval_rewards/accuracies"] >= 0.9
    assert after["eval_loss"] < before["eval_loss"] - 0.2


def test_ranked_rows_train_with_plackett_luce(tmp_path, make_model, tokenizer):
    rows = preference_rows(16, seed=3, k=3)
    args = config(tmp_path, max_steps=8)
    trainer = DPOTrainer(
        make_model(), args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(math.log(6), abs=1e-5)  # K=3 at step 0: ln 3!
    trainer.train()
    after = trainer.evaluate()
    # the rankings are learnable (ruder replies rank lower): the listwise loss falls below chance ln 3!
    assert after["eval_loss"] < math.log(6) - 0.08  # 1.64 measured
    assert after["eval_rewards/margins"] > 0  # best minus worst response's implicit reward


def test_subclass_with_a_custom_loss(tmp_path, make_model, tokenizer, pairs):
    class MarginTrainer(DPOTrainer):
        def dpo_loss(self, policy_logps, reference_logps):
            rewards = self.args.beta * (policy_logps - reference_logps)
            losses = torch.relu(0.5 - (rewards[:, 0] - rewards[:, 1]))
            return losses, rewards.detach()

    trainer = MarginTrainer(
        make_model(),
        args=config(tmp_path),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    trainer.train()
    assert train_losses(trainer)[0] == pytest.approx(0.5, abs=1e-6)


def test_saving_writes_safetensors_and_a_model_card(tmp_path, make_model, tokenizer, pairs):
    trainer = DPOTrainer(
        make_model(),
        args=config(tmp_path, beta=0.25, loss_type="ipo"),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    trainer.save_model()
    out = trainer.args.output_dir
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    card = open(os.path.join(out, "README.md")).read()
    assert "Direct Preference Optimization" in card and "| beta | 0.25 |" in card and "`ipo`" in card


def test_saving_never_overwrites_a_users_readme(tmp_path, make_model, tokenizer, pairs):
    trainer = DPOTrainer(make_model(), args=config(tmp_path), train_dataset=pairs, processing_class=tokenizer)
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    readme = os.path.join(trainer.args.output_dir, "README.md")
    with open(readme, "w") as handle:
        handle.write("my notes")
    trainer.save_model()
    assert open(readme).read() == "my notes"


def test_lora_saves_the_adapter(tmp_path, make_model, tokenizer, pairs):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = DPOTrainer(
        make_model(), args=config(tmp_path), train_dataset=pairs, processing_class=tokenizer, peft_config=lora
    )
    trainer.save_model()
    assert os.path.exists(os.path.join(trainer.args.output_dir, "adapter_model.safetensors"))


def test_model_and_tokenizer_load_from_a_local_path(tmp_path, make_model, tokenizer, pairs):
    path = str(tmp_path / "base")
    make_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    trainer = DPOTrainer(path, args=config(tmp_path, max_steps=1), train_dataset=Dataset.from_list(pairs))
    trainer.train()
    assert trainer.processing_class.eos_token == tokenizer.eos_token


# ---------------------------------------------------------------- bad input


def test_bad_datasets_are_rejected_before_training(tmp_path, make_model, tokenizer, pairs):
    args = config(tmp_path)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        DPOTrainer(make_model(), args=args, train_dataset=[], processing_class=tokenizer)
    with pytest.raises(ValueError, match="columns"):
        DPOTrainer(
            make_model(),
            args=args,
            train_dataset=[{"question": "a", "answer": "b"}],
            processing_class=tokenizer,
        )
    bad = [dict(row) for row in pairs]
    bad[5]["rejected"] = None
    with pytest.raises(ValueError, match=r"(?s)row 5.*rejected|rejected.*row 5"):
        DPOTrainer(make_model(), args=args, train_dataset=bad, processing_class=tokenizer)
    with pytest.raises(TypeError, match="Dataset"):
        DPOTrainer(make_model(), args=args, train_dataset="not a dataset", processing_class=tokenizer)


def test_mixed_response_counts_are_rejected(tmp_path, make_model, tokenizer):
    rows = preference_rows(4, seed=0, k=3) + [{"prompt": "x:", "responses": [" a.", " b."]}]
    with pytest.raises(ValueError, match="row 4"):
        DPOTrainer(make_model(), args=config(tmp_path), train_dataset=rows, processing_class=tokenizer)


def test_rows_truncated_away_are_reported_and_dropped(tmp_path, make_model, tokenizer, pairs, caplog):
    rows = [dict(row) for row in pairs]
    rows[3]["prompt"] = "Tell me about the garden:" * 20
    args = config(tmp_path, max_length=24, max_prompt_length=None)
    with caplog.at_level("WARNING"):
        trainer = DPOTrainer(make_model(), args=args, train_dataset=rows, processing_class=tokenizer)
    assert len(trainer.train_dataset) == len(rows) - 1
    assert "dropping 1 of 16 rows" in caplog.text and "first: row 3" in caplog.text


def test_tokenizer_without_eos_is_rejected(tmp_path, make_model, tokenizer, pairs):
    import copy

    broken = copy.deepcopy(tokenizer)
    broken.eos_token = None
    broken.pad_token = None
    with pytest.raises(ValueError, match="eos_token"):
        DPOTrainer(make_model(), args=config(tmp_path), train_dataset=pairs, processing_class=broken)


def test_missing_pad_token_falls_back_to_eos(tmp_path, make_model, tokenizer, pairs):
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    trainer = DPOTrainer(
        make_model(), args=config(tmp_path, layout="padded"), train_dataset=pairs, processing_class=no_pad
    )
    assert no_pad.pad_token is None  # the caller's tokenizer is left as it was (and saved so)
    assert trainer.pad_token_id == tokenizer.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    lengths = batch["attention_mask"].sum(dim=1)
    short = int(lengths.argmin())
    assert lengths.min() < lengths.max()  # a padded row exists, padded with EOS
    assert (batch["input_ids"][short, int(lengths[short]) :] == tokenizer.eos_token_id).all()


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(beta=0.0), "beta"),
        (dict(loss_type="nope"), "loss_type"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(max_length=10, max_prompt_length=10), "max_prompt_length"),
        (dict(truncation_mode="middle"), "truncation_mode"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    ],
)
def test_config_errors_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"DPOConfig.{field}"):
        config(tmp_path, **overrides)


def test_config_error_lists_the_valid_losses(tmp_path):
    with pytest.raises(ValueError, match="valid names: .*hinge, ipo, .*robust, .*sigmoid"):
        config(tmp_path, loss_type="nope")


@pytest.mark.parametrize("use_lora", [False, True])
def test_activation_checkpointing_changes_nothing_but_memory(
    tmp_path, make_model, tokenizer, pairs, use_lora
):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if use_lora else None

    def run(checkpointing, name):
        args = config(tmp_path / name, gradient_checkpointing=checkpointing, learning_rate=1e-2)
        trainer = DPOTrainer(
            make_model(seed=6), args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=lora
        )
        trainer.train()
        return train_losses(trainer)

    plain = run(False, "plain")
    assert run(True, "checkpointed") == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < plain[0]


# ---------------------------------------------------------------- layouts and token budgets


def test_every_layout_trains_the_same(tmp_path, make_model, tokenizer, pairs):
    results = {}
    for layout in ("padded", "packed", "shared_prompt"):
        trainer = DPOTrainer(
            make_model(seed=8),
            args=config(tmp_path / layout, layout=layout),
            train_dataset=pairs,
            processing_class=tokenizer,
        )
        assert trainer.layout == layout
        trainer.train()
        results[layout] = (train_losses(trainer), [p.detach().clone() for p in trainer.model.parameters()])
    for layout in ("packed", "shared_prompt"):
        assert results[layout][0] == pytest.approx(results["padded"][0], rel=1e-5)
        for got, want in zip(results[layout][1], results["padded"][1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)  # Adam amplifies float noise


@pytest.mark.parametrize(
    "setting,device,impl,expected",
    [
        (None, "cuda", "sdpa", "flex_attention"),  # auto: SDPA's dense mask -> BlockMask on CUDA
        (None, "cpu", "sdpa", "dpo_chunked_sdpa"),  # CPU: no FlexAttention; SDPA query-chunked instead
        (None, "cuda", "eager", "eager"),  # auto never overrides an explicit non-SDPA choice
        (False, "cuda", "sdpa", "dpo_chunked_sdpa"),
        (True, "cpu", "sdpa", "flex_attention"),
        (True, "cpu", "eager", "flex_attention"),
    ],
)
def test_flex_attention_choice(tmp_path, make_model, setting, device, impl, expected):
    policy, reference = make_model(attn_implementation=impl), make_model(attn_implementation=impl)
    args = config(tmp_path, flex_attention=setting)
    choose_attention([policy, reference, None], args.flex_attention, device, args.layout)
    assert policy.config._attn_implementation == expected
    assert reference.config._attn_implementation == expected


def test_flex_attention_reaches_the_base_model_of_a_peft_policy(tmp_path, make_model):
    from peft import get_peft_model

    policy = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    choose_attention([policy, None], None, "cuda", "auto")
    assert policy.get_base_model().config._attn_implementation == "flex_attention"


def test_flex_attention_setting_is_validated(tmp_path):
    with pytest.raises(ValueError, match="DPOConfig.flex_attention"):
        config(tmp_path, flex_attention="yes")


def test_auto_layout_and_trl_padding_free_name(tmp_path, make_model, tokenizer, pairs):
    auto = DPOTrainer(make_model(), args=config(tmp_path), train_dataset=pairs, processing_class=tokenizer)
    assert auto.layout == "shared_prompt"
    packed = DPOTrainer(
        make_model(),
        args=config(tmp_path, padding_free=True),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    assert packed.layout == "packed"
    with pytest.raises(ValueError, match="padding_free"):
        config(tmp_path, padding_free=True, layout="padded")


def test_models_that_cannot_take_the_mask_fall_back_to_padded(tmp_path, make_model, tokenizer, pairs, caplog):
    model = make_model()
    assert grouped_layout_unsupported(model) is None
    model.config._attn_implementation_internal = (
        "flash_attention_2"  # no flash-attn here: only the name matters
    )
    assert "flash_attention_2" in grouped_layout_unsupported(model)
    with caplog.at_level("WARNING"):
        layout = resolve_layout("shared_prompt", [model, None])
    assert layout == "padded" and "not available" in caplog.text and "flash_attention_2" in caplog.text


def test_token_budget_batches_weigh_every_pair_alike(tmp_path, make_model, tokenizer):
    rows = preference_rows(8, seed=5)

    probe = DPOTrainer(
        make_model(seed=3),
        args=config(tmp_path / "probe", max_tokens_per_batch=70),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    batches = list(probe.get_train_dataloader())
    sizes = [b["response_lengths"].shape[0] for b in batches]
    assert sum(sizes) == 8 and len(set(sizes)) > 1  # uneven batches
    for batch in batches:
        tokens = int((batch["doc_ids"] >= 0).sum())
        assert tokens <= 70 or batch["response_lengths"].shape[0] == 1

    loss_full, weights_full = one_sgd_step(
        tmp_path / "full", make_model, tokenizer, rows, per_device_train_batch_size=8
    )
    loss_budget, weights_budget = one_sgd_step(
        tmp_path / "budget",
        make_model,
        tokenizer,
        rows,
        max_tokens_per_batch=70,
        gradient_accumulation_steps=len(sizes),
    )
    assert loss_budget == pytest.approx(loss_full, rel=1e-5)
    for key, want in weights_full.items():
        torch.testing.assert_close(weights_budget[key], want, rtol=1e-5, atol=1e-6)
