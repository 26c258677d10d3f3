"""Every layout gives the padded layout's log-probs, losses and gradients; the masks never leak."""

import random

import pytest
import torch

from dpo_trainer.attention import attention_allowed, flex_mask_mod
from dpo_trainer.data import PaddedCollator
from dpo_trainer.data.layouts import GroupedCollator, _first_fit_decreasing
from dpo_trainer.logprobs import sequence_logps
from dpo_trainer.losses import plackett_luce_loss, preference_loss
from dpo_trainer.testing import tiny_causal_lm

VOCAB = 64
LAYOUTS = ["packed", "shared_prompt"]


def features(seed, b=5, k=2, empty=True):
    """Mixed lengths; with `empty`, one response emptied by truncation."""
    rng = random.Random(seed)
    rows = []
    for i in range(b):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 9))]
        responses = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 11))] for _ in range(k)]
        if empty and i == 2:
            responses[1] = []
        rows.append({"prompt_ids": prompt, "response_ids": responses})
    return rows


def collate(layout, rows):
    if layout == "padded":
        return PaddedCollator(pad_token_id=0)(rows)
    return GroupedCollator(pad_token_id=0, layout=layout)(rows)


def model(arch="llama", impl="sdpa"):
    return tiny_causal_lm(
        VOCAB, arch=arch, hidden_size=32, num_layers=2, num_heads=4, attn_implementation=impl, seed=1
    )


def loss_of(logps):
    if logps.shape[1] == 2:
        return preference_loss(logps[:, 0], logps[:, 1], logps[:, 0].detach() * 0.9, logps[:, 1].detach())[
            0
        ].sum()
    return plackett_luce_loss(logps, logps.detach() * 0.9).sum()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "arch,impl", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("qwen2", "sdpa")]
)
@pytest.mark.parametrize("k", [2, 3])
def test_layouts_match_padded_logps_losses_and_gradients(layout, arch, impl, k):
    net = model(arch, impl)
    rows = features(seed=k, k=k)
    results = {}
    for name in ("padded", layout):
        net.zero_grad()
        logps = sequence_logps(net, collate(name, rows), chunk_size=7)
        loss = loss_of(logps)
        loss.backward()
        results[name] = (logps.detach(), loss.detach(), [p.grad.clone() for p in net.parameters()])
    (ref_logps, ref_loss, ref_grads), (logps, loss, grads) = results["padded"], results[layout]
    torch.testing.assert_close(logps, ref_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert logps[2, 1] == 0.0  # an emptied response scores log 1 = 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_remove_padding_and_shared_prompt_runs_the_prompt_once(layout):
    rows = features(seed=7, b=8, empty=False)
    padded, grouped = collate("padded", rows), collate(layout, rows)
    real = sum(len(r["prompt_ids"]) * 2 + sum(map(len, r["response_ids"])) for r in rows)
    assert int(padded["attention_mask"].sum()) == real
    if layout == "packed":  # rows never longer than the padded layout's
        assert grouped["input_ids"].shape[1] <= padded["input_ids"].shape[1]
    assert grouped["input_ids"].numel() < padded["input_ids"].numel()
    used = int((grouped["doc_ids"] >= 0).sum())
    prompts = sum(len(r["prompt_ids"]) for r in rows)
    assert used == (real - prompts if layout == "shared_prompt" else real)


def test_shared_prompt_mask_never_lets_a_response_see_another():
    rows = features(seed=3, b=6, k=3, empty=False)
    batch = collate("shared_prompt", rows)
    allowed = attention_allowed(batch["doc_ids"], batch["branch_ids"])
    doc, branch = batch["doc_ids"], batch["branch_ids"]
    for r in range(allowed.shape[0]):
        for i in range(allowed.shape[1]):
            for j in range(allowed.shape[2]):
                if doc[r, i] < 0:
                    continue
                other_response = branch[r, i] >= 0 and branch[r, j] >= 0 and branch[r, i] != branch[r, j]
                other_doc = doc[r, i] != doc[r, j]
                if other_response or other_doc or j > i:
                    assert not allowed[r, i, j], (r, i, j)
                elif doc[r, i] == doc[r, j] and branch[r, j] < 0:
                    assert allowed[r, i, j]  # every response token sees its whole prompt


@pytest.mark.parametrize("layout", LAYOUTS)
def test_changing_one_response_leaves_the_others_scores_unchanged(layout):
    net = model()
    rows = features(seed=5, b=4, k=2, empty=False)
    before = sequence_logps(net, collate(layout, rows)).detach()
    changed = [dict(r, response_ids=[r["response_ids"][0], [5] * 12]) for r in rows]
    after = sequence_logps(net, collate(layout, changed)).detach()
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=1e-6, atol=1e-5)  # chosen untouched
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_first_fit_decreasing_packs_whole_groups_within_capacity():
    lengths = [7, 3, 5, 2, 4, 1, 6]
    bins = _first_fit_decreasing(lengths, 7)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 7 for b in bins)
    assert len(bins) == 4  # 28 tokens, capacity 7: optimal here


def test_grouped_collator_passes_reference_logps_and_rejects_bad_layouts():
    rows = [dict(r, ref_logps=[-1.0, -2.0]) for r in features(seed=1, b=3, empty=False)]
    batch = collate("shared_prompt", rows)
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0]] * 3
    with pytest.raises(ValueError, match="layout"):
        GroupedCollator(pad_token_id=0, layout="diagonal")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_attention_block_mask_equals_the_dense_mask(layout):
    """The GPU path's BlockMask (run here with FlexAttention's uncompiled reference kernel) attends exactly
    like SDPA with the CPU path's boolean mask, on a ranked batch with uneven rows."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch = collate(layout, features(seed=9, b=6, k=3))
    doc, branch = batch["doc_ids"], batch["branch_ids"]
    rows, width = doc.shape
    block_mask = create_block_mask(
        flex_mask_mod(doc, branch), rows, None, width, width, device="cpu", BLOCK_SIZE=8
    )
    q, k, v = (torch.randn(rows, 2, width, 16) for _ in range(3))
    flex = flex_attention(q, k, v, block_mask=block_mask)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_allowed(doc, branch)[:, None]
    )
    real = (doc >= 0)[:, None, :, None].expand_as(flex)
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-5, atol=1e-5)
