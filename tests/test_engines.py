"""FSDP2 and DeepSpeed ZeRO-2/3 on two CPU processes (gloo) train exactly like one plain process.

`tests/dist_scripts/train_dpo.py` (see tests/test_multiprocess.py for the data-order argument) runs under
`python -m torch.distributed.run --nproc_per_node 2` with each engine and is compared with the one-process
runs shared with test_multiprocess.py. Modes: `live` (a frozen copy of the policy as a separate reference,
which the trainer shards like the policy), `precompute` (reference log-probs computed before training,
through a DeepSpeed inference engine or a sharded copy of the policy), `lora` (the reference is the
policy with its adapter disabled), under ZeRO-3 `zero_init` (the policy partitioned when built) and under
FSDP2 `ram_efficient` (`cpu_ram_efficient_loading`, as examples/accelerate/fsdp2.yaml sets it: only rank
0's weights count; the other rank's are zeroed, so anything not sent from rank 0 shows in the losses).
Every run also evaluates before training, as examples/hh.py does.

accelerate turns FSDP on only for accelerator devices, and DeepSpeed's launch path assumes one; the
script nudges accelerate's state so the real engines run on CPU (`engine_arguments` there), and the first
test checks that they did: DTensor parameters under FSDP2, empty ZeRO-3 partitions, DeepSpeed engines.
DeepSpeed's tests are skipped when `deepspeed` is not installed (it is in the `dev` extra).
"""

import importlib.util
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import DPO_METRICS, TORCHRUN_TWO_PROCESSES, launch_dist_script

pytestmark = pytest.mark.slow

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
ENGINE_MODES = {
    "fsdp2": ("live", "precompute", "lora", "ram_efficient"),
    "zero3": ("live", "precompute", "lora", "zero_init"),
    "zero2": ("live", "precompute"),
}
ENGINES = [
    pytest.param("fsdp2"),
    pytest.param("zero3", marks=needs_deepspeed),
    pytest.param("zero2", marks=needs_deepspeed),
]
CASES = [
    pytest.param(engine, mode, marks=param.marks, id=f"{engine}-{mode}")
    for param in ENGINES
    for engine in param.values
    for mode in ENGINE_MODES[engine]
    if mode != "zero_init"
]
BASE_PARAMETERS = 21  # tiny Llama of 2 layers: embeddings, 9 per layer, final norm, untied head


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """{engine: {mode: what rank 0 wrote}}, each engine launched once on first use."""
    cache = {}

    def get(engine: str) -> dict:
        if engine not in cache:
            cache[engine] = launch_dist_script(
                TORCHRUN_TWO_PROCESSES,
                tmp_path_factory.mktemp(engine),
                per_device_batch=2,
                modes=",".join(ENGINE_MODES[engine]),
                engine=engine,
            )
        return cache[engine]

    return get


def _baseline(one_process_runs, mode: str) -> dict:
    return one_process_runs["lora" if mode == "lora" else "live"]


@pytest.mark.parametrize("engine", ENGINES)
def test_the_engine_really_runs_and_shards(engine_runs, engine):
    runs = engine_runs(engine)
    for mode, run in runs.items():
        assert run["world_size"] == 2, mode
        assert run["global_step"] == 4, mode
        if mode in ("live", "zero_init", "ram_efficient"):
            reference = run["reference"]  # a separate frozen model: eval mode, nothing to train
            assert reference["training"] is False and reference["requires_grad"] is False, mode
        else:
            assert run["reference"] is None, mode  # precomputed, or the adapter-disabled policy
    live = runs["live"]
    if engine == "fsdp2":
        assert live["distributed_type"] == "DistributedType.FSDP"
        assert live["parameter_types"] == ["DTensor"]  # the policy is sharded ...
        assert live["reference"]["wrapper"].startswith("FSDP")  # ... and so is the reference
        assert live["reference"]["parameter_types"] == ["DTensor"]
        assert runs["lora"]["parameter_types"] == ["DTensor"]
    else:
        assert live["distributed_type"] == "DistributedType.DEEPSPEED"
        assert live["reference"]["wrapper"] == "DeepSpeedEngine"
    if engine == "zero3":
        # Every weight of the policy and of the reference is an empty local partition outside forward.
        assert (
            len(live["zero3_partitioned"]) == len(live["reference"]["zero3_partitioned"]) == BASE_PARAMETERS
        )
        assert len(runs["lora"]["zero3_partitioned"]) > BASE_PARAMETERS  # the adapters too
    if engine == "zero2":
        # ZeRO-2 shards optimizer state and gradients only; the reference is a stage-0 replica.
        assert live["zero3_partitioned"] == [] and live["reference"]["zero3_partitioned"] == []


