import torch, triton
from nsa_hf.ops import triton_kernels as tk
for (hq, hkv, d, T) in [(12, 2, 64, 32768), (64, 4, 128, 65536)]:
    torch.manual_seed(0)
    q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    hi = torch.arange(1, T + 1, device="cuda")
    cur = (hi - 1) // 64
    idx = torch.rand(T, hkv, 512, device="cuda").argsort(-1)[..., :16] % (T // 64)
    idx = torch.minimum(idx, cur[:, None, None])
    starts = torch.where(torch.ones_like(idx, dtype=torch.bool), idx * 64, -1)
    for bc in (True, False):
      try:
        f = lambda: tk.block_attention(q, k, v, starts, 64, hi, d**-0.5, block_centric=bc)
        with torch.no_grad():
            fwd = triton.testing.do_bench(f, rep=50, return_mode="median")
        g = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
        fb = triton.testing.do_bench(lambda: f().backward(g), rep=50, return_mode="median")
        print(f"hq={hq} hkv={hkv} d={d} T={T} block_centric={bc}: fwd {fwd:.2f} ms, fwd+bwd {fb:.2f} ms", flush=True)
      except Exception as e:
        print("ERR", bc, type(e).__name__, str(e)[:200])
