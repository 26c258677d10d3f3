"""DPO metrics: (sum, count) accumulators on the device, one per metric_key_prefix, reset at the start of
each evaluation; training sums all-reduced once per log, so processes may hold batches of different sizes."""

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from dpo_trainer import DPOTrainer
from dpo_trainer.data import PaddedCollator
from dpo_trainer.logprobs import sequence_logps

from conftest import DPO_METRICS, TESTS, TORCHRUN_TWO_PROCESSES, dist_env, dpo_config, preference_rows

ROWS = preference_rows(12, seed=5)
HELD_OUT = preference_rows(7, seed=6)


def naive_metrics(trainer, rows_dataset) -> dict[str, float]:
    """The eval metrics by hand over all rows at once (`sequence_logps` is checked against the model's own
    log_softmax in test_logprobs.py)."""

    def logps(model, batch):
        return sequence_logps(model, batch).double()

    collate = PaddedCollator(trainer.processing_class.pad_token_id)
    batch = collate([rows_dataset[i] for i in range(len(rows_dataset))])
    with torch.no_grad():
        policy, reference = logps(trainer.model.eval(), batch), logps(trainer.ref_model, batch)
    beta = trainer.args.beta
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        "rewards/chosen": rewards[:, 0].mean().item(),
        "rewards/rejected": rewards[:, 1].mean().item(),
        "rewards/accuracies": (margin > 0).double().mean().item(),
        "rewards/margins": margin.mean().item(),
        "logps/chosen": policy[:, 0].mean().item(),
        "logps/rejected": policy[:, 1].mean().item(),
        "loss": (-F.logsigmoid(margin)).mean().item(),
    }


@pytest.fixture
def trained(tmp_path, make_model, tokenizer):
    args = dpo_config(tmp_path, max_steps=3, layout="padded", per_device_eval_batch_size=3)
    trainer = DPOTrainer(
        make_model(seed=2),
        args=args,
        train_dataset=ROWS,
        eval_dataset=HELD_OUT,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


def test_predict_then_evaluate_give_the_same_metrics(trained):
    predicted = trained.predict(trained.eval_dataset).metrics
    evaluated = trained.evaluate()
    again = trained.evaluate()
    expected = naive_metrics(trained, trained.eval_dataset)
    for name, value in expected.items():
        assert predicted[f"test_{name}"] == pytest.approx(value, rel=1e-4, abs=1e-5), name
        assert evaluated[f"eval_{name}"] == pytest.approx(value, rel=1e-4, abs=1e-5), name
        assert again[f"eval_{name}"] == evaluated[f"eval_{name}"], name


def test_custom_prefixes_keep_their_own_metrics(trained):
    before = trained.evaluate(metric_key_prefix="before")
    assert set(f"before_{name}" for name in DPO_METRICS) <= set(before)
    assert not any(key.startswith("eval_") for key in before)
    assert trained.metrics.sums == {}  # nothing left over for the next evaluation or training log


def test_training_metrics_are_per_example_means_of_the_logged_steps(tmp_path, make_model, tokenizer):
    # logging every 2 steps: the logged means cover the 2 x 4 examples since the last log
    args = dpo_config(tmp_path, max_steps=4, logging_steps=2, learning_rate=1e-2, layout="padded")
    seen = []

    class Recording(DPOTrainer):
        def dpo_loss(self, policy_logps, reference_logps, *args, **kwargs):
            losses, rewards = super().dpo_loss(policy_logps, reference_logps, *args, **kwargs)
            seen.append(rewards.detach().double())
            return losses, rewards

    trainer = Recording(make_model(seed=2), args=args, train_dataset=ROWS, processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry, window in zip(logs, (seen[0:2], seen[2:4])):
        rewards = torch.cat(window)
        assert entry["rewards/chosen"] == pytest.approx(rewards[:, 0].mean().item(), rel=1e-5)
        margins = rewards[:, 0] - rewards[:, 1]
        assert entry["rewards/margins"] == pytest.approx(margins.mean().item(), rel=1e-5, abs=1e-7)
        assert entry["rewards/accuracies"] == pytest.approx((margins > 0).double().mean().item())


def test_recording_a_step_keeps_the_sums_on_the_device(tmp_path, make_model, tokenizer):
    trainer = DPOTrainer(
        make_model(seed=2), args=dpo_config(tmp_path), train_dataset=ROWS, processing_class=tokenizer
    )
    rewards = torch.tensor([[0.5, -0.5], [0.1, 0.2]])
    trainer.metrics.record(
        "train", torch.tensor([[-3.0, -4.0], [-5.0, -6.0]]), rewards, torch.tensor([0.1, 0.2])
    )
    sums, count = trainer.metrics.sums["train"]
    assert isinstance(sums, torch.Tensor) and count == 2
    trainer.model.train()
    logs = {"loss": 0.15}
    trainer.log(logs)
    assert logs["rewards/margins"] == pytest.approx((1.0 - 0.1) / 2)
    assert logs["rewards/accuracies"] == pytest.approx(0.5)
    assert logs["logps/rejected"] == pytest.approx(-5.0)


@pytest.mark.slow
def test_two_processes_with_uneven_token_budget_batches(tmp_path):
    # Under max_tokens_per_batch the two processes hold batches of different sizes, which a gather of
    # per-example metrics cannot take (gloo raises; NCCL would hang). The script also gives each process its
    # own reference cache folder, only rank 0's filled: every process must validate its own view.
    script = TESTS / "dist_scripts" / "uneven_metrics.py"
    command = [*TORCHRUN_TWO_PROCESSES, str(script), "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    proc = subprocess.run(
        command, env=dist_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = json.loads((tmp_path / "uneven.json").read_text())
    assert run["world_size"] == 2
    assert len(run["train_logs"]) == len(run["rewards"]) == 4
    assert any(sizes[0] != sizes[1] for sizes in run["batch_sizes"])  # some step had uneven batches
    for entry, step_rewards in zip(run["train_logs"], run["rewards"]):
        rewards = torch.tensor(step_rewards, dtype=torch.float64)  # every example of both processes
        margins = rewards[:, 0] - rewards[:, 1]
        assert entry["rewards/chosen"] == pytest.approx(rewards[:, 0].mean().item(), rel=1e-5)
        assert entry["rewards/margins"] == pytest.approx(margins.mean().item(), rel=1e-5, abs=1e-7)
        assert entry["rewards/accuracies"] == pytest.approx((margins > 0).double().mean().item())
    assert run["ref_logps_rank0"] == run["ref_logps_rank1"]
