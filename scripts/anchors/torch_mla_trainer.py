"""Anchor for MLA: the model of configs/paper-80m-mla.json trained with PyTorch + torch.compile.

The MHA anchor (../shared/anchors/torch_trainer.py, copied to .anchors by scripts/bench_train.sh) with
its attention replaced by DeepSeek-V2/V3 Multi-head Latent Attention as dmatrain defines it (README
"MLA"): kv_a_proj_with_mqa [d_c + R, d] -> RMSNorm of the latent -> kv_b_proj [H·(P + Dv), d_c];
q_proj [H·(P + R), d] (or q_a_proj / RMSNorm / q_b_proj with --q_rank); RoPE on the R rotary dims,
the rotary key shared by all heads; SDPA with d_qk = P + R, d_v = Dv; o_proj [d, H·Dv].
  python3 scripts/anchors/torch_mla_trainer.py --vocab 32768 --d 768 --layers 12 --heads 6 --ffn 2304 \\
      --kv_rank 192 --seq 2048 --batch 32
Prints one JSON line: params, tokens/s, MFU (6N + 3·L·T·H·(d_qk + d_v) flops/token, dmatrain's MLA
convention, against 989 TFLOP/s). Written without a GPU at hand: run it on the GPU machine.
"""
import argparse, json, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
for k, v in dict(vocab=32768, d=768, layers=12, heads=6, ffn=2304, kv_rank=192, q_rank=0, rope_dim=64,
                 nope_dim=128, v_dim=128, seq=2048, batch=32, steps=12).items():
    p.add_argument(f"--{k}", type=int, default=v)
p.add_argument("--no-compile", action="store_true")
a = p.parse_args()
H, C, R, P, Dv, Q = a.heads, a.kv_rank, a.rope_dim, a.nope_dim, a.v_dim, a.q_rank
torch.backends.cuda.matmul.allow_tf32 = True

class RMSNorm(nn.Module):
    def __init__(s, d): super().__init__(); s.w = nn.Parameter(torch.ones(d))
    def forward(s, x): return F.rms_norm(x, (x.shape[-1],), s.w, 1e-6)

def rope(x, cos, sin):  # rotate-half over the last dim (the rotary dims)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.n1, s.n2 = RMSNorm(a.d), RMSNorm(a.d)
        if Q == 0:
            s.q = nn.Linear(a.d, H * (P + R), bias=False)
        else:
            s.qa, s.qn, s.qb = nn.Linear(a.d, Q, bias=False), RMSNorm(Q), nn.Linear(Q, H * (P + R), bias=False)
        s.kva = nn.Linear(a.d, C + R, bias=False); s.kvn = RMSNorm(C); s.kvb = nn.Linear(C, H * (P + Dv), bias=False)
        s.o = nn.Linear(H * Dv, a.d, bias=False)
        s.gu = nn.Linear(a.d, 2 * a.ffn, bias=False); s.dn = nn.Linear(a.ffn, a.d, bias=False)
    def forward(s, x, cos, sin):
        B, T, _ = x.shape; h = s.n1(x)
        q = (s.q(h) if Q == 0 else s.qb(s.qn(s.qa(h)))).view(B, T, H, P + R)
        c, kr = s.kva(h).split([C, R], -1)
        k_nope, v = s.kvb(s.kvn(c)).view(B, T, H, P + Dv).split([P, Dv], -1)
        q = torch.cat((q[..., :P], rope(q[..., P:], cos, sin)), -1)
        k = torch.cat((k_nope, rope(kr.view(B, T, 1, R), cos, sin).expand(B, T, H, R)), -1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + s.o(y.transpose(1, 2).reshape(B, T, H * Dv))
        g, u = s.gu(s.n2(x)).chunk(2, -1)
        return x + s.dn(F.silu(g) * u)

class LM(nn.Module):
    def __init__(s):
        super().__init__(); s.emb = nn.Embedding(a.vocab, a.d)
        s.blocks = nn.ModuleList([Block() for _ in range(a.layers)])
        s.nf = RMSNorm(a.d); s.head = nn.Linear(a.d, a.vocab, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
        fr = torch.outer(torch.arange(a.seq).float(), inv)
        s.register_buffer("cos", fr.cos()[None, :, None, :]); s.register_buffer("sin", fr.sin()[None, :, None, :])
    def forward(s, idx, tgt):
        x = s.emb(idx)
        for b in s.blocks: x = b(x, s.cos, s.sin)
        return F.cross_entropy(s.head(s.nf(x)).float().view(-1, a.vocab), tgt.view(-1))

m = LM().cuda()
n_params = sum(x.numel() for x in m.parameters())
opt = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=True)
fwd = m if a.no_compile else torch.compile(m)
idx = torch.randint(0, a.vocab, (a.batch, a.seq), device="cuda"); tgt = torch.randint_like(idx, a.vocab)

def step():
    with torch.autocast("cuda", torch.bfloat16):
        loss = fwd(idx, tgt)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

for _ in range(3): step()
torch.cuda.synchronize(); t0 = time.time()
for _ in range(a.steps): step()
torch.cuda.synchronize(); dt = (time.time() - t0) / a.steps
tps = a.batch * a.seq / dt
flops_tok = 6 * n_params + 3 * a.layers * a.seq * H * (P + R + Dv)
print(json.dumps(dict(anchor="torch_compile_mla" if not a.no_compile else "torch_eager_mla", params=n_params,
                      tokens_per_s=round(tps), mfu=round(tps * flops_tok / 989e12, 4), step_ms=round(dt * 1e3, 2),
                      peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2), **vars(a))))
