"""Batched sampling (dpo_trainer.evaluation.sampling) on tiny random models."""

import copy

import pytest
import torch

from dpo_trainer.evaluation.sampling import sample_responses

PROMPTS = [
    "Hi",
    "Tell me about the garden and the river and the music and the bread and the winter and the train:",
    "Tell me about the lamp:",
    "\n\nHuman: hello\n\nAssistant:",
]


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, no padding, plain generate(): what a batched greedy run must reproduce."""
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0, input_ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in output:
        output = output[: output.index(tokenizer.eos_token_id)]
    return tokenizer.decode(output, skip_special_tokens=True)


def force_eos_after(model, eos_id: int, k: int):
    """Rig the LM head so that EOS is the argmax of the (k+1)-th generated token: exactly k tokens, then EOS.

    generate() calls the head once for the prompt (giving token 1) and once per later token.
    """
    calls = {"n": 0}

    def hook(module, inputs, logits):
        calls["n"] += 1
        if calls["n"] == k + 1:
            logits = logits.clone()
            logits[:, -1, eos_id] = 1e4
        return logits

    return model.lm_head.register_forward_hook(hook)


def test_batched_greedy_equals_one_by_one(make_model, tokenizer):
    model = make_model()
    batched = sample_responses(
        model, tokenizer, PROMPTS, temperature=0, max_new_tokens=12, batch_size=4, disable_progress=True
    )
    one_by_one = [[reference_greedy(model, tokenizer, prompt, 12)] for prompt in PROMPTS]
    assert batched == one_by_one
    assert all(text for [text] in batched)  # the tiny model does say something


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_batched_greedy_equals_one_by_one_other_architectures(make_model, tokenizer, arch):
    model = make_model(arch=arch)
    batched = sample_responses(
        model, tokenizer, PROMPTS, temperature=0, max_new_tokens=8, batch_size=3, disable_progress=True
    )
    assert batched == [[reference_greedy(model, tokenizer, prompt, 8)] for prompt in PROMPTS]


def test_without_a_pad_token_pads_with_eos(make_model, tokenizer):
    model = make_model()
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    kwargs = dict(temperature=0, max_new_tokens=8, disable_progress=True)
    assert sample_responses(model, no_pad, PROMPTS, **kwargs) == sample_responses(
        model, tokenizer, PROMPTS, **kwargs
    )
    assert no_pad.pad_token_id is None


def test_seeded_sampling_is_reproducible_and_seeds_differ(make_model, tokenizer):
    model = make_model()
    kwargs = dict(temperature=1.0, max_new_tokens=10, num_samples=2, disable_progress=True)
    first = sample_responses(model, tokenizer, PROMPTS, seed=1, **kwargs)
    assert sample_responses(model, tokenizer, PROMPTS, seed=1, **kwargs) == first
    assert sample_responses(model, tokenizer, PROMPTS, seed=2, **kwargs) != first
    assert first[0][0] != first[0][1]  # two samples of one prompt are two draws


def test_num_samples_shape_and_greedy_samples_agree(make_model, tokenizer):
    model = make_model()
    sampled = sample_responses(
        model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=4, batch_size=5, disable_progress=True
    )
    assert [len(samples) for samples in sampled] == [3] * len(PROMPTS)
    assert all(isinstance(text, str) for samples in sampled for text in samples)
    greedy = sample_responses(
        model, tokenizer, PROMPTS, temperature=0, num_samples=2, max_new_tokens=4, disable_progress=True
    )
    assert all(samples[0] == samples[1] for samples in greedy)
    assert sample_responses(model, tokenizer, [], disable_progress=True) == []


def test_stops_at_eos_and_returns_the_continuation_only(make_model, tokenizer):
    model = make_model()
    kwargs = dict(temperature=0, batch_size=4, disable_progress=True)
    first_three = sample_responses(model, tokenizer, PROMPTS, max_new_tokens=3, **kwargs)
    longer = sample_responses(model, tokenizer, PROMPTS, max_new_tokens=10, **kwargs)
    assert all(
        long[0].startswith(short[0]) and long[0] != short[0] for short, long in zip(first_three, longer)
    )

    handle = force_eos_after(model, tokenizer.eos_token_id, k=3)
    try:
        stopped = sample_responses(model, tokenizer, PROMPTS, max_new_tokens=10, **kwargs)
    finally:
        handle.remove()
    assert stopped == first_three  # 3 tokens, then EOS, and nothing after it

    handle = force_eos_after(model, tokenizer.eos_token_id, k=0)
    try:
        immediate = sample_responses(model, tokenizer, PROMPTS, temperature=1.0, disable_progress=True)
    finally:
        handle.remove()
    assert immediate == [[""]] * len(PROMPTS)  # no prompt text, no "<eos>" text


def test_leaves_rng_model_and_tokenizer_as_found(make_model, tokenizer):
    model = make_model()
    model.train()
    generation_config = model.generation_config.to_dict()
    padding_side = tokenizer.padding_side
    torch.manual_seed(123)
    rng_state = torch.get_rng_state()
    sample_responses(
        model, tokenizer, PROMPTS, temperature=0.7, top_p=0.9, max_new_tokens=5, disable_progress=True
    )
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.training
    assert model.generation_config.to_dict() == generation_config
    assert tokenizer.padding_side == padding_side == "right"


def test_peft_model(make_model, tokenizer):
    peft = pytest.importorskip("peft")
    base = make_model()
    kwargs = dict(temperature=0, max_new_tokens=6, disable_progress=True)
    expected = sample_responses(base, tokenizer, PROMPTS, **kwargs)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    assert sample_responses(model, tokenizer, PROMPTS, **kwargs) == expected  # LoRA starts as the identity
    assert model.training


def test_encoder_decoder_model_pads_on_the_right(tokenizer):
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=None,
        tie_word_embeddings=False,  # tied and small, a random BART only ever repeats its start token
        init_std=0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BartForConditionalGeneration(config)
    kwargs = dict(temperature=0, max_new_tokens=6, disable_progress=True)
    batched = sample_responses(model, tokenizer, PROMPTS, batch_size=4, **kwargs)
    assert batched == [sample_responses(model, tokenizer, [prompt], **kwargs)[0] for prompt in PROMPTS]
    assert all(text for [text] in batched)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_rejects_bad_settings(make_model, tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_responses(make_model(), tokenizer, PROMPTS, **kwargs)


def test_rejects_an_empty_prompt_and_a_bare_string(make_model, tokenizer):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample_responses(make_model(), tokenizer, ["Hi", ""], disable_progress=True)
    with pytest.raises(TypeError, match="list of strings"):
        sample_responses(make_model(), tokenizer, "Hi", disable_progress=True)


def test_a_prompts_samples_do_not_depend_on_its_batch_or_the_other_prompts(make_model, tokenizer):
    model = make_model()
    kwargs = dict(
        temperature=1.0, top_p=0.95, max_new_tokens=10, num_samples=2, seed=3, disable_progress=True
    )
    alone = [
        sample_responses(model, tokenizer, PROMPTS[: i + 1], batch_size=1, **kwargs)[i] for i in range(4)
    ]
    together = sample_responses(model, tokenizer, PROMPTS, batch_size=3, **kwargs)
    assert together == alone
    assert len({text for samples in together for text in samples}) == 8  # eight different draws


def test_sampled_tokens_follow_the_warped_distribution(make_model, tokenizer):
    """First tokens of many samples against softmax(logits / T) restricted to the top-p nucleus, with the
    head rigged to give known logits: a=3, b=2, c=1, d=0, every other token -30."""
    model = make_model()
    a, b, c, d = 50, 60, 70, 80  # ordinary tokens (the special ones are 0-3)
    logits = torch.full((len(tokenizer),), -30.0)
    logits[[a, b, c, d]] = torch.tensor([3.0, 2.0, 1.0, 0.0])

    def rig(module, inputs, output):
        return logits.expand_as(output).clone()

    handle = model.lm_head.register_forward_hook(rig)
    n, temperature, top_p = 2000, 0.8, 0.9
    try:
        samples = sample_responses(
            model, tokenizer, ["Hi"], temperature=temperature, top_p=top_p, num_samples=n,
            max_new_tokens=1, batch_size=500, disable_progress=True, return_token_ids=True,
        )[0]  # fmt: skip
    finally:
        handle.remove()
    # softmax([3, 2, 1, 0] / 0.8) = .718, .206, .059, .017: the nucleus of 0.9 is {a, b} (.718 + .206 >= .9)
    probs = torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64) / temperature, 0)
    assert probs[0] < top_p <= probs[0] + probs[1]
    expected_a = (probs[0] / (probs[0] + probs[1])).item()
    first = [ids[0] for ids in samples]
    assert set(first) == {a, b}
    share_a = first.count(a) / n
    assert abs(share_a - expected_a) < 5 * (expected_a * (1 - expected_a) / n) ** 0.5


@pytest.mark.slow
def test_two_processes_sample_what_one_process_samples(tmp_path, make_model, tokenizer):
    import json
    import subprocess

    from conftest import DIST_TIMEOUT_S, TESTS, TORCHRUN_TWO_PROCESSES, dist_env

    model_dir = tmp_path / "model"
    make_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = dict(
        prompts=PROMPTS * 2, temperature=0.7, max_new_tokens=8, num_samples=2, batch_size=3, seed=5
    )
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    command = [*TORCHRUN_TWO_PROCESSES, str(TESTS / "dist_scripts" / "sample.py"), str(model_dir), str(tmp_path),
               str(tmp_path / "settings.json")]  # fmt: skip
    result = subprocess.run(command, env=dist_env(), capture_output=True, text=True, timeout=DIST_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["samples"] == ranks[1]["samples"]  # every process gets the whole result

    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes: the same kernels, the same rounding
    try:
        one = sample_responses(
            AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, disable_progress=True, **settings
        )
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["samples"] == one


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_model_with_nan_weights_is_refused_naming_it(make_model, tokenizer, temperature):
    from dpo_trainer.guards import NonFiniteError

    model = make_model()
    model.name_or_path = "runs/diverged-policy"  # as from_pretrained sets it
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))  # what a diverged run saves (were it allowed to)
    with pytest.raises(NonFiniteError, match=r"LlamaForCausalLM \('runs/diverged-policy'\).* not finite"):
        sample_responses(model, tokenizer, PROMPTS[:2], temperature=temperature, disable_progress=True)


def test_masked_tokens_are_not_mistaken_for_non_finite_logits(make_model, tokenizer):
    # generation's own processors set -inf on the tokens they forbid (here, the model's suppress_tokens)
    model = make_model()
    model.generation_config.suppress_tokens = [5, 6, 7]
    samples = sample_responses(model, tokenizer, PROMPTS[:2], temperature=0, disable_progress=True)
    assert all(text for [text] in samples)
