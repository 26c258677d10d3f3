"""Every layout scores exactly what the model computes, on each architecture family TRL tests, on rows longer
than every sliding window; a model whose attention cannot take a grouped layout's mask is refused with the
reason and scored in the `padded` layout.

The oracle is the model's own `log_softmax(model(ids).logits)` on each sequence alone, unpadded.
"""

import random

import pytest
import torch
import transformers

from dpo_trainer import attention
from dpo_trainer.attention import (
    LayoutUnsupported,
    attention_allowed,
    flex_mask_mod,
    grouped_layout_unsupported,
    mask_plan,
    resolve_layout,
)
from dpo_trainer.data import PaddedCollator
from dpo_trainer.data.layouts import GroupedCollator
from dpo_trainer.logprobs import sequence_logps

VOCAB = 96
SLIDING, FULL = "sliding_attention", "full_attention"
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def _with(**changes):
    return {**COMMON, **changes}


# family -> (config factory, attention implementations the architecture offers, refusal text or None).
# Gemma-2 and GPT-OSS have no SDPA attention in transformers; they run eager here.
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**COMMON), ("sdpa", "eager"), None),
    "qwen2": (  # full layers below max_window_layers, sliding above it
        lambda: transformers.Qwen2Config(
            **_with(num_hidden_layers=4), use_sliding_window=True, sliding_window=4, max_window_layers=2
        ),
        ("sdpa", "eager"),
        None,
    ),
    "qwen3": (
        lambda: transformers.Qwen3Config(
            **_with(num_hidden_layers=3),
            head_dim=8,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
        ),
        ("sdpa", "eager"),
        None,
    ),
    "gemma2": (  # alternating sliding / full layers, attention and final logit soft-capping
        lambda: transformers.Gemma2Config(
            **_with(num_hidden_layers=3), head_dim=8, sliding_window=4, query_pre_attn_scalar=8
        ),
        ("eager",),
        None,
    ),
    "gemma3_text": (
        lambda: transformers.Gemma3TextConfig(
            **_with(num_hidden_layers=3),
            head_dim=8,
            sliding_window=3,
            layer_types=[SLIDING, FULL, SLIDING],
            query_pre_attn_scalar=8,
        ),
        ("sdpa", "eager"),
        None,
    ),
    "mistral": (lambda: transformers.MistralConfig(**COMMON, sliding_window=4), ("sdpa", "eager"), None),
    # logits_scaling stays 1 here: the head's logit transforms are the LM head's concern (test_logprobs).
    "granite": (
        lambda: transformers.GraniteConfig(**COMMON, residual_multiplier=0.5),
        ("sdpa", "eager"),
        None,
    ),
    "cohere2": (
        lambda: transformers.Cohere2Config(
            **_with(num_hidden_layers=3), head_dim=8, sliding_window=4, layer_types=[SLIDING, FULL, SLIDING]
        ),
        ("sdpa", "eager"),
        None,
    ),
    "gpt_oss": (
        lambda: transformers.GptOssConfig(
            **COMMON, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4
        ),
        ("eager",),
        None,
    ),
    "qwen3_moe": (  # every layer sliding (no layer_types): one mask for all layers
        lambda: transformers.Qwen3MoeConfig(
            **COMMON,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            use_sliding_window=True,
            sliding_window=4,
        ),
        ("sdpa", "eager"),
        None,
    ),
    "olmo": (lambda: transformers.OlmoConfig(**COMMON), ("sdpa", "eager"), None),
    "lfm2": (
        lambda: transformers.Lfm2Config(**COMMON, layer_types=["conv", FULL]),
        ("sdpa", "eager"),
        "Lfm2ForCausalLM has 'conv' layers, which mix tokens without an attention mask",
    ),
    "nemotron_h": (
        lambda: transformers.NemotronHConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            layers_block_type=["linear_attention", FULL, "mlp"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            ssm_state_size=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            n_groups=1,
            chunk_size=8,
            max_position_embeddings=256,
        ),
        ("sdpa", "eager"),
        "NemotronHForCausalLM has 'linear_attention' layers, which mix tokens without an attention mask",
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=2, eos_token_id=1
        ),
        ("sdpa", "eager"),
        None,
    ),
}
CASES = [(family, impl) for family, (_, impls, _) in FAMILIES.items() for impl in impls]


def build(family, impl="sdpa", seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family][0](), attn_implementation=impl)
    return model.eval()


