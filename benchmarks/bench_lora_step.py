"""One LoRA training step: minipeft (NumPy) vs HF PEFT on PyTorch CPU eager, one thread each.

Model: the foundation's benchmark GPT-2 (``bench_train_step.py``: 4 layers, n_embd 256,
4 heads, vocab 512, n_positions 128; batch 8 × 128 tokens; float32; dropout off). LoRA
r = 8, α = 16 on ``c_attn`` (fan_in_fan_out), lora_dropout 0. Both sides hold the SAME
adapter: minipeft creates it (random A and B, so the step does real work), saves it as HF
PEFT files, and HF PEFT loads it with ``is_trainable=True``; the first-step losses are
printed side by side as a check.

The step, identical on both sides: zero the gradients, forward, next-token cross-entropy,
backward (only the adapters need gradients; the frozen weights get none), one AdamW
update of the trainable parameters (lr 1e-4).

Threads: OMP/OpenBLAS/MKL/Numba set to 1 before NumPy is imported, ``torch.set_num_threads(1)``.
Timing: ``--warmup`` steps, then the median (min/max) of ``--repeats`` steps, the sides
alternating step by step; also the median CPU time of the process per step.

    python benchmarks/bench_lora_step.py               # timing table + top of the profile
    python benchmarks/bench_lora_step.py --profile     # cProfile of the minipeft step only
    python benchmarks/bench_lora_step.py --baseline-rev REV   # + minipeft as of git REV

``--baseline-rev`` and ``--profile-top`` work as in ``bench_train_step.py`` (both minipeft
versions in one process, taking turns with HF PEFT step by step).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from bench_train_step import baseline_package, profile_text, time_interleaved  # noqa: E402

CONFIG = dict(
    vocab_size=512, n_positions=128, n_embd=256, n_layer=4, n_head=4, resid_pdrop=0.0,
    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)  # fmt: skip
BATCH, SEQ, LR, RANK, ALPHA = 8, 128, 1e-4, 8, 16


def make_files(directory: Path) -> np.ndarray:
    """A random GPT-2 checkpoint and a random LoRA adapter, both written by minipeft."""
    import minipeft
    from minipeft.models import GPT2, GPT2Config
    from minipeft.peft import LoraConfig, get_peft_model

    minipeft.seed(0)
    model = GPT2(GPT2Config(**CONFIG))
    model.save_pretrained(directory / "base")
    peft_model = get_peft_model(
        model,
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"], fan_in_fan_out=True,
                   init_lora_weights=False),
    )  # fmt: skip
    peft_model.save_pretrained(directory / "adapter")
    return np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(BATCH, SEQ))


def minipeft_stepper(directory: Path, ids: np.ndarray, package: str = "minipeft"):
    GPT2 = importlib.import_module(f"{package}.models").GPT2
    AdamW = importlib.import_module(f"{package}.optim").AdamW
    PeftModel = importlib.import_module(f"{package}.peft").PeftModel

    model = PeftModel.from_pretrained(GPT2.from_pretrained(directory / "base"),
                                      str(directory / "adapter"))  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=LR)
    lm = model.get_base_model()

    def step() -> float:
        opt.zero_grad()
        loss = lm.loss(ids)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_stepper(directory: Path, ids: np.ndarray):
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    base = transformers.GPT2LMHeadModel.from_pretrained(directory / "base")
    model = peft.PeftModel.from_pretrained(base, directory / "adapter", is_trainable=True).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    tids = torch.from_numpy(ids)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tids, labels=tids).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile one minipeft step")
    ap.add_argument("--baseline-rev", help="also time minipeft as of this git revision")
    ap.add_argument("--profile-top", type=int, default=15, help="after the table: top N (0: none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as base_root:
        d = Path(d)
        ids = make_files(d)
        steps = {"minipeft": minipeft_stepper(d, ids)}
        if args.baseline_rev:
            base = baseline_package(args.baseline_rev, base_root)
            steps[base.replace("_", "@", 1)] = minipeft_stepper(d, ids, base)
        if args.profile:
            import cProfile
            import pstats

            for _ in range(args.warmup):
                steps["minipeft"]()
            prof = cProfile.Profile()
            prof.enable()
            steps["minipeft"]()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
            return 0
        steps["HF PEFT (torch)"] = torch_stepper(d, ids)
        first, times, cpu = time_interleaved(steps, args.warmup, args.repeats)
        prof = profile_text(steps["minipeft"], args.profile_top) if args.profile_top else ""
    print(f"LoRA r={RANK} on c_attn, GPT-2 L={CONFIG['n_layer']} d={CONFIG['n_embd']}, "
          f"batch {BATCH}×{SEQ}, one thread; first-step losses: "
          + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"warm-up {args.warmup}, median of {args.repeats}, sides taking turns")
    print(f"{'side':18s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'median CPU ms':>14s}")
    for k, v in times.items():
        print(f"{k:18s} {1e3 * med[k]:10.1f} {1e3 * min(v):8.1f} {1e3 * max(v):8.1f} "
              f"{1e3 * mcpu[k]:14.1f}")  # fmt: skip
    pairs = [(k, "HF PEFT (torch)") for k in times if k.startswith("minipeft")]
    pairs += [("minipeft", k) for k in times if k.startswith("minipeft@")]
    for a, b in pairs:
        target = "  (issue 3's target: ≤ 1.3)" if b.startswith("HF") else ""
        print(f"ratio {a} / {b}: {med[a] / med[b]:.2f} (median wall), "
              f"{mcpu[a] / mcpu[b]:.2f} (median CPU){target}")  # fmt: skip
    if prof:
        print(prof)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
