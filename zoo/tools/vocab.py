"""Writes the vocabulary stored in a checkpoint as a SCAN-format JSON file, for `data.vocab_path`.

    python -m zoo.tools.vocab runs/casc_base_f30k/checkpoints/best.ckpt vocab.f30k.json
"""
from __future__ import annotations

import argparse

from ..engine.checkpoints import checkpoint_vocabulary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.tools.vocab", description=__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    vocab = checkpoint_vocabulary(args.ckpt)
    vocab.save(args.out)
    print(f"{args.out}: {len(vocab)} words")


if __name__ == "__main__":
    main()
