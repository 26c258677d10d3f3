"""Preference losses on per-sequence log-probabilities (DPO, Rafailov et al. 2023, arXiv 2305.18290).

Every loss here is a pure function. Inputs are per-sequence *summed* log-probabilities, shape
``(batch,)``; no model, tokenizer or reduction over the batch happens in this package (``aot``,
``aot_unpaired`` and ``sft`` couple the examples of one batch, as their definitions do).

Legend:

* ``pi_w, pi_l``: log pi_theta(y_w | x), log pi_theta(y_l | x), policy log-probs of the chosen
  (w) and rejected (l) responses; ``ref_w, ref_l``: the same under the frozen reference pi_ref.
* ``lr_w = pi_w - ref_w``, ``lr_l = pi_l - ref_l``: log-ratios; ``n_w, n_l``: response token counts.
* ``s_w, s_l``: scores f'(pi / pi_ref) of the f-divergence regulariser (f-DPO, Wang et al. 2023,
  arXiv 2309.16240); under the default reverse KL ``s = lr``.
* ``h = s_w - s_l``: difference of scores (with reverse KL the IPO paper's h_pi).
* ``beta``: strength of the KL penalty toward pi_ref; ``eps``: label-smoothing / flip rate.

Pairwise variants live in the registry ``LOSSES`` and are selected by name (or a weighted list of
names) in :func:`preference_loss`; add your own with :func:`register_loss`. A loss is called as
``fn(h, *, beta, ...)`` and receives, by keyword, those of :data:`LOSS_INPUTS` that its signature names.

A name TRL 1.16 defines computes TRL's numbers. Where the paper that defines a method writes another
form, the paper's form has a name of its own: ``cdpo`` beside ``sigmoid``, otherwise ``<name>_paper``:

======================== ======================================== ========================================
TRL's name               TRL 1.16's form (under TRL's name)       the paper's form, under its own name
======================== ======================================== ========================================
``sigmoid`` (loss_type)  ``-logsigmoid(beta h)``: DPO Eq. 7       ``cdpo``: ``-(1 - eps) logsigmoid(beta h)
                         (Rafailov et al. 2023); TRL ignores      - eps logsigmoid(-beta h)``, conservative
                         ``label_smoothing`` here                 DPO (Mitchell 2023, "A note on DPO with
                                                                  noisy preferences"); eps = 0 is sigmoid
``ipo`` (loss_type)      ``(s_w/n_w - s_l/n_l - 1/(2 beta))^2``:  ``(s_w - s_l - 1/(2 beta))^2`` on summed
                         IPO Eq. 17 on per-token means, n         log-probs: IPO Eq. 17 (Azar et al. 2023,
                         clamped to >= 1                          arXiv 2310.12036), tau = beta
``bco_pair`` (loss_type) ``-logsigmoid(r_w) - logsigmoid(-r_l)``  ``-logsigmoid(r_w - delta)
                         with ``r = beta lr``: no reward shift    - logsigmoid(-(r_l - delta))``, delta the
                                                                  running mean reward: BCO (Jung et al.
                                                                  2024, arXiv 2404.04656, Sec. 3)
``alpha_divergence``     ``f'(u) = (u^(alpha-1) - 1)/(alpha-1)``  ``f'(u) = (1 - u^-alpha)/alpha``: f-DPO
(f_divergence_type)      (TRL's code; its docs say u^-alpha)      (Wang et al. 2023, arXiv 2309.16240,
                                                                  Table 1)
======================== ======================================== ========================================

``sigmoid`` takes no ``label_smoothing``: with eps > 0 and no other selected loss that uses it,
:func:`check_loss_settings` raises and names ``cdpo`` (TRL 1.16 would train ignoring eps; this library's
``sigmoid`` computed cDPO before). ``aot`` and ``aot_unpaired`` use the cDPO-smoothed logistic loss, as TRL
does.

The two alpha forms are one family: TRL's at ``alpha`` is the paper's at ``1 - alpha`` (equal at the default
0.5). ``ipo_trl``, ``bco_pair_trl`` and ``alpha_divergence_trl``, the previous release's names of TRL's forms,
are deprecated aliases (:data:`DEPRECATED_LOSS_NAMES`, :data:`DEPRECATED_F_DIVERGENCES`): they warn
(``FutureWarning``) and are read as TRL's names.

The package, module by module (each name below is importable from ``dpo_trainer.losses``):

* :mod:`.registry`: :data:`LOSSES`, :func:`register_loss`, :func:`loss_names`, :func:`loss_uses`,
  :data:`LOSS_INPUTS`, :func:`needs_reward_shift`, :func:`check_loss_settings`;
* :mod:`.pairwise`: the losses on ``h``, for any f-divergence: the sigmoid family (``sigmoid``, ``cdpo``,
  ``sigmoid_norm``), IPO (``ipo``, ``ipo_paper``), ``hinge``, ``robust``, ``exo_pair``, ``discopop``, ``sft``;
* :mod:`.logratios`: the losses on the log-ratios, reverse KL only (``nca_pair``, BCO, ``sppo_hard``, APO,
  AOT), and :class:`RunningMean`, BCO's reward shift;
* :mod:`.fdivergence`: :data:`F_DIVERGENCES` and :func:`f_divergence_scores`;
* :mod:`.preference`: :func:`preference_loss`, the entry point;
* :mod:`.ranking`: :func:`plackett_luce_loss`, K ranked responses;
* :mod:`.weights`: WPO's and LD-DPO's weights (:func:`wpo_weights`, :func:`ld_token_weights`);
* :mod:`.deprecation`: the deprecated names and their warning.

The built-in losses register themselves when this package imports :mod:`.pairwise` and :mod:`.logratios`.
"""

from .deprecation import DEPRECATED_F_DIVERGENCES, DEPRECATED_LOSS_NAMES
from .fdivergence import F_DIVERGENCES, f_divergence_scores
from .logratios import (
    RunningMean,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bco_pair_paper_loss,
    nca_pair_loss,
    sppo_hard_loss,
)
from .pairwise import (
    cdpo_loss,
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    ipo_paper_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
)
from .preference import preference_loss
from .ranking import plackett_luce_loss
from .registry import (
    F_DIVERGENCE_LOSSES,
    LOSS_INPUTS,
    LOSSES,
    LossFn,
    check_loss_settings,
    loss_names,
    loss_uses,
    needs_reward_shift,
    register_loss,
)
from .weights import ld_token_weights, wpo_weights

__all__ = [
    "DEPRECATED_F_DIVERGENCES",
    "DEPRECATED_LOSS_NAMES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSSES",
    "LOSSES",
    "LOSS_INPUTS",
    "RunningMean",
    "check_loss_settings",
    "f_divergence_scores",
    "ld_token_weights",
    "loss_names",
    "loss_uses",
    "needs_reward_shift",
    "plackett_luce_loss",
    "wpo_weights",
    "preference_loss",
    "register_loss",
    # the type of a registered loss, and the built-in losses (each also in LOSSES under its name)
    "LossFn",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bco_pair_paper_loss",
    "cdpo_loss",
    "discopop_loss",
    "exo_pair_loss",
    "hinge_loss",
    "ipo_loss",
    "ipo_paper_loss",
    "nca_pair_loss",
    "robust_loss",
    "sft_loss",
    "sigmoid_loss",
    "sigmoid_norm_loss",
    "sppo_hard_loss",
]
