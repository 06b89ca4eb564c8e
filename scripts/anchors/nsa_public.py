"""Anchor for NSA speed: the fastest public NSA kernels we know that run on the GPU machine (Triton,
Hopper TMA kernels: github.com/mdy666/Scalable-Flash-Native-Sparse-Attention, package flash_nsa).
Never committed: scripts/bench_nsa.sh expects a copy in a git-ignored folder (default
.anchors/flash-nsa, with a SOURCE file naming the commit) and carries it to the GPU machine.

  python3 scripts/anchors/nsa_public.py --path .anchors/flash-nsa --seq 65536
Times the attention core (compression, compressed attention, top-n selection, selected attention,
window attention, gated combination) forward and forward + backward with CUDA events, median of 10,
on one sequence: q [N, H, D], k/v [N, G, D], gates [N, H, 3]. The settings are dmatrain's NSA
defaults (block 32 / stride 16, selection blocks of 64, top 16 with the first and two most recent
forced, window 512). Differences from dmatrain's layer, stated with the numbers: one K/V shared by
the three branches (dmatrain projects each branch's own; the projections are GEMMs outside the core)
and mean-pooled compression (the package's default; its linear form does not construct in this
version), where dmatrain runs a two-layer MLP per block.
"""
import argparse, json, os, sys
import torch

from cuda_timing import median_ms as bench  # this folder: run as python3 scripts/anchors/<file>.py

p = argparse.ArgumentParser()
for k, v in dict(seq=16384, heads=64, kv_heads=4, dim=128).items():
    p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=v)
p.add_argument("--path", default=".anchors/flash-nsa")
a = p.parse_args()


def main():
    if not os.path.isdir(os.path.join(a.path, "flash_nsa")):
        print(json.dumps(dict(anchor="flash_nsa", error=f"no flash_nsa package under {a.path}")))
        return
    sys.path.insert(0, os.path.abspath(a.path))
    source = open(os.path.join(a.path, "SOURCE")).read().strip() if os.path.exists(os.path.join(a.path, "SOURCE")) else ""
    from flash_nsa import NSAConfig, HFNSACore, NSACore
    N, H, G, D = a.seq, a.heads, a.kv_heads, a.dim
    dev, bf = "cuda", torch.bfloat16
    cu = torch.tensor([0, N], device=dev, dtype=torch.int32)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(N, H, D, device=dev, dtype=bf, generator=g).requires_grad_(True)
    k = torch.randn(N, G, D, device=dev, dtype=bf, generator=g).requires_grad_(True)
    v = torch.randn(N, G, D, device=dev, dtype=bf, generator=g).requires_grad_(True)
    gates = torch.rand(N, H, 3, device=dev, dtype=bf, generator=g).requires_grad_(True)
    for name, cls in [("flash_nsa_core", NSACore), ("flash_nsa_hf", HFNSACore)]:
        try:
            cfg = NSAConfig(head_dim=D, num_heads=H, num_kv_heads=G, kernel_size=32, stride=16, block_size=64,
                            top_n=16, num_init_blocks=1, num_local_blocks=2, window_size=512)
            core = cls(cfg).to(dev)
            o = core(q, k, v, gates, cu)
            do = torch.randn_like(o)

            def fwdbwd():
                for t in (q, k, v, gates):
                    t.grad = None
                core(q, k, v, gates, cu).backward(do)
            fwd = bench(lambda: core(q, k, v, gates, cu))
            fb = bench(fwdbwd)
            print(json.dumps(dict(anchor=name, source=source, N=N, H=H, G=G, D=D, compress="mean", shared_kv=True,
                                  fwd_ms=round(fwd, 3), fwdbwd_ms=round(fb, 3))))
        except Exception as e:  # an anchor that fails is reported, not fatal to the benchmark
            print(json.dumps(dict(anchor=name, N=N, error=repr(e)[:300])))


if __name__ == "__main__":
    main()
