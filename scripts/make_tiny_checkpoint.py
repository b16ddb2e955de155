"""Write a tiny random checkpoint (Hugging Face format, byte tokenizer) for demos and tests.

    python scripts/make_tiny_checkpoint.py DIR [--family llama|mistral|qwen2|qwen3] [--seed N]
"""

import argparse

from sagekv.checkpoints import FAMILIES, make_tiny_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_checkpoint(args.path, args.family, seed=args.seed))


if __name__ == "__main__":
    main()