def features(seed, b=4, k=2):
    """Prompts of 6-10 tokens, responses of 5-11: every sequence longer than twice the largest window (5)."""
    rng = random.Random(seed)
    return [
        {
            "prompt_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(6, 10))],
            "response_ids": [[rng.randrange(3, VOCAB) for _ in range(rng.randint(5, 11))] for _ in range(k)],
        }
        for _ in range(b)
    ]


def collate(layout, rows):
    if layout == "padded":
        return PaddedCollator(pad_token_id=0)(rows)
    return GroupedCollator(pad_token_id=0, layout=layout)(rows)


@torch.no_grad()
def own_logps(model, rows):
    """(B, K) float64: each response's summed log-prob from the model's own logits, one sequence at a time."""
    out = torch.zeros(len(rows), len(rows[0]["response_ids"]), dtype=torch.float64)
    for b, row in enumerate(rows):
        prompt = row["prompt_ids"]
        for k, response in enumerate(row["response_ids"]):
            logits = model(torch.tensor([prompt + response])).logits[0].double()
            logps = logits.log_softmax(-1)[len(prompt) - 1 : -1]
            out[b, k] = logps.gather(-1, torch.tensor(response)[:, None]).sum()
    return out


def windows_of(model):
    return [w for _, w in mask_plan(model).windows if w is not None]


