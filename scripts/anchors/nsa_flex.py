"""Anchor for NSA: the layer's attention core in PyTorch, FlexAttention for all three branches.

The NSA core as dmatrain defines it (README "NSA"), from projected queries, per-branch keys/values and
gates (projections, RoPE and o_proj are GEMMs timed elsewhere): compress keys/values per block of
l = cmp_block positions at stride d = cmp_stride (W2 silu(W1 flatten(block + pos_embed))); compressed
attention over those blocks (query t sees block c when c·d + l − 1 <= t); block importance from the
compressed probabilities mapped to selection blocks of l' = sel_block (eq. 9 as an overlap count),
summed over a GQA group's heads; the first block and the two most recent forced, top sel_count in
all; selected attention (causal in the own block); window attention (keys t − w + 1 .. t); gates.
  python3 scripts/anchors/nsa_flex.py --seq 65536 --heads 64 --kv-heads 4 --dim 128
  python3 scripts/anchors/nsa_flex.py --check        (the flex path against dense masked attention)
Prints JSON lines. Selection and block-mask building are timed apart from the attention, as the
DMA anchor does; selection uses float importances (ties may resolve differently from dmatrain's
fixed-point sums; for speed this does not matter). Causal-attention flops convention for the
TFLOP/s column: 4·B·H·N·Dh per kept key, forward; 2.5× that backward.
Needs PyTorch >= 2.5 with a CUDA device (flex_attention, return_lse, enable_gqa).
"""
import argparse, json, math, time
import torch
import torch.nn.functional as F

from cuda_timing import median_ms as bench  # this folder: run as python3 scripts/anchors/<file>.py

p = argparse.ArgumentParser()
for k, v in dict(seq=16384, heads=64, kv_heads=4, dim=128, batch=1, cmp_block=32, cmp_stride=16,
                 sel_block=64, sel_count=16, window=512, cmp_hidden=0).items():
    p.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, default=v)
p.add_argument("--check", action="store_true", help="compare the flex path with dense attention at small N, then exit")
a = p.parse_args()


def compress(x, pos, w1, w2, l, d):
    """x [B,G,N,Dh] -> [B,G,Nc,Dh]: block c = positions c·d .. c·d + l − 1."""
    B, G, N, Dh = x.shape
    blocks = x.unfold(2, l, d)                          # [B,G,Nc,Dh,l]
    blocks = blocks.transpose(-1, -2) + pos              # [B,G,Nc,l,Dh]
    u = blocks.reshape(B, G, blocks.shape[2], l * Dh)   # j-major flatten, as dmatrain
    return F.silu(u @ w1.T) @ w2.T


def overlap(Ns, Nc, lp, l, d, device):
    """[Ns, Nc] eq. 9 overlap counts: sum over m < l'/d, n < l/d of [c == (l'/d)·j + m − n]."""
    R, C = lp // d, l // d
    j = torch.arange(Ns, device=device)[:, None]
    c = torch.arange(Nc, device=device)[None, :]
    ov = torch.zeros(Ns, Nc, device=device)
    for m in range(R):
        for n in range(C):
            ov += (c == R * j + m - n).float()
    return ov