@pytest.mark.parametrize(("engine", "mode"), CASES)
def test_per_step_loss_and_dpo_metrics_match_one_process(engine_runs, one_process_runs, engine, mode):
    one, two = _baseline(one_process_runs, mode)["train_logs"], engine_runs(engine)[mode]["train_logs"]
    assert [entry["step"] for entry in two] == [entry["step"] for entry in one] == [1, 2, 3, 4]
    assert len({round(entry["loss"], 4) for entry in one}) == 4  # training moves the loss
    for a, b in zip(one, two):
        step = a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), step
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), step
        for name in DPO_METRICS:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), (step, name)


@pytest.mark.parametrize(("engine", "mode"), CASES)
def test_final_weights_match_one_process(engine_runs, one_process_runs, engine, mode, make_model):
    one_run, two_run = _baseline(one_process_runs, mode), engine_runs(engine)[mode]
    one = load_file(one_run["out"] / f"{one_run['mode']}-rank0.safetensors")
    two = load_file(two_run["out"] / f"{mode}-rank0.safetensors")  # gathered on rank 0 when sharded
    assert set(one) == set(two)
    for name in one:
        torch.testing.assert_close(
            two[name], one[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    if mode != "lora":
        initial = make_model(seed=3).state_dict()
        assert any(not torch.equal(one[name], initial[name]) for name in one)  # and training did move them


@pytest.mark.parametrize(("engine", "mode"), CASES)
def test_eval_metrics_match_one_process(engine_runs, one_process_runs, engine, mode):
    one, two = _baseline(one_process_runs, mode)["eval"], engine_runs(engine)[mode]["eval"]
    for key in ("eval_loss", *(f"eval_{name}" for name in DPO_METRICS)):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize(("engine", "mode"), CASES)
def test_evaluation_before_training_matches_one_process(engine_runs, one_process_runs, engine, mode):
    # examples/hh.py evaluates before training. Trainer alone cannot there: ZeRO 1-2 refuse to build an
    # inference engine, ZeRO-3's is then reused for training without optimizer, FSDP2 refuses to shard a
    # model without its optimizer. DPOTrainer evaluates through a temporary prepared view instead.
    one, two = _baseline(one_process_runs, mode)["before"], engine_runs(engine)[mode]["before"]
    if mode != "lora":
        assert one["before_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    for key in ("before_loss", *(f"before_{name}" for name in DPO_METRICS)):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key


def test_fsdp2_ram_efficient_loading_takes_every_weight_from_rank0(engine_runs):
    # Rank 1 zeroed its copy before the trainer existed; the policy, its frozen copy and the temporary
    # view that evaluates before training all match one process (test above), so all got rank 0's.
    run = engine_runs("fsdp2")["ram_efficient"]
    rank0, rank1 = run["checksums_at_construction"]
    assert rank0 > 0 and rank1 == 0
    assert run["before"]["before_loss"] == pytest.approx(math.log(2), abs=1e-6)


@needs_deepspeed
def test_zero3_frozen_copy_of_a_policy_partitioned_at_load(engine_runs):
    # Built after its ZeRO-3 DPOConfig, the policy is partitioned by deepspeed.zero.Init (as
    # from_pretrained does): a plain deepcopy would copy empty tensors. Step 1 compares the policy with
    # its frozen copy on every example, so a loss of exactly log 2 means the copy has the same weights.
    run = engine_runs("zero3")["zero_init"]
    assert run["partitioned_at_construction"] is True
    assert len(run["reference"]["zero3_partitioned"]) == BASE_PARAMETERS
    losses = [entry["loss"] for entry in run["train_logs"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert run["train_logs"][0]["logps/chosen"] < -1.0  # the models did score the responses
    assert len({round(loss, 4) for loss in losses}) == 4
