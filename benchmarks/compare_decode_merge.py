"""The fused decode of this tree against another version of `ops/triton/decode.py`, side by side in one process, in
CUDA graphs.

    git show main:src/nsa_hf/ops/triton/decode.py > benchmarks/.probe_decode_ref.py
    python benchmarks/compare_decode_merge.py --ref-file benchmarks/.probe_decode_ref.py [--shapes seed paper]
        [--contexts 4096 32768] [--batches 1 8 32]

The other file is imported beside this tree's decode (it imports the rest of the package from this tree). For each
shape, context and batch: both decodes' ms per call in a CUDA graph (two alternating rounds each), and their largest
output difference. Prints JSON lines; writes them to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import PATTERN, SHAPES, decode_inputs  # noqa: E402

from nsa_hf.ops.triton import decode as this_tree  # noqa: E402


def decode_module_from(ref_file: Path):
    """The decode module in `ref_file`, imported inside this tree's package (its relative imports resolve here)."""
    path = Path(this_tree.__file__).with_name("_decode_at_ref.py")
    path.write_text(ref_file.read_text())
    try:
        spec = importlib.util.spec_from_file_location("nsa_hf.ops.triton._decode_at_ref", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        path.unlink()
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-file", type=Path, required=True, help="the other version of ops/triton/decode.py")
    parser.add_argument("--shapes", nargs="+", default=["seed", "paper"], choices=list(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_decode_merge.jsonl"))
    args = parser.parse_args()
    other = decode_module_from(args.ref_file)
    rows = []
    for shape in args.shapes:
        dim = SHAPES[shape][2]
        for context in args.contexts:
            for batch in args.batches:
                q, k_cmp, v_cmp, k, v, gates, layout = decode_inputs(shape, context, batch)

                def call(module):
                    return module.decode_attention(q, k_cmp, v_cmp, k, v, k, v, gates, layout, PATTERN, dim**-0.5)

                row = dict(gpu=torch.cuda.get_device_name(), shape=shape, context=context, batch=batch,
                           max_diff=(call(this_tree).float() - call(other).float()).abs().max().item())
                for name, module in (("ref", other), ("tree", this_tree)) * 2:
                    row.setdefault(f"{name}_ms", []).append(triton.testing.do_bench_cudagraph(lambda m=module: call(m)))
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
