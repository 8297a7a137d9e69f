"""python -m llm_flashmoe.convert SRC DEST [--expert-bits 2|3|4|8]

Converts a published Qwen3.5 MoE checkpoint (MLX 4-bit or Hugging Face
bf16/fp16) into a packed directory whose experts are streamed from disk.
Run the same command again to resume an interrupted conversion.
"""

from __future__ import annotations

import argparse
import sys

from .errors import FlashMoeError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llm_flashmoe.convert", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="published checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("dest", help="new directory for the converted model (or an unfinished one to resume)")
    ap.add_argument("--expert-bits", type=int, choices=[2, 3, 4, 8], default=None,
                    help="re-quantize the experts (default: keep MLX bits; 4 for Hugging Face)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = ap.parse_args(argv)
    from .experts.convert import convert_checkpoint

    try:
        out = convert_checkpoint(args.src, args.dest, expert_bits=args.expert_bits, progress=not args.no_progress)
    except FlashMoeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nInterrupted: run the same command again to resume into {args.dest}.", file=sys.stderr)
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
