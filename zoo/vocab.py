"""Writes the vocabulary stored in a checkpoint as a SCAN-format JSON file, for `data.vocab_path`.

    python -m zoo.vocab runs/casc_base_f30k/checkpoints/best.ckpt vocab.f30k.json
"""
from __future__ import annotations

import argparse

import torch

from datamodules.text import Vocabulary


def checkpoint_vocabulary(path: str) -> Vocabulary:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    words = (ckpt.get("zoo_data") or {}).get("vocab")
    if not words:
        raise SystemExit(f"error: {path} stores no vocabulary (made before checkpoints carried one, or by a method "
                         "that does not use the zoo's word ids)")
    return Vocabulary.from_words(words)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.vocab", description=__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    args = ap.parse_args(argv)
    vocab = checkpoint_vocabulary(args.ckpt)
    vocab.save(args.out)
    print(f"{args.out}: {len(vocab)} words")


if __name__ == "__main__":
    main()
