"""TRL 1.16's loss family as the oracle: for every loss type both libraries define alike, our evaluation loss
and reward metrics equal TRL's on the same policy, reference and rows.

One TRL trainer and one of ours are built per data format (standard and conversational, the tiny tokenizer's
chat template) and reused: each case sets the loss settings on both (TRL reads `loss_types`,
`loss_weights`, `label_smoothing`, `f_divergence_type`, `f_alpha_divergence_coef` and `args.discopop_tau`
when it computes the loss) and runs one `evaluate()` each, so TRL's numbers come from its own code path.

The reference is the policy with every weight perturbed slightly: log-ratios of order 1, where every loss is
away from its neutral point (a policy equal to its reference would make most losses a constant).

Every name TRL defines computes TRL's numbers: `ipo` (per-token means), `bco_pair` (no reward shift) and
`alpha_divergence` (TRL's code form, checked at α = 0.3, 0.5 and 0.7) included. The papers' forms have names of
their own; `alpha_divergence_paper` at 1 - α equals TRL's `alpha_divergence` at α, which is checked here too.
The deprecated names `ipo_trl`, `bco_pair_trl` and `alpha_divergence_trl` give TRL's numbers with a
`FutureWarning`.

`label_smoothing`: TRL's `aot` and `aot_unpaired` use it (cDPO-smoothed, compared here with eps > 0) and TRL's
`sigmoid` ignores it. Ours refuses `sigmoid` with eps > 0 and names `cdpo`, conservative DPO, which TRL does not
define; it is checked against TRL through a linear identity with TRL's `sigmoid` and `robust`.
"""

import copy
import warnings

import pytest
import torch
import trl
from datasets import Dataset

import dpo_trainer
from dpo_trainer.testing import CHAT_TEMPLATE, tiny_causal_lm

from conftest import preference_rows

pytestmark = pytest.mark.slow  # about 40 s: three pairs of trainers, about 110 evaluations

NUM_ROWS, EVAL_BATCH, BETA = (
    8,
    4,
    0.5,
)  # two equal eval batches: TRL averages batch means, we average examples
COMPARED = (
    "eval_loss",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/margins",
    "eval_rewards/accuracies",
    "eval_logps/chosen",
    "eval_logps/rejected",
)

# (id, TRL settings, our settings); settings: loss_type, loss_weights, label_smoothing, f_divergence_type,
# f_alpha_divergence_coef, discopop_tau
DEFAULTS = dict(
    loss_weights=None,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    ld_alpha=None,
)


def case(case_id, trl_loss, our_loss=None, *, ours=None, **settings):
    """A parametrized case: TRL's settings, and ours (the same unless `our_loss` / `ours` say otherwise)."""
    theirs = {**DEFAULTS, **settings, "loss_type": trl_loss}
    our_settings = {**DEFAULTS, **settings, "loss_type": our_loss or trl_loss, **(ours or {})}
    return pytest.param(theirs, our_settings, id=case_id)


