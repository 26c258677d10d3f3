"""Chunked per-sequence log-probs against a naive full-logits computation: values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dpo_trainer.data import PaddedCollator
from dpo_trainer.lm_head import auto_chunk_size, autocast_dtype, fused_linear_head, head_token_logps
from dpo_trainer.logprobs import sequence_logps

VOCAB = 50


def naive_token_logps(hidden, weight, bias, targets, softcap=None, scale=1.0):
    logits = (hidden @ weight.T + (0 if bias is None else bias)).double() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (5.0, 1.0), (None, 0.5)])
def test_linear_head_matches_naive_values_and_gradients(chunk_size, bias, softcap, scale):
    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB, bias=bias).double()
    hidden = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (11,))
    upstream = torch.randn(11, dtype=torch.float64)

    ours = head_token_logps(hidden, head, targets, chunk_size=chunk_size, softcap=softcap, scale=scale)
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    ours_grads = torch.autograd.grad((ours * upstream).sum(), params)
    ref = naive_token_logps(hidden, head.weight, head.bias, targets, softcap, scale)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_module_head_fallback_matches_naive():
    torch.manual_seed(1)
    linear = nn.Linear(8, VOCAB)
    head = nn.Sequential(linear)  # not an exact nn.Linear: the checkpointed per-chunk path
    hidden = torch.randn(9, 8, requires_grad=True)
    targets = torch.randint(0, VOCAB, (9,))
    ours = head_token_logps(hidden, head, targets, chunk_size=4)
    ours_grads = torch.autograd.grad(ours.sum(), [hidden, linear.weight])
    ref = naive_token_logps(hidden, linear.weight, linear.bias, targets).float()
    ref_grads = torch.autograd.grad(ref.sum(), [hidden, linear.weight])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_sharded_head_runs_through_its_module_like_the_fused_path(softcap):
    # Outside its forward a ZeRO-3 head holds an empty partition (its parameters carry `ds_id`) and an
    # FSDP2 head may hold DTensor shards: such a head is called per chunk, so the engine's hooks gather
    # the weight, in the forward and again in the backward's recomputation. Same values and gradients.
    torch.manual_seed(2)
    head = nn.Linear(8, VOCAB)
    hidden = torch.randn(9, 8, requires_grad=True)
    targets = torch.randint(0, VOCAB, (9,))
    assert fused_linear_head(head)
    fused = head_token_logps(hidden, head, targets, chunk_size=4, softcap=softcap, scale=0.5)
    fused_grads = torch.autograd.grad(fused.sum(), [hidden, head.weight, head.bias])

    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    head.weight.ds_id = 7  # what ZeRO-3 sets on a partitioned parameter
    assert not fused_linear_head(head)
    through_module = head_token_logps(hidden, head, targets, chunk_size=4, softcap=softcap, scale=0.5)
    assert calls == [4, 4, 1]  # one call per chunk
    through_module.sum().backward()  # (the reentrant checkpoint that ZeRO-3 needs takes no autograd.grad)
    assert sorted(calls[3:]) == [1, 4, 4]  # and again when the backward pass recomputes each chunk
    grads = [hidden.grad, head.weight.grad, head.bias.grad]
    torch.testing.assert_close(through_module, fused, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, fused_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sharded_head_still_gets_its_gradient_when_nothing_upstream_trains():
    # The reentrant checkpoint used for ZeRO-3 heads passes gradients only through inputs that require
    # them; with a frozen body the head's chunks run without it and the head still learns.
    torch.manual_seed(3)
    head = nn.Linear(8, VOCAB)
    hidden, targets = torch.randn(6, 8), torch.randint(0, VOCAB, (6,))
    want = torch.autograd.grad(head_token_logps(hidden, head, targets, chunk_size=4).sum(), head.weight)[0]
    head.weight.ds_id = 7
    head_token_logps(hidden, head, targets, chunk_size=4).sum().backward()
    torch.testing.assert_close(head.weight.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_empty_selection_gives_empty_result_with_graph(fused):
    # A process whose batch scores no token still runs backward, and every trainable parameter of the
    # head gets a (zero) gradient, as DDP's reducer expects.
    linear = nn.Linear(4, VOCAB)
    head = linear if fused else nn.Sequential(linear)
    hidden = torch.randn(0, 4, requires_grad=True)
    out = head_token_logps(hidden, head, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32
    assert out.requires_grad
    out.sum().backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 4)
    for param in linear.parameters():
        assert param.grad is not None and param.grad.shape == param.shape
        assert not param.grad.any()


# Under autocast the head's matmul runs in the low-precision dtype; the error against float64 is bounded by
# that rounding (logits of |z| ~ 50 round by up to 0.125 in bfloat16), forward and backward alike.
AUTOCAST_TOLERANCE = {torch.bfloat16: (1e-2, 6e-2), torch.float16: (2e-3, 1e-2)}  # (values, gradients)


def _relative_error(got, want):
    return float((got.detach().double() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_head_under_autocast_matches_float64_like_plain_autograd(dtype, softcap, seed):
    torch.manual_seed(seed)
    n, h, v = 48, 32, 384
    head = nn.Linear(h, v)
    hidden = torch.randn(n, h)
    with torch.no_grad():  # logits of |z| ~ 50, where low-precision rounding matters
        head.weight.mul_(50.0 / F.linear(hidden, head.weight).std())
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n)

    hidden64 = hidden.double().requires_grad_()
    params64 = [head.weight.detach().double().requires_grad_(), head.bias.detach().double().requires_grad_()]
    ref = naive_token_logps(hidden64, *params64, targets, softcap)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), [hidden64, *params64])

    def plain(x):
        logits = F.linear(x, head.weight, head.bias).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)

    def ours(x):
        return head_token_logps(x, head, targets, chunk_size=10, softcap=softcap)

    errors = {}
    for name, function in (("ours", ours), ("plain", plain)):
        x = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            values = function(x)
        grads = torch.autograd.grad((values * upstream).sum(), [x, head.weight, head.bias])
        assert values.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        errors[name] = (
            _relative_error(values, ref.detach()),
            max(_relative_error(g, r) for g, r in zip(grads, ref_grads)),
        )
    value_tol, grad_tol = AUTOCAST_TOLERANCE[dtype]
    assert errors["ours"][0] < value_tol and errors["ours"][1] < grad_tol, errors
    # no worse than autograd through the full logits under the same autocast
    assert errors["ours"][0] <= 1.25 * errors["plain"][0] + 1e-6, errors
    assert errors["ours"][1] <= 1.25 * errors["plain"][1] + 1e-6, errors


def test_autocast_dtype_reads_the_callers_autocast():
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype("cpu") is None


def test_auto_chunk_size_bounds_logits_per_chunk():
    assert auto_chunk_size(128_256) == 523
    assert auto_chunk_size(10**9) == 1


def _features(seed=0, k=2, b=3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        responses = [
            torch.randint(1, VOCAB, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)
        ]
        rows.append({"prompt_ids": prompt, "response_ids": responses})
    return rows


def naive_sequence_logps(model, features):
    """Full logits of each prompt+response separately, summed over response tokens: (B, K) float64."""
    out = torch.zeros(len(features), len(features[0]["response_ids"]), dtype=torch.float64)
    for b, row in enumerate(features):
        for k, response in enumerate(row["response_ids"]):
            ids = torch.tensor([row["prompt_ids"] + response])
            logps = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            p = len(row["prompt_ids"])
            out[b, k] = sum(logps[p - 1 + j, tok] for j, tok in enumerate(response))
    return out


def _llama(tie):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize(
    "make_model",
    [lambda: _llama(False), lambda: _llama(True), _gpt2],
    ids=["llama", "llama-tied", "gpt2-tied"],
)
@pytest.mark.parametrize("k", [2, 3])
def test_sequence_logps_match_full_logits_values_and_gradients(make_model, k):
    model = make_model()
    features = _features(k=k)
    batch = PaddedCollator(pad_token_id=0)(features)
    ours = sequence_logps(model, batch, chunk_size=5)
    ours_grads = torch.autograd.grad(ours.sum(), [p for p in model.parameters()], allow_unused=True)
    ref = naive_sequence_logps(model, features)
    ref_grads = torch.autograd.grad(ref.sum(), [p for p in model.parameters()], allow_unused=True)
    assert ours.shape == (3, k)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)
    for got, want in zip(ours_grads, ref_grads):
        if want is None:
            continue
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-5)


def test_sequence_logps_through_peft_lora_and_lora_on_head():
    from peft import LoraConfig, get_peft_model

    model = _llama(False)
    features = _features(seed=3)
    batch = PaddedCollator(pad_token_id=0)(features)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    ours = sequence_logps(peft_model, batch)
    ref = naive_sequence_logps(peft_model, features)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)
    with peft_model.disable_adapter():
        base = sequence_logps(peft_model, batch)
    assert not torch.allclose(base, ours)  # the adapter (random, not zero-init) changes the scores


def test_gradients_reach_only_the_adapter_under_lora():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_llama(False), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = PaddedCollator(pad_token_id=0)(_features(seed=4))
    sequence_logps(peft_model, batch).sum().backward()
    grads = {name: p.grad for name, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
