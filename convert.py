"""Convert LFM2 / LFM2.5 weights to MLX, 4-bit by default:

    python convert.py --hf-path LiquidAI/LFM2.5-350M --mlx-path lfm2.5-350m-4bit

A thin command line over ``lfm_mlx.convert.convert``; the flags follow ``mlx_lm.convert``.
"""

import argparse
import sys
import warnings
from typing import Optional

from lfm_mlx.convert import BITS, DEFAULT_BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES, RECIPES, convert
from lfm_mlx.loading import DTYPES


def parser() -> argparse.ArgumentParser:
    recipes = "\n".join(f"  {name}: embedding (tied output head) at {high} bits, other linear layers at {low}"
                        for name, (low, high) in RECIPES.items())
    p = argparse.ArgumentParser(
        description="Convert an LFM2 / LFM2.5 checkpoint (Hugging Face safetensors) to MLX weights in mlx-lm's\n"
        f"layout. Quantizes to {DEFAULT_BITS} bits, group size {DEFAULT_GROUP_SIZE}, unless --dtype is given alone.",
        epilog=f"quantization recipes (--quant-recipe):\n{recipes}\n"
        "Norm weights and conv kernels are never quantized.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf-path", "--model", required=True,
                   help="source: a local model directory or a Hugging Face hub id (e.g. LiquidAI/LFM2.5-350M)")
    p.add_argument("--mlx-path", default="mlx_model", help="directory to write (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (the default; accepted for mlx-lm habits)")
    p.add_argument("--q-bits", type=int,
                   help=f"bits per weight: {', '.join(map(str, BITS))} (default {DEFAULT_BITS})")
    p.add_argument("--q-group-size", type=int,
                   help=f"quantization group size: {', '.join(map(str, GROUP_SIZES))} (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--quant-recipe", help=f"mixed-precision recipe: {', '.join(RECIPES)} (see below)")
    p.add_argument("--dtype", help=f"dtype of float parameters and scales: {', '.join(DTYPES)} (default: "
                   "config.json's); alone, without quantization flags, writes unquantized float weights")
    p.add_argument("-d", "--dequantize", action="store_true",
                   help="turn an MLX-quantized directory back into float weights")
    p.add_argument("--force", action="store_true", help="replace a non-empty --mlx-path once the new one is complete")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of --hf-path")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    asked_to_quantize = args.quantize or (args.q_bits, args.q_group_size, args.quant_recipe) != (None, None, None)
    if args.dequantize and asked_to_quantize:
        sys.exit("convert.py: error: --dequantize writes float weights: "
                 "drop -q / --q-bits / --q-group-size / --quant-recipe")
    quantize = asked_to_quantize or (args.dtype is None and not args.dequantize)
    with warnings.catch_warnings():
        # Notices (a destination repaired after a killed run) in one line each, like the errors.
        warnings.showwarning = lambda message, *_: print(f"convert.py: {message}", file=sys.stderr)
        try:
            report = convert(
                args.hf_path, args.mlx_path, quantize=quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
                quant_recipe=args.quant_recipe, dtype=args.dtype, dequantize=args.dequantize, force=args.force,
                revision=args.revision,
            )
        except (ValueError, OSError) as e:
            sys.exit(f"convert.py: error: {e}")
    print(report.summary())


if __name__ == "__main__":
    main()