@pytest.mark.parametrize("family,impl", CASES)
def test_every_layout_scores_what_the_model_computes_or_is_refused(family, impl, caplog):
    model = build(family, impl)
    rows = features(seed=len(family))
    expected = own_logps(model, rows)
    with torch.no_grad():  # the padded layout is exact for every family, refused ones included
        padded = sequence_logps(model, collate("padded", rows), chunk_size=5)
    torch.testing.assert_close(padded.double(), expected, rtol=1e-5, atol=1e-4)

    refusal = FAMILIES[family][2]
    if refusal:
        assert grouped_layout_unsupported(model) == refusal
        with caplog.at_level("WARNING"):
            assert resolve_layout("auto", [model]) == "padded"
        assert refusal in caplog.text and "using 'padded'" in caplog.text
        with pytest.raises(LayoutUnsupported, match="mix tokens"):
            sequence_logps(model, collate("shared_prompt", rows))
        return

    assert grouped_layout_unsupported(model) is None
    assert resolve_layout("auto", [model]) == ("packed" if impl == "eager" else "shared_prompt")
    shortest = min(len(r["prompt_ids"]) + min(map(len, r["response_ids"])) for r in rows)
    assert all(shortest > 2 * w for w in windows_of(model))  # every window is exceeded
    for layout in ("packed", "shared_prompt"):
        with torch.no_grad():
            got = sequence_logps(model, collate(layout, rows), chunk_size=5)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4, msg=f"{layout}")


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "qwen2", "gpt_oss"])
def test_a_window_blind_mask_would_be_caught(family, monkeypatch):
    """The rows above are long enough that ignoring the windows changes the scores (the old behaviour)."""
    impl = FAMILIES[family][1][0]
    model = build(family, impl)
    rows = features(seed=len(family))
    expected = own_logps(model, rows)
    blind = attention._layer_windows

    def window_blind(inner):
        return [(layer_type, None) for layer_type, _ in blind(inner)]

    monkeypatch.setattr(attention, "_layer_windows", window_blind)
    with torch.no_grad():
        got = sequence_logps(model, collate("shared_prompt", rows)).double()
    assert (got - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_windowed_layouts_match_padded_gradients(family, layout):
    model = build(family, "sdpa" if family != "gemma2" else "eager")
    rows = features(seed=3, b=3, k=3)
    grads = {}
    for name in ("padded", layout):
        model.zero_grad()
        logps = sequence_logps(model, collate(name, rows), chunk_size=4)
        (logps * torch.tensor([1.0, -0.5, 0.25])).sum().backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for got, want in zip(grads[layout], grads["padded"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_window_follows_positions_as_transformers_does_for_packed_rows():
    """Our windowed mask equals transformers' own sliding-window mask for packed rows (built from position_ids)."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    config = FAMILIES["mistral"][0]()
    config._attn_implementation = "sdpa"
    batch = collate("packed", features(seed=11, b=5, k=2))
    rows, width = batch["input_ids"].shape
    theirs = create_sliding_window_causal_mask(
        config=config,
        inputs_embeds=torch.zeros(rows, width, 8),
        attention_mask=None,
        cache=None,
        position_ids=batch["position_ids"],
    )[:, 0]
    ours = attention_allowed(batch["doc_ids"], batch["branch_ids"], batch["position_ids"], window=4)
    real = batch["doc_ids"] >= 0
    pairs = real[:, :, None] & real[:, None, :]
    assert torch.equal(ours[pairs], theirs[pairs])
    assert not torch.equal(ours, attention_allowed(batch["doc_ids"], batch["branch_ids"]))  # the window cut


def test_shared_prompt_window_reaches_back_into_the_prompt_by_position():
    """A response token at position p sees prompt tokens at positions > p - w and its own branch only."""
    batch = collate("shared_prompt", [{"prompt_ids": [5, 6, 7], "response_ids": [[8, 9], [10, 11, 12]]}])
    allowed = attention_allowed(batch["doc_ids"], batch["branch_ids"], batch["position_ids"], window=3)[0]
    # flat: prompt 0,1,2 | response 0 at 3,4 (pos 3,4) | response 1 at 5,6,7 (pos 3,4,5)
    assert allowed[5].nonzero().flatten().tolist() == [1, 2, 5]  # pos 3 sees pos 1, 2, 3
    assert allowed[7].nonzero().flatten().tolist() == [5, 6, 7]  # pos 5 sees pos 3, 4, 5 of its branch
    assert allowed[4].nonzero().flatten().tolist() == [2, 3, 4]


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
@pytest.mark.parametrize("window", [3, 5])
def test_flex_attention_block_mask_equals_the_dense_mask_on_windowed_layers(layout, window):
    """The FlexAttention `BlockMask` (uncompiled reference kernel on CPU) attends like SDPA's dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch = collate(layout, features(seed=9, b=6, k=3))
    doc, branch, pos = batch["doc_ids"], batch["branch_ids"], batch["position_ids"]
    rows, width = doc.shape
    mask_mod = flex_mask_mod(doc, branch, pos, window)
    block_mask = create_block_mask(mask_mod, rows, None, width, width, device="cpu", BLOCK_SIZE=8)
    q, k, v = (torch.randn(rows, 2, width, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    flex = flex_attention(q, k, v, block_mask=block_mask)
    dense_mask = attention_allowed(doc, branch, pos, window)[:, None]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
    real = (doc >= 0)[:, None, :, None].expand_as(flex)
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-5, atol=1e-5)


def test_the_mask_takes_the_form_of_each_layer_type_and_implementation():
    rows = features(seed=1)
    keyed = attention.grouped_attention_mask(collate("shared_prompt", rows), build("gemma3_text", "eager"))
    assert set(keyed) == {SLIDING, FULL}
    assert keyed[FULL].dtype == torch.float32 and (keyed[FULL] < 0).any()  # additive for eager
    assert ((keyed[SLIDING] < 0) & (keyed[FULL] == 0)).any()  # the window hides keys the full layer sees
    single = attention.grouped_attention_mask(collate("packed", rows), build("mistral", "sdpa"))
    assert isinstance(single, torch.Tensor) and single.dtype == torch.bool and single.dim() == 4


def test_models_that_cannot_be_served_exactly_are_refused_with_the_reason():
    model = build("mistral")
    model.config._attn_implementation_internal = "flash_attention_2"  # only the name matters
    assert "'flash_attention_2' attention takes no explicit attention mask" in grouped_layout_unsupported(
        model
    )

    model = build("gemma3_text")
    model.config.sliding_window = None
    assert "sliding_window=None" in grouped_layout_unsupported(model)

    model = build("gemma3_text")
    model.config.use_bidirectional_attention = True
    assert "bidirectionally" in grouped_layout_unsupported(model)

    mamba = transformers.AutoModelForCausalLM.from_config(
        transformers.MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4)
    )
    assert grouped_layout_unsupported(mamba) is not None
    assert resolve_layout("packed", [build("llama"), mamba]) == "padded"
    assert resolve_layout("padded", [mamba]) == "padded"


# ---------------------------------------------------------------- query-chunked SDPA (memory linear in T)


def long_features(seed, b=2, k=2):
    """Rows of 20-40 tokens: several query chunks of 8."""
    rng = random.Random(seed)
    return [
        {
            "prompt_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(10, 20))],
            "response_ids": [[rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 20))] for _ in range(k)],
        }
        for _ in range(b)
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3_text", "gpt2"])
def test_chunked_sdpa_gives_padded_logps_and_gradients_past_the_chunk_size(family, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    model = build(family, "sdpa")
    attention.choose_attention([model], None, "cpu", "shared_prompt")
    assert model.config._attn_implementation == attention.CHUNKED_SDPA
    rows = long_features(seed=len(family), k=3)
    expected = own_logps(model, rows)  # plain forwards: transformers' own SDPA path, unchanged
    results = {}
    for layout in ("padded", "packed", "shared_prompt"):
        batch = collate(layout, rows)
        assert batch["input_ids"].shape[1] > 3 * 8
        model.zero_grad()
        logps = sequence_logps(model, batch, chunk_size=5)
        (logps * torch.tensor([1.0, -0.5, 0.25])).sum().backward()
        results[layout] = (logps.detach(), [p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-4, msg=layout)
    for layout in ("packed", "shared_prompt"):
        for got, want in zip(results[layout][1], results["padded"][1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _square_saved(model, batch, width):
    """Tensors autograd saves for the backward pass of `sequence_logps` whose last two dims are (T, T)."""
    square = []

    def pack(tensor):
        if tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (width, width):
            square.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sequence_logps(model, batch).sum().backward()
    return square


def test_chunked_sdpa_keeps_no_row_by_row_matrix_for_the_backward_pass(monkeypatch):
    """Dense SDPA saves a (rows, 1, T, T) mask in every layer; the chunked path saves no (T, T) tensor."""
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    batch = collate("shared_prompt", long_features(seed=4, b=4, k=2))
    width = batch["input_ids"].shape[1]
    assert width > 2 * 16
    dense = build("mistral", "sdpa")
    assert len(_square_saved(dense, dict(batch), width)) >= dense.config.num_hidden_layers
    chunked = build("mistral", "sdpa")
    attention.choose_attention([chunked], None, "cpu", "shared_prompt")
    assert _square_saved(chunked, dict(batch), width) == []


def test_choose_attention_keeps_eager_and_flex_and_refuses_nothing_silently():
    eager, sdpa = build("llama", "eager"), build("llama", "sdpa")
    attention.choose_attention([eager, sdpa, None], None, "cpu", "packed")
    assert eager.config._attn_implementation == "eager"  # the user's explicit choice
    assert sdpa.config._attn_implementation == attention.CHUNKED_SDPA
    assert grouped_layout_unsupported(sdpa) is None
    gemma2 = build("gemma2", "eager")  # soft-capped attention: stays eager
    attention.choose_attention([gemma2], None, "cpu", "packed")
    assert gemma2.config._attn_implementation == "eager"


def test_auto_never_gives_eager_attention_a_mask_larger_than_padded(caplog):
    """Eager attention takes a dense mask: `auto` picks `packed`, whose mask is never larger than padded's,
    where `shared_prompt`'s can be (long responses). SDPA models keep `shared_prompt` (chunked: linear)."""
    eager = build("llama", "eager")
    with caplog.at_level("WARNING"):
        assert resolve_layout("auto", [eager, None]) == "packed"
    assert "eager attention" in caplog.text and "'packed'" in caplog.text
    assert resolve_layout("auto", [build("llama", "sdpa")]) == "shared_prompt"
    assert resolve_layout("shared_prompt", [eager]) == "shared_prompt"  # an explicit choice is kept

    rows = [{"prompt_ids": list(range(3, 23)), "response_ids": [list(range(3, 33)), list(range(3, 38))]}] * 2
    padded = collate("padded", rows)["input_ids"]
    padded_cells = padded.shape[0] * padded.shape[1] ** 2  # transformers' (2B, 1, T, T) mask
    for layout, larger in (("packed", False), ("shared_prompt", True)):
        mask = attention.grouped_attention_mask(collate(layout, rows), eager)
        assert (mask.numel() > padded_cells) is larger


@pytest.mark.parametrize("reentrant", [True, False])
def test_chunked_sdpa_under_gradient_checkpointing(reentrant, monkeypatch):
    """The chunks' own recomputation nests inside the model's activation checkpointing (either kind)."""
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)
    model = build("qwen2", "sdpa")
    attention.choose_attention([model], None, "cpu", "shared_prompt")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    rows = long_features(seed=8, k=2)
    grads = {}
    for layout in ("padded", "shared_prompt"):
        model.zero_grad()
        sequence_logps(model, collate(layout, rows)).sum().backward()
        grads[layout] = [p.grad.clone() for p in model.parameters()]
    for got, want in zip(grads["shared_prompt"], grads["padded"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _Attention(torch.nn.Module):
    num_key_value_groups = 2  # 4 query heads over 2 key/value heads


def _grouped_ids(batch, window, chunk):
    ids = attention._GroupedIds(batch["doc_ids"], batch["branch_ids"], batch["position_ids"], window, chunk)
    return ids, attention._ids_carrier(ids)


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
@pytest.mark.parametrize("window", [None, 5])
def test_chunked_sdpa_equals_sdpa_with_the_whole_mask_outputs_and_gradients(layout, window):
    """Against SDPA given the layout's whole (T, T) mask, on rows holding several groups, three responses,
    padding and chunks of 4 (so chunks start inside segments and segments inside chunks): the same output at
    every real token, zero at padding, and the same gradients for queries, keys and values."""
    torch.manual_seed(0)
    rows = [
        {"prompt_ids": [3] * p, "response_ids": [[4] * r for r in responses]}
        for p, responses in ((9, (6, 11, 3)), (3, (2, 5, 1)), (13, (7, 4, 9)), (5, (3, 3, 3)), (2, (1, 1, 1)))
    ]
    batch = collate(layout, rows)
    doc = batch["doc_ids"]
    assert (doc == attention.PAD_DOC).any() and (doc.amax(dim=1) > 0).any()  # padding; several groups a row
    ids, carrier = _grouped_ids(batch, window, chunk=4)
    n, width = doc.shape
    q = torch.randn(n, 4, width, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 2, width, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n, 2, width, 8, dtype=torch.float64, requires_grad=True)
    module = _Attention().train()
    out, _ = attention.chunked_sdpa_attention(module, q, k, v, carrier)  # (rows, T, heads, d)
    allowed = attention_allowed(doc, batch["branch_ids"], batch["position_ids"], window)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=allowed
    ).transpose(1, 2)
    real = (doc != attention.PAD_DOC)[:, :, None, None]
    torch.testing.assert_close(out * real, want * real)
    assert not out[~real.expand_as(out)].any()  # padding attends nothing
    weights = torch.randn_like(out) * real
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


def test_chunked_sdpa_scores_only_the_keys_each_chunk_can_see(monkeypatch):
    """A response's queries score their prompt and their own response, never another response: each SDPA
    call's (queries x keys) is the chunk's size times the keys its last query may see (the whole mask's row)."""
    rows = [{"prompt_ids": [3] * 10, "response_ids": [[4] * 12, [5] * 9, [6] * 7]}]
    batch = collate("shared_prompt", rows)
    ids, carrier = _grouped_ids(batch, None, chunk=4)
    width = batch["doc_ids"].shape[1]
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(query, key, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    q = torch.randn(1, 4, width, 8)
    kv = torch.randn(1, 2, width, 8)
    attention.chunked_sdpa_attention(_Attention().eval(), q, kv, kv, carrier)
    allowed = attention_allowed(batch["doc_ids"], batch["branch_ids"])[0]
    expected = []
    for start, end in ((0, 10), (10, 22), (22, 31), (31, 38)):  # the prompt, then each response
        for a in range(start, end, 4):
            b = min(a + 4, end)
            expected.append((b - a, int(allowed[b - 1].sum())))
    assert calls == expected
    assert calls[-2:] == [(4, 10 + 4), (3, 10 + 7)]  # the last response: its prompt and itself only


def test_chunked_sdpa_refuses_a_mask_that_lost_its_ids():
    batch = collate("packed", features(seed=2))
    model = build("llama", "sdpa")
    attention.choose_attention([model], None, "cpu", "packed")
    carrier = attention.grouped_attention_mask(batch, model)
    rows, width = batch["input_ids"].shape
    q, kv = torch.randn(rows, 4, width, 8), torch.randn(rows, 2, width, 8)  # 4 query heads, 2 key/value heads
    attention_module = model.model.layers[0].self_attn
    out, _ = attention.chunked_sdpa_attention(attention_module, q, kv, kv, carrier)  # the carrier: fine
    assert out.shape == (rows, width, 4, 8)
    with pytest.raises(RuntimeError, match="without its token ids"):
        attention.chunked_sdpa_attention(attention_module, q, kv, kv, carrier[:, :, :, :])  # a view: no ids
