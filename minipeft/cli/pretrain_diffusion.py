"""``python -m minipeft pretrain-diffusion --out FILE [--steps N] [--seed S]``.

Trains the base class-conditional DDPM on the 8×8 digits (``minipeft.diffusion.pretrain``,
the defaults of ``DiffusionConfig`` and ``PretrainConfig``) and writes it with
``save_denoiser``: one safetensors file, the config and the training record in its
metadata (temporary file, then rename). ``python -m minipeft.diffusion pretrain …`` is the
older spelling of the same command.

Arguments are checked, and ``--out`` probed, before training; every failure is one line
naming the argument (see ``minipeft.__main__``).
"""

from __future__ import annotations

import argparse

from ..io import check_file_target
from . import argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain-diffusion",
        help="train the base digits DDPM (minipeft.diffusion) and save it as safetensors",
        description="Train the class-conditional DDPM on the 8x8 digits and write its weights "
        "and config to one .safetensors file.",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: PretrainConfig.steps)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import numpy as np

    from ..diffusion import DiffusionConfig, PretrainConfig, pretrain, save_denoiser
    from ..nn.layers import check_positive_int
    from ..peft.config import check_int

    steps = PretrainConfig.steps if args.steps is None else args.steps
    with argument("--steps"):
        check_positive_int("--steps", steps)
    with argument("--seed"):
        check_int("--seed", args.seed, 0)
    with argument("--out"):  # before any training
        check_file_target(args.out, "--out")
    tr = PretrainConfig(steps=steps, seed=args.seed)
    model, _, losses = pretrain(DiffusionConfig(), tr, log_every=max(1, steps // 10))
    extra = {"pretrain": asdict(tr), "final_loss_mean_100": float(np.mean(losses[-100:]))}
    with argument("--out"):
        save_denoiser(args.out, model, extra=extra)
    print(f"wrote {args.out}")
    return 0
