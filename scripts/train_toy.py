"""Train the toy model shipped with the package (src/implicit_icl/assets/toy_default.safetensors).

    .venv/bin/python scripts/train_toy.py [--out PATH] [--seed N]

Uses the defaults of implicit_icl.toy.reproduce (DEFAULT_MODEL, DEFAULT_TRAINING), the same ones
`implicit-icl reproduce` retrains from scratch, so the shipped file can be rebuilt bit for bit on one machine.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from implicit_icl.toy.reproduce import DEFAULT_MODEL, DEFAULT_TRAINING, SHIPPED_CHECKPOINT
from implicit_icl.toy.train import save_trained, train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_CHECKPOINT)
    parser.add_argument("--seed", type=int, default=DEFAULT_TRAINING.seed)
    args = parser.parse_args()
    start = time.perf_counter()
    trained = train_model(DEFAULT_MODEL, replace(DEFAULT_TRAINING, seed=args.seed))
    command = f"python scripts/train_toy.py --seed {args.seed}"
    save_trained(trained, args.out, command=command)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