def select(q, kc, lse, scale, cfg):
    """Top sel_count selection blocks per (group, query): bool [B,G,N,Ns]. No N×Nc buffer beyond
    one chunk of queries (2^28 scores); probabilities recomputed from the compressed logsumexp."""
    B, H, N, Dh = q.shape
    G = kc.shape[1]
    l, d, lp, n = cfg["cmp_block"], cfg["cmp_stride"], cfg["sel_block"], cfg["sel_count"]
    Nc, Ns = kc.shape[2], -(-N // lp)
    chunk = max(1, (1 << 28) // (B * H * max(Nc, 1)))
    ov = overlap(Ns, Nc, lp, l, d, q.device)
    last = torch.arange(Nc, device=q.device) * d + l - 1
    sel = torch.zeros(B, G, N, Ns, dtype=torch.bool, device=q.device)
    kce = kc.repeat_interleave(H // G, dim=1).float()
    for t0 in range(0, N, chunk):
        t1 = min(N, t0 + chunk)
        t = torch.arange(t0, t1, device=q.device)
        s = (q[:, :, t0:t1].float() @ kce.transpose(-1, -2)) * scale
        pr = torch.exp(s - lse[:, :, t0:t1, None].float()) * (last[None, :] <= t[:, None])
        pr = torch.nan_to_num(pr)                                      # rows before any block: lse = −inf
        imp = (pr @ ov.T).view(B, G, H // G, t1 - t0, Ns).sum(2)       # [B,G,chunk,Ns]
        J = (t // lp)[:, None]
        blk = torch.arange(Ns, device=q.device)[None, :]
        imp = imp.masked_fill(blk > J, -1.0)                           # future blocks never chosen
        forced = (blk == 0) | (blk == J) | (blk == J - 1)
        imp = torch.where(forced & (blk <= J), torch.full_like(imp, float("inf")), imp)
        top = torch.topk(imp, min(n, Ns), dim=-1)
        keep = top.values >= 0
        sel[:, :, t0:t1].scatter_(-1, top.indices, keep)
    return sel


def selected_block_mask(sel, H, N, lp, block=128):
    """A FlexAttention BlockMask for the selected branch, built from the selection itself (a dense
    N×N mask evaluation does not fit at 64K): a (query block, key block) pair is visited when any
    query of the block selected a selection block inside the key block; mask_mod is exact per token."""
    from torch.nn.attention.flex_attention import BlockMask
    B, G, _, Ns = sel.shape
    assert block % lp == 0 and N % block == 0, "N must be a multiple of 128 and sel_block divide 128"
    Qb, Kb, r = N // block, N // block, block // lp
    used = sel.view(B, G, Qb, block, Ns).any(3)                          # [B,G,Qb,Ns]
    used = F.pad(used, (0, Kb * r - Ns)).view(B, G, Qb, Kb, r).any(-1)   # [B,G,Qb,Kb]
    used &= torch.arange(Kb, device=sel.device)[None, :] <= torch.arange(Qb, device=sel.device)[:, None]
    num = used.sum(-1, dtype=torch.int32)
    idx = torch.argsort(used.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    num, idx = num.repeat_interleave(H // G, 1), idx.repeat_interleave(H // G, 1)
    mask_mod = lambda b, h, qi, ki: sel[b, h // (H // G), qi, ki // lp] & (ki <= qi)
    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block, mask_mod=mask_mod)


def dense(q, k, v, mask, scale):
    """Reference: q [B,H,N,Dh], k/v [B,G,S,Dh], mask [B or 1, G or 1, N, S] bool; empty rows give 0."""
    H, G = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    mask = mask.repeat_interleave(H // G, 1) if mask.shape[1] == G and G != 1 else mask
    s = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True)
    s = torch.where(has, s, torch.zeros_like(s))
    return (torch.softmax(s, -1) @ v.float()) * has


def main():
    from torch.nn.attention.flex_attention import flex_attention, create_block_mask
    flex = torch.compile(flex_attention)
    dev, bf = "cuda", torch.bfloat16
    B, H, G, Dh = a.batch, a.heads, a.kv_heads, a.dim
    N = 1024 if a.check else a.seq
    l, d, lp, w = a.cmp_block, a.cmp_stride, a.sel_block, a.window
    hid = a.cmp_hidden or Dh
    cfg = vars(a)
    scale = 1.0 / math.sqrt(Dh)
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, std=1.0: (torch.randn(*s, device=dev, generator=g) * std).to(bf).requires_grad_(True)
    q = rnd(B, H, N, Dh)
    kc_raw, vc_raw, ks, vs, kw, vw = [rnd(B, G, N, Dh) for _ in range(6)]
    pos_k, pos_v = rnd(l, Dh, std=0.02), rnd(l, Dh, std=0.02)
    w1k, w1v = rnd(hid, l * Dh, std=1 / math.sqrt(l * Dh)), rnd(hid, l * Dh, std=1 / math.sqrt(l * Dh))
    w2k, w2v = rnd(Dh, hid, std=1 / math.sqrt(hid)), rnd(Dh, hid, std=1 / math.sqrt(hid))
    gates = torch.rand(B, H, N, 3, device=dev, generator=g).to(bf).requires_grad_(True)
    Nc = (N - l) // d + 1
    last = torch.arange(Nc, device=dev) * d + l - 1

    cmp_mask = lambda b, h, qi, ki: ki * d + l - 1 <= qi
    win_mask = lambda b, h, qi, ki: (ki <= qi) & (ki > qi - w)
    t0 = time.time()
    bm_cmp = create_block_mask(cmp_mask, None, None, N, Nc, device=dev, _compile=True)
    bm_win = create_block_mask(win_mask, None, None, N, N, device=dev, _compile=True)
    torch.cuda.synchronize()
    static_mask_ms = (time.time() - t0) * 1e3

    def branches(sel, bm_slc):
        kc = compress(kc_raw, pos_k, w1k, w2k, l, d)
        vc = compress(vc_raw, pos_v, w1v, w2v, l, d)
        o_cmp, lse = flex(q, kc, vc, block_mask=bm_cmp, enable_gqa=True, return_lse=True, scale=scale)
        # rows before the first complete block have no key: flex gives 0 there, as dmatrain does
        o_slc = flex(q, ks, vs, block_mask=bm_slc, enable_gqa=True, scale=scale)
        o_win = flex(q, kw, vw, block_mask=bm_win, enable_gqa=True, scale=scale)
        o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
        return o, kc, lse

    def selection():
        with torch.no_grad():
            kc = compress(kc_raw, pos_k, w1k, w2k, l, d)
            vc = compress(vc_raw, pos_v, w1v, w2v, l, d)
            _, lse = flex(q, kc, vc, block_mask=bm_cmp, enable_gqa=True, return_lse=True, scale=scale)
            sel = select(q, kc, lse, scale, cfg)
        return sel, selected_block_mask(sel, H, N, lp)

    t0 = time.time()
    sel, bm_slc = selection()
    torch.cuda.synchronize()
    select_ms = (time.time() - t0) * 1e3

    if a.check:
        with torch.no_grad():
            o, kc, _ = branches(sel, bm_slc)
            vc = compress(vc_raw, pos_v, w1v, w2v, l, d)
            pos = torch.arange(N, device=dev)
            causal = pos[None, :] <= pos[:, None]
            ref_cmp = dense(q, kc, vc, (last[None, :] <= pos[:, None])[None, None], scale)
            ref_slc = dense(q, ks, vs, sel[..., pos // lp] & causal, scale)
            ref_win = dense(q, kw, vw, (causal & (pos[None, :] > pos[:, None] - w))[None, None], scale)
            ref = gates[..., 0:1] * ref_cmp + gates[..., 1:2] * ref_slc + gates[..., 2:3] * ref_win
            err = ((o.float() - ref).norm() / ref.norm()).item()
            per_q = sel.sum(-1)
            want = torch.clamp(pos // lp + 1, max=a.sel_count)
            print(json.dumps(dict(check="nsa_flex", N=N, rel_l2=err, ok=err < 2e-2,
                                  selection_counts_ok=bool((per_q == want[None, None]).all()))))
        return

    do = torch.randn(B, H, N, Dh, device=dev, dtype=bf)
    fwd = bench(lambda: branches(sel, bm_slc)[0])
    fwdbwd = bench(lambda: branches(sel, bm_slc)[0].backward(do))
    sel_ms = bench(lambda: selection(), warm=1, iters=3)
    # keys each head attends, summed over queries: visible compressed blocks, selected blocks of l'
    # keys (an upper bound: the own block is causal), the window
    t = torch.arange(N, device=dev)
    keys = float((last[None, :] <= t[:, None]).sum()) + float(sel.sum()) / (B * G) * lp + \
        float(torch.clamp(t + 1, max=w).sum())
    flops = 4 * B * H * Dh * keys
    print(json.dumps(dict(anchor="nsa_flex", N=N, H=H, G=G, D=Dh, cmp_block=l, cmp_stride=d, sel_block=lp,
                          sel_count=a.sel_count, window=w, static_mask_ms=round(static_mask_ms),
                          first_select_ms=round(select_ms), select_and_mask_ms=round(sel_ms, 3),
                          fwd_ms=round(fwd, 3), fwdbwd_ms=round(fwdbwd, 3),
                          fwd_tflops=round(flops / fwd / 1e9), fwdbwd_tflops=round(3.5 * flops / fwdbwd / 1e9))))


if __name__ == "__main__":
    main()
