"""The sequence-level KL estimator (dpo_trainer.evaluation.kl) against an exact KL, computed by
enumerating every response of a model with a 6-token vocabulary up to 3 new tokens."""

import math
import random

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from dpo_trainer.evaluation.kl import (
    best_of_n_kl,
    mean_and_stderr,
    sequence_kl,
    sequence_logprobs,
)
from dpo_trainer.evaluation.sampling import sample_responses
from dpo_trainer.testing import tiny_causal_lm

VOCAB = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "a": 3, "b": 4, "c": 5}
EOS = 1
MAX_NEW = 3
PROMPTS = [[3, 4], [5], [4, 4, 3]]


@pytest.fixture(scope="module")
def word_tokenizer():
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def peaked_model(seed):
    # initializer_range 0.5: far from uniform next-token distributions, so the two models differ clearly
    return tiny_causal_lm(
        len(VOCAB), hidden_size=16, num_layers=1, num_heads=2, seed=seed, initializer_range=0.5
    )


@pytest.fixture(scope="module")
def policy():
    return peaked_model(1).eval()


@pytest.fixture(scope="module")
def reference():
    return peaked_model(2).eval()


def next_token_logps(model, ids):
    """float64 log-distribution of the token after `ids`, from one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, dim=-1)


def every_response(model, prompt):
    """Every response to `prompt` (stopping at EOS or after MAX_NEW tokens) with its float64 log-prob,
    walked token by token: the oracle, independent of batching, padding and gathering."""
    out = []

    def walk(prefix, logp):
        if (prefix and prefix[-1] == EOS) or len(prefix) == MAX_NEW:
            out.append((tuple(prefix), logp))
            return
        dist = next_token_logps(model, prompt + prefix)
        for token in range(len(VOCAB)):
            walk(prefix + [token], logp + float(dist[token]))

    walk([], 0.0)
    return out


def exact_kl(policy, reference, prompt):
    """Σ_y π(y) [log π(y) - log π_ref(y)] over every response y."""
    ref = dict(every_response(reference, prompt))
    return math.fsum(math.exp(lp) * (lp - ref[y]) for y, lp in every_response(policy, prompt))


def test_logprobs_of_every_response_match_the_token_by_token_oracle(policy):
    for prompt in PROMPTS:
        responses = every_response(policy, prompt)
        assert math.isclose(math.fsum(math.exp(lp) for _, lp in responses), 1.0, abs_tol=1e-9)
        # batches of 7 mix lengths 1-3, so right padding is exercised
        got = sequence_logprobs(policy, [prompt] * len(responses), [y for y, _ in responses], batch_size=7)
        want = torch.tensor([lp for _, lp in responses], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_probability_weighted_log_ratios_equal_the_exact_kl(policy, reference):
    for prompt in PROMPTS:
        responses = every_response(policy, prompt)
        estimate = sequence_kl(policy, reference, [prompt] * len(responses), [y for y, _ in responses])
        weighted = math.fsum(math.exp(lp) * r for (_, lp), r in zip(responses, estimate.log_ratios))
        kl = exact_kl(policy, reference, prompt)
        assert kl > 0.05  # the models differ, so the check has teeth
        assert weighted == pytest.approx(kl, abs=1e-4)
    same = sequence_kl(policy, policy, [PROMPTS[0]] * 3, [[3], [4, 1], [5, 5, 5]])
    assert same.mean == 0.0 and same.stderr == 0.0


def test_monte_carlo_estimate_from_samples_is_within_its_standard_error(policy, reference, word_tokenizer):
    prompts = ["a b", "c", "b b a"]
    prompt_ids = [word_tokenizer(p)["input_ids"] for p in prompts]
    assert prompt_ids == PROMPTS
    samples = sample_responses(
        policy, word_tokenizer, prompts, num_samples=1500, batch_size=750, max_new_tokens=MAX_NEW,
        seed=0, disable_progress=True, return_token_ids=True,
    )  # fmt: skip
    flat_prompts = [ids for ids, rows in zip(prompt_ids, samples) for _ in rows]
    flat_samples = [row for rows in samples for row in rows]
    for row in flat_samples:  # generated as is: EOS kept when it ends the response, nothing after it
        assert 1 <= len(row) <= MAX_NEW and EOS not in row[:-1]
        assert row[-1] == EOS or len(row) == MAX_NEW
    estimate = sequence_kl(policy, reference, flat_prompts, flat_samples, batch_size=500)
    exact = sum(exact_kl(policy, reference, prompt) for prompt in PROMPTS) / len(PROMPTS)
    assert estimate.n == 4500
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert 0 < estimate.stderr < 0.1 * exact


def test_token_ids_decode_to_the_plain_samples(policy, word_tokenizer):
    kwargs = dict(num_samples=4, max_new_tokens=MAX_NEW, seed=3, disable_progress=True)
    texts = sample_responses(policy, word_tokenizer, ["a b", "c"], **kwargs)
    ids = sample_responses(policy, word_tokenizer, ["a b", "c"], return_token_ids=True, **kwargs)
    decoded = [[word_tokenizer.decode(row, skip_special_tokens=True) for row in rows] for rows in ids]
    assert decoded == texts


def test_mean_and_stderr_against_the_textbook_formula():
    values = [random.Random(0).gauss(1.0, 2.0) for _ in range(50)]
    mean = sum(values) / 50
    std = (sum((v - mean) ** 2 for v in values) / 49) ** 0.5
    assert mean_and_stderr(values) == pytest.approx((mean, std / 50**0.5))
    assert mean_and_stderr([2.5]) == (2.5, 0.0)
    with pytest.raises(ValueError):
        mean_and_stderr([])


def exact_best_of_n_kl(probabilities, n):
    """KL(BoN ‖ base) on atoms sorted by reward, all rewards distinct: P(best = i) = F_i^n - F_{i-1}^n."""
    kl, below = 0.0, 0.0
    for p in probabilities:
        q = (below + p) ** n - below**n
        kl += q * math.log(q / p) if q > 0 else 0.0
        below += p
    return kl


def test_best_of_n_kl_is_exact_in_the_continuous_limit_and_an_upper_bound_otherwise():
    assert best_of_n_kl(1) == 0.0
    fine = [1 / 20000] * 20000
    coarse = [0.5, 0.3, 0.2]
    for n in (2, 4, 16):
        assert exact_best_of_n_kl(fine, n) == pytest.approx(best_of_n_kl(n), abs=2e-3)
        assert exact_best_of_n_kl(coarse, n) < best_of_n_kl(n)
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl(0)


def test_bad_input_is_named(policy):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        sequence_logprobs(policy, [[3], [4]], [[1]])
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        sequence_logprobs(policy, [[3], []], [[1], [1]])


def test_enumeration_covers_every_response(policy):
    # [EOS], [t, EOS] for the 5 other tokens, and every [t1, t2, any] with t1, t2 not EOS
    count = len(every_response(policy, [3]))
    non_eos = len(VOCAB) - 1
    assert count == 1 + non_eos + non_eos**2 * len(VOCAB)