# TRL's alpha_divergence with coefficient a computes (u^(a-1) - 1)/(a - 1): our alpha_divergence at a, and our
# alpha_divergence_paper (the paper's (1 - u^-a)/a) at 1 - a.
TRL_ALPHA_03 = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
TRL_ALPHA_07 = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7)
CASES = [
    case("sigmoid", ["sigmoid"]),
    case("hinge", ["hinge"]),
    case("robust", ["robust"], label_smoothing=0.1),
    case("ipo", ["ipo"]),
    case("exo_pair", ["exo_pair"], label_smoothing=1e-3),
    case("nca_pair", ["nca_pair"]),
    case("bco_pair", ["bco_pair"]),
    case("sppo_hard", ["sppo_hard"]),
    case("aot", ["aot"], label_smoothing=0.1),
    case("aot_unpaired", ["aot_unpaired"]),
    case("aot_unpaired_eps", ["aot_unpaired"], label_smoothing=0.1),
    case("apo_zero", ["apo_zero"]),
    case("apo_down", ["apo_down"]),
    case("discopop", ["discopop"]),
    case("discopop_tau2", ["discopop"], discopop_tau=2.0),
    case("sft", ["sft"]),
    case("sigmoid_norm", ["sigmoid_norm"]),
    case("mpo", ["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    case("forward_kl", ["sigmoid"], f_divergence_type="forward_kl"),
    case("js_divergence", ["exo_pair"], f_divergence_type="js_divergence", label_smoothing=0.01),
    case("alpha_0.5", ["sigmoid_norm"], f_divergence_type="alpha_divergence"),
    case("alpha_0.3", ["ipo"], **TRL_ALPHA_03),
    case("alpha_0.7", ["hinge"], **TRL_ALPHA_07),
    case(
        "alpha_paper_0.7_is_trl_0.3",
        ["sigmoid"],
        ours=dict(f_divergence_type="alpha_divergence_paper", f_alpha_divergence_coef=0.7),
        **TRL_ALPHA_03,
    ),
    # the previous release's names of TRL's forms: deprecated, the same numbers
    case(
        "deprecated_ipo_trl_alpha_trl_0.7",
        ["ipo", "sigmoid"],
        ["ipo_trl", "sigmoid"],
        loss_weights=[1.0, 0.5],
        ours=dict(f_divergence_type="alpha_divergence_trl"),
        **TRL_ALPHA_07,
    ),
    case("deprecated_bco_pair_trl", ["bco_pair", "nca_pair"], ["bco_pair_trl", "nca_pair"]),
    case("ld_alpha_0.5", ["sigmoid"], ld_alpha=0.5),
    case("ld_alpha_0_sigmoid_norm", ["sigmoid_norm"], ld_alpha=0.0),
]


def chat_tokenizer(tokenizer):
    """The tiny tokenizer with a chat template whose assistant turns end in EOS (as ChatML's end in <|im_end|>)."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE.replace(
        "{{ '\\n\\nAssistant: ' + message['content'] }}",
        "{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}",
    )
    assert chat.chat_template != CHAT_TEMPLATE
    return chat


def conversational(rows):
    return [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"].lstrip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].lstrip()}],
        }
        for row in rows
    ]


def policy_and_reference(tokenizer, head_scale=1.0):
    """A tiny policy (its LM head scaled by `head_scale`) and a reference with every weight perturbed a little."""
    policy = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(head_scale)
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return policy, reference


@pytest.fixture(scope="module")
def trainers(tokenizer, tmp_path_factory):
    """{format: (TRL trainer, our trainer)} on the same policy, reference and rows."""
    return build_trainers(tokenizer, tmp_path_factory, *policy_and_reference(tokenizer))


@pytest.fixture(scope="module")
def wpo_trainers(tokenizer, tmp_path_factory):
    """The same with `use_weighting=True` (TRL decides at construction), on a policy whose sharper head gives
    WPO weights away from 1."""
    policy, reference = policy_and_reference(tokenizer, head_scale=30.0)
    return build_trainers(
        tokenizer, tmp_path_factory, policy, reference, formats=("standard",), use_weighting=True
    )


def build_trainers(
    tokenizer, tmp_path_factory, policy, reference, formats=("standard", "conversational"), **extra
):
    standard = preference_rows(NUM_ROWS, seed=4)
    out = {}
    available = {
        "standard": (standard, tokenizer),
        "conversational": (conversational(standard), chat_tokenizer(tokenizer)),
    }
    for fmt in formats:
        rows, tokenizer = available[fmt]
        tmp = tmp_path_factory.mktemp(fmt)
        trl_args = trl.DPOConfig(
            output_dir=str(tmp / "trl"),
            report_to="none",
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            prediction_loss_only=True,
            per_device_eval_batch_size=EVAL_BATCH,
            max_length=None,
            beta=BETA,
            disable_dropout=True,
            disable_tqdm=True,
            save_strategy="no",
            seed=0,
            **extra,
        )
        theirs = trl.DPOTrainer(
            copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=trl_args,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(rows),
            processing_class=copy.deepcopy(tokenizer),
        )
        our_args = dpo_trainer.DPOConfig(
            output_dir=str(tmp / "ours"),
            report_to="none",
            use_cpu=True,
            bf16=False,  # float32 and no recomputation, as TRL's settings above
            gradient_checkpointing=False,
            per_device_eval_batch_size=EVAL_BATCH,
            max_length=None,
            beta=BETA,
            disable_tqdm=True,
            save_strategy="no",
            seed=0,
            **extra,
        )
        ours = dpo_trainer.DPOTrainer(
            copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=our_args,
            train_dataset=rows,
            eval_dataset=rows,
            processing_class=tokenizer,
        )
        for index, (a, b) in enumerate(zip(theirs.eval_dataset, ours.eval_dataset, strict=True)):
            assert a["prompt_ids"] == b["prompt_ids"], f"{fmt} row {index}: prompt ids differ"
            assert [a["chosen_ids"], a["rejected_ids"]] == b["response_ids"], (
                f"{fmt} row {index}: responses differ"
            )
        # a non-trivial comparison: log-ratios of order 1, margins of both signs
        batch = ours.data_collator([ours.eval_dataset[i] for i in range(NUM_ROWS)])
        with torch.no_grad():
            logratios = ours.policy_logps(ours.model, batch) - ours.reference_logps(batch)
        margins = logratios[:, 0] - logratios[:, 1]
        assert logratios.abs().max() > 0.5 and (margins > 0).any() and (margins < 0).any(), logratios
        out[fmt] = (theirs, ours)
    return out


def apply_trl(trainer, settings):
    trainer.loss_types = list(settings["loss_type"])
    trainer.loss_weights = settings["loss_weights"] or [1.0] * len(trainer.loss_types)
    trainer.label_smoothing = settings["label_smoothing"]
    trainer.f_divergence_type = settings["f_divergence_type"]
    trainer.f_alpha_divergence_coef = settings["f_alpha_divergence_coef"]
    trainer.args.discopop_tau = settings["discopop_tau"]
    trainer.ld_alpha = settings["ld_alpha"]


def apply_ours(trainer, settings):
    for name, value in settings.items():
        setattr(trainer.args, name, value)
    trainer.args._check_loss_extras()  # the combination is one DPOConfig accepts
    # as DPOConfig.__post_init__ does: validated, and deprecated loss names stored as their new names
    trainer.args.loss_type = dpo_trainer.losses.check_loss_settings(
        settings["loss_type"],
        loss_weights=settings["loss_weights"],
        label_smoothing=settings["label_smoothing"],
        f_divergence_type=settings["f_divergence_type"],
    )


def deprecated_names(settings):
    """The deprecated names among `settings`' loss types and f-divergence."""
    names = [*settings["loss_type"], settings["f_divergence_type"]]
    old = {**dpo_trainer.losses.DEPRECATED_LOSS_NAMES, **dpo_trainer.losses.DEPRECATED_F_DIVERGENCES}
    return sorted(name for name in names if name in old)


def evaluate_ours(trainer, settings):
    """`apply_ours` and one evaluation; a `FutureWarning` names each deprecated name, and no other name warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_ours(trainer, settings)
        metrics = trainer.evaluate()
    warned = {
        str(w.message).split("=")[1].split("'")[1]
        for w in caught
        if issubclass(w.category, FutureWarning) and "is deprecated and will be removed" in str(w.message)
    }
    assert sorted(warned) == deprecated_names(settings)
    return metrics


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize(("trl_settings", "our_settings"), CASES)
def test_loss_family_matches_trl(trainers, fmt, trl_settings, our_settings):
    theirs, ours = trainers[fmt]
    apply_trl(theirs, trl_settings)
    trl_metrics, our_metrics = theirs.evaluate(), evaluate_ours(ours, our_settings)
    for name in COMPARED:
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name


def test_trls_names_are_not_the_papers_forms(trainers):
    """Where TRL's form and the paper's differ, they differ on these rows (so the matches above are not vacuous):
    IPO on per-token means vs sums, alpha_divergence at 0.3 vs the paper's at 0.3. (bco_pair_paper at delta = 0,
    which evaluation before training reads, is TRL's form; its delta is tested in tests/test_losses.py.)"""
    _, ours = trainers["standard"]
    pairs = [
        (dict(loss_type=["ipo"]), dict(loss_type=["ipo_paper"])),
        (
            dict(loss_type=["sigmoid"], **TRL_ALPHA_03),
            dict(loss_type=["sigmoid"], **{**TRL_ALPHA_03, "f_divergence_type": "alpha_divergence_paper"}),
        ),
    ]
    for trl_named, paper_named in pairs:
        apply_ours(ours, {**DEFAULTS, **trl_named})
        trl_form = ours.evaluate()["eval_loss"]
        apply_ours(ours, {**DEFAULTS, **paper_named})
        paper_form = ours.evaluate()["eval_loss"]
        assert abs(trl_form - paper_form) > 1e-3 * abs(trl_form), (trl_named, trl_form, paper_form)


def test_trls_sigmoid_ignores_label_smoothing_and_cdpo_is_conservative_dpo(trainers):
    """TRL 1.16's sigmoid with label_smoothing = 0.1 computes plain DPO: our sigmoid (which refuses the setting and
    names cdpo). Our cdpo has no TRL counterpart, but per example cDPO = 2 (1 - eps) DPO - (1 - 2 eps) rDPO
    (from rDPO = (-(1 - eps) ln s(x) + eps ln s(-x)) / (1 - 2 eps)), an identity linear in the per-example
    losses, so it holds for the means TRL logs: our cdpo against TRL's sigmoid and robust."""
    eps = 0.1
    theirs, ours = trainers["standard"]
    trl_eval = {}
    for name, settings in {
        "sigmoid_eps": dict(loss_type=["sigmoid"], label_smoothing=eps),
        "sigmoid": dict(loss_type=["sigmoid"]),
        "robust": dict(loss_type=["robust"], label_smoothing=eps),
    }.items():
        apply_trl(theirs, {**DEFAULTS, **settings})
        trl_eval[name] = theirs.evaluate()["eval_loss"]
    assert trl_eval["sigmoid_eps"] == pytest.approx(trl_eval["sigmoid"], rel=1e-6)  # TRL ignores eps
    with pytest.raises(ValueError, match=r"TRL 1.16's sigmoid ignores label_smoothing.*loss_type='cdpo'"):
        apply_ours(ours, {**DEFAULTS, "loss_type": ["sigmoid"], "label_smoothing": eps})
    ours_sigmoid = evaluate_ours(ours, {**DEFAULTS, "loss_type": ["sigmoid"]})["eval_loss"]
    assert ours_sigmoid == pytest.approx(trl_eval["sigmoid_eps"], rel=1e-4, abs=1e-5)
    cdpo = evaluate_ours(ours, {**DEFAULTS, "loss_type": ["cdpo"], "label_smoothing": eps})["eval_loss"]
    expected = 2 * (1 - eps) * trl_eval["sigmoid"] - (1 - 2 * eps) * trl_eval["robust"]
    assert cdpo == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert abs(cdpo - trl_eval["sigmoid"]) > 1e-3  # eps changes the loss on these rows
    cdpo_zero = evaluate_ours(ours, {**DEFAULTS, "loss_type": ["cdpo"]})["eval_loss"]
    assert cdpo_zero == pytest.approx(trl_eval["sigmoid"], rel=1e-4, abs=1e-5)  # eps = 0: DPO


def test_cases_are_not_all_one_number(trainers):
    """The losses differ from one another on these rows, so equal metrics above are not a coincidence."""
    _, ours = trainers["standard"]
    values = set()
    for param in CASES:
        values.add(round(evaluate_ours(ours, param.values[1])["eval_loss"], 5))
    assert len(values) == len(CASES)


WPO_CASES = [
    case("sigmoid", ["sigmoid"]),
    # (TRL 1.16 fails on sft with use_weighting: it scales an expanded tensor in place)
    case("sigmoid_bco", ["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2]),
    case("sigmoid_norm_ld_alpha", ["sigmoid_norm"], ld_alpha=0.5),
]


@pytest.mark.parametrize(("trl_settings", "our_settings"), WPO_CASES)
def test_wpo_weighting_matches_trl(wpo_trainers, trl_settings, our_settings):
    theirs, ours = wpo_trainers["standard"]
    apply_trl(theirs, trl_settings)
    trl_metrics, our_metrics = theirs.evaluate(), evaluate_ours(ours, our_settings)
    for name in COMPARED:
        assert our_metrics[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-5), name
    ours.args.use_weighting = False  # the weights are far from 1 here: without them the loss differs
    try:
        unweighted = ours.evaluate()["eval_loss"]
    finally:
        ours.args.use_weighting = True
    assert abs(unweighted - our_metrics["eval_loss"]) > 0.05 * abs(unweighted)
