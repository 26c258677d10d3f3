"""Where a DPO step's time goes, for either arm of the benchmark (`bench_dpo.py --profile`).

Each part of the step is wrapped with a timer that synchronises the device before and after it, so the
figures are wall seconds of that part alone (synchronising costs a little overall speed; profile runs
are not speed runs). Parts that one library does not have separately are left out of its table:

* `collate`: the data collator (host work: building the batch and, for this project, its scoring plan);
* `to_device`: moving the batch to the device (`Trainer._prepare_inputs`);
* `attention_mask`: building the packed / shared-prompt mask or BlockMask (this project);
* `policy_forward`: the policy's forward pass with its log-probs (this project: `policy_logps`, which
  includes `lm_head`; TRL: its loss computation less its reference forward);
* `lm_head`: the chunked LM-head forward (this project; its recomputation runs inside `backward`);
* `reference_forward`: the reference log-probs (a frozen model's or the adapter-disabled base's forward);
* `backward`: `accelerator.backward(loss)`;
* `optimizer`: the optimizer step (with gradient clipping and the scheduler it is small next to it);
* `other`: the rest of the step (Trainer bookkeeping, metrics, the loss itself, ...).
"""

from __future__ import annotations

import contextlib
import functools
import time


class StepProfile:
    """Wall seconds per part of the training step, counted only while `active` (collation: always)."""

    ALWAYS = ("collate",)  # the data loader collates the next batch before the step begins

    def __init__(self, torch):
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.active = False
        self._depth: dict[str, int] = {}

    @contextlib.contextmanager
    def span(self, label: str):
        depth = self._depth.get(label, 0)
        if not (self.active or label in self.ALWAYS) or depth:  # count the outermost call of a label
            yield
            return
        self._depth[label] = depth + 1
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
            self.calls[label] = self.calls.get(label, 0) + 1
            self._depth[label] = depth

    def wrap(self, label: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self.span(label):
                return function(*args, **kwargs)

        return timed

    def patch(self, owner, name: str, label: str) -> bool:
        """Wrap `owner.name` (a module, class or instance attribute) if it exists; True when wrapped."""
        function = getattr(owner, name, None)
        if function is None:
            return False
        setattr(owner, name, self.wrap(label, function))
        return True

    def per_step(self, steps: int, step_s: float) -> dict[str, float]:
        """Seconds per step of each part, plus `other` (the step's time not inside any outer part)."""
        parts = {label: total / steps for label, total in self.seconds.items() if label not in self.ALWAYS}
        for label in self.ALWAYS:  # per batch (one batch a step in the benchmark)
            if self.calls.get(label):
                parts[label] = self.seconds[label] / self.calls[label]
        nested = {"lm_head", "attention_mask"}  # inside policy_forward (and reference_forward)
        if "loss_total" in parts:  # TRL: the policy's part of its loss computation
            parts["policy_forward"] = parts.pop("loss_total") - parts.get("reference_forward", 0.0)
        outer = sum(v for k, v in parts.items() if k not in nested and k not in self.ALWAYS)
        parts["other"] = step_s - outer
        parts["step"] = step_s
        return parts


def install(profile: StepProfile, trainer, arm: str) -> None:
    """Wrap the parts of `trainer`'s step (see the module docstring) in timers."""
    trainer.data_collator = profile.wrap("collate", trainer.data_collator)
    profile.patch(trainer, "_prepare_inputs", "to_device")
    profile.patch(trainer.accelerator, "backward", "backward")
    if arm == "ours":
        import dpo_trainer.logprobs as logprobs

        profile.patch(trainer, "policy_logps", "policy_forward")
        profile.patch(trainer, "reference_logps", "reference_forward")
        profile.patch(logprobs, "head_token_logps", "lm_head")  # looked up by name in sequence_logps
        for module_name in ("dpo_trainer.attention", "dpo_trainer.logprobs"):
            module = __import__(module_name, fromlist=["_"]) if _importable(module_name) else None
            for name in ("grouped_attention_mask", "attention_mask_for"):
                if module is not None:
                    profile.patch(module, name, "attention_mask")
    else:
        import trl.trainer.dpo_trainer as trl_dpo

        profile.patch(trainer, "_compute_loss", "loss_total")
        if trainer.ref_model is not None:  # a separate frozen model
            profile.patch(trainer.ref_model, "forward", "reference_forward")
        else:  # the adapter-disabled base, run inside `use_adapter(...)` in `_compute_loss`
            use_adapter = trl_dpo.use_adapter

            @contextlib.contextmanager
            def timed_use_adapter(*args, **kwargs):
                with profile.span("reference_forward"), use_adapter(*args, **kwargs):
                    yield

            trl_dpo.use_adapter = timed_use_adapter


def wrap_optimizer(profile: StepProfile, optimizer) -> None:
    profile.patch(optimizer, "step", "optimizer")


def _importable(module_name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False
