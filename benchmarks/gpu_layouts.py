"""The layout equivalence of `tests/test_layouts.py`, on a GPU: every layout gives the padded layout's
log-probs, loss and gradients there too, for SDPA (boolean 4D mask), eager (additive mask) and
FlexAttention (`BlockMask`, compiled by transformers, forward and backward).

    python benchmarks/gpu_layouts.py [--out results.json]

float32 with TF32 off, so the tolerances are the CPU tests' (loosened a little for long rows). Exits 1
if any comparison fails; prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dpo_trainer.data import PaddedCollator  # noqa: E402
from dpo_trainer.data.layouts import GroupedCollator  # noqa: E402
from dpo_trainer.logprobs import sequence_logps  # noqa: E402
from dpo_trainer.losses import plackett_luce_loss, preference_loss  # noqa: E402
from dpo_trainer.testing import tiny_causal_lm  # noqa: E402

VOCAB = 512


def features(seed, b, k, prompt=(1, 9), response=(1, 11), empty=True):
    rng = random.Random(seed)
    rows = []
    for i in range(b):
        p = [rng.randrange(3, VOCAB) for _ in range(rng.randint(*prompt))]
        responses = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(*response))] for _ in range(k)]
        if empty and i == 2:
            responses[1] = []
        rows.append({"prompt_ids": p, "response_ids": responses})
    return rows


def collate(layout, rows, device):
    collator = (
        PaddedCollator(pad_token_id=0)
        if layout == "padded"
        else GroupedCollator(pad_token_id=0, layout=layout)
    )
    return {key: value.to(device) for key, value in collator(rows).items()}


def loss_of(logps):
    if logps.shape[1] == 2:
        return preference_loss(logps[:, 0], logps[:, 1], logps[:, 0].detach() * 0.9, logps[:, 1].detach())[
            0
        ].sum()
    return plackett_luce_loss(logps, logps.detach() * 0.9).sum()


def run_case(impl, layout, k, long_rows, device):
    net = tiny_causal_lm(
        VOCAB, arch="llama", hidden_size=64, num_layers=2, num_heads=4, attn_implementation=impl, seed=1
    ).to(device)
    if long_rows:
        rows = features(seed=k, b=8, k=k, prompt=(40, 400), response=(20, 500))
    else:
        rows = features(seed=k, b=5, k=k)
    results = {}
    for name in ("padded", layout):
        net.zero_grad()
        logps = sequence_logps(net, collate(name, rows, device), chunk_size=97)
        loss = loss_of(logps)
        loss.backward()
        results[name] = (logps.detach(), loss.detach(), [p.grad.clone() for p in net.parameters()])
    (ref_logps, ref_loss, ref_grads), (logps, loss, grads) = results["padded"], results[layout]
    scale = 10 if long_rows else 1
    checks = {
        "logps": (logps - ref_logps).abs().max().item(),
        "loss": (loss - ref_loss).abs().item(),
        "grad_rel": max(
            ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for g, w in zip(grads, ref_grads)
        ),
    }
    ok = (
        torch.allclose(logps, ref_logps, rtol=1e-5 * scale, atol=1e-4 * scale)
        and torch.allclose(loss, ref_loss, rtol=1e-5 * scale, atol=1e-5 * scale)
        and checks["grad_rel"] < 1e-4 * scale
        and (logps[2, 1] == 0.0).item()
    )
    return ok, checks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script itself")
    parser.add_argument("--impls", default="sdpa,eager,flex_attention")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    records, failed = [], 0
    for impl in args.impls.split(","):
        for layout in ("packed", "shared_prompt"):
            for k in (2, 3):
                for long_rows in (False, True):
                    t0 = time.perf_counter()
                    try:
                        ok, checks = run_case(impl, layout, k, long_rows, device)
                        error = None
                    except Exception as exc:  # report every case, then fail
                        ok, checks, error = False, {}, f"{type(exc).__name__}: {exc}"
                    failed += not ok
                    record = dict(
                        impl=impl,
                        layout=layout,
                        k=k,
                        long_rows=long_rows,
                        ok=ok,
                        seconds=time.perf_counter() - t0,
                        error=error,
                        **checks,
                    )
                    records.append(record)
                    print(json.dumps(record), flush=True)
    print(f"{len(records) - failed}/{len(records)} layout cases match padded on {name}")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
