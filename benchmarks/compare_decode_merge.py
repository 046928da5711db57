"""The fused decode of this tree against another version of `ops/triton/decode.py`, side by side in one process, in
CUDA graphs.

    git show main:src/nsa_hf/ops/triton/decode.py > benchmarks/.probe_decode_ref.py
    python benchmarks/compare_decode_merge.py --ref-file benchmarks/.probe_decode_ref.py [--shapes seed paper]
        [--contexts 4096 32768] [--batches 1 8 32]

The other file is imported beside this tree's decode (it imports the rest of the package from this tree). For each
shape, context and batch: both decodes' ms per call in a CUDA graph (two alternating rounds each), and their largest
output difference. `--parts` adds this tree's launches one by one (the compressed partials, the selection) and its
decode with the selection in one share (the merge kernel then reads the chosen blocks: no top-n of its own) and
with the first two launches split to fill the GPU (as before they were sized by the store), and with 4 warps per
merge-kernel program rather than 8. Prints JSON lines; writes them to --out.
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
from nsa_hf.ops.layout import branch_ranges  # noqa: E402
from nsa_hf.ops.triton.common import _num_splits  # noqa: E402
from nsa_hf.ops.triton.interval import interval_partials  # noqa: E402
from nsa_hf.ops.triton.select import ranked_blocks  # noqa: E402


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


def parts(q, k_cmp, v_cmp, k, v, gates, layout, dim, call) -> dict[str, float]:
    """This tree's decode launch by launch, and with other shares of its first two launches (ms per call)."""
    scale, ranges = dim**-0.5, branch_ranges(layout, PATTERN)
    heads_kv = k.shape[1]
    cmp_shares, select_shares = this_tree._store_splits(q.shape[0], heads_kv, k_cmp.shape[0], PATTERN, q.device)
    o_cmp, lse_cmp = interval_partials(q, k_cmp, v_cmp, ranges.cmp_lo, ranges.cmp_hi, scale, 1, num_splits=cmp_shares)
    timings = dict(
        cmp_shares=cmp_shares, select_shares=select_shares,
        compressed_ms=triton.testing.do_bench_cudagraph(lambda: interval_partials(
            q, k_cmp, v_cmp, ranges.cmp_lo, ranges.cmp_hi, scale, 1, num_splits=cmp_shares)),
        selection_ms=triton.testing.do_bench_cudagraph(lambda: ranked_blocks(
            q, k_cmp, lse_cmp, layout, PATTERN, scale, select_shares)),
    )
    sized = this_tree._store_splits
    fill = _num_splits(q.shape[0] * heads_kv, q.device)
    variants = (("one_selection_share", lambda *a: (sized(*a)[0], 1)), ("filled_shares", lambda *a: (fill, fill)))
    for name, shares in variants:
        this_tree._store_splits = shares
        try:
            timings[f"{name}_ms"] = triton.testing.do_bench_cudagraph(lambda: call(this_tree))
        finally:
            this_tree._store_splits = sized
    warps = this_tree._MERGE_WARPS
    this_tree._MERGE_WARPS = 4
    try:
        timings["merge_4_warps_ms"] = triton.testing.do_bench_cudagraph(lambda: call(this_tree))
    finally:
        this_tree._MERGE_WARPS = warps
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-file", type=Path, required=True, help="the other version of ops/triton/decode.py")
    parser.add_argument("--shapes", nargs="+", default=["seed", "paper"], choices=list(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--parts", action="store_true", help="also this tree's launches one by one (see above)")
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
                if args.parts:
                    row.update(parts(q, k_cmp, v_cmp, k, v, gates, layout, dim, call))
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
