"""How far the GPU's lossy encode and decode agree with the CPU's (docs/benchmarks.md, GPU check).

Run on a CUDA machine: ``python scripts/encode_gpu_cpu.py``. For 64 random SmolLM2-shaped
blocks per dtype and encoding, prints how many payload bytes the GPU's encode writes differently
from the CPU's, and whether decoding one payload gives bitwise the same blocks on both.
"""

from __future__ import annotations

import argparse

import torch

from hkv.encoding import decode, encode


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(11)
    for dtype in (torch.float32, torch.float16):
        blocks = (torch.randn(64, 2, 3, 64, 64) * 2).to(dtype)
        for encoding in ("int8", "int4"):
            on_cpu, on_gpu = encode(blocks, encoding), encode(blocks.cuda(), encoding).cpu()
            cpu_out, gpu_out = torch.empty_like(blocks), torch.empty_like(blocks, device="cuda")
            decode(on_cpu, encoding, cpu_out)
            decode(on_cpu.cuda(), encoding, gpu_out)
            print(f"{dtype} {encoding}: payload bytes differing CPU vs GPU encode: {int((on_cpu != on_gpu).sum())} "
                  f"of {on_cpu.numel()} | decode of the same payload equal: {torch.equal(cpu_out, gpu_out.cpu())}")


if __name__ == "__main__":
    main()
