#!/usr/bin/python3
"""Independent PyTorch oracle for the dmatrain model (LLaMA-style, Doge-compatible; MHA/GQA, SWA, DMA, MLA, NSA).

Written from the model's definition (not from the C++ code): builds the model in float64 from
DIR/model.safetensors, runs it on DIR/batch.safetensors, and compares logits, loss and every
parameter gradient with DIR/ours.safetensors.

    /usr/bin/python3 tests/oracle/torch_oracle.py DIR [--tol 1e-5]

DIR: config.json (resolved dmatrain config; its `model` section is used), model.safetensors (F32
weights), batch.safetensors (`inputs`, `targets` I32 [B,T]; target < 0 ignored), ours.safetensors
(`logits` F32 [B,T,V], `loss` F32 [1], `grad.<param>` F32 for every parameter).
Per compared tensor one JSON line {"name", "rel", "ok"} with rel = ||ours - ref|| / max(||ref||, 1e-30);
then a summary line. NSA's selection is re-implemented here (in float64, from the compressed branch's
probabilities), not read from ours. DMA's A is the exception: its gradient is one sum per KV head, sum_j dbias_j *
dbias_j/dA, whose terms cancel (sum_j dbias_j = 0 for every query), so fp32 can only be asked to get
it right relative to the size of its terms: rel = ||ours - ref|| / max(||ref||, ||sum_j |term_j| ||). Exit 0: all pass; 1: a mismatch, a missing or an extra tensor; 2: bad input.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import safetensors_np  # noqa: E402


# name -> what a gradient's error is measured against where ||ref|| understates it (DMA's A).
ERROR_SCALE = {}


class BadInput(Exception):
    pass


# ---- config -----------------------------------------------------------------------------------

def resolve_model_config(m):
    """The `model` section with defaults resolved (0 means 'derived', as dmatrain's config documents)."""
    def get(key, kind, default=None):
        if key not in m:
            if default is None:
                raise BadInput(f"config.json: model.{key} missing")
            return default
        v = m[key]
        if kind is bool:
            if not isinstance(v, bool):
                raise BadInput(f"config.json: model.{key} must be true/false (got {v!r})")
            return v
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                raise BadInput(f"config.json: model.{key} must be an integer (got {v!r})")
            return int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f"config.json: model.{key} must be a number (got {v!r})")
        return float(v)

    c = {
        "V": get("vocab_size", int), "D": get("d_model", int), "L": get("n_layers", int),
        "H": get("n_heads", int), "Hkv": get("n_kv_heads", int, 0), "Dh": get("head_dim", int, 0),
        "F": get("ffn_dim", int, 0), "tie": get("tie_embeddings", bool, False),
        "theta": get("rope_theta", float, 10000.0), "qk_norm": get("qk_norm", bool, False),
        "residual_scale": get("residual_scale", bool, False), "eps": get("norm_eps", float, 1e-6),
    }
    if c["Hkv"] == 0:
        c["Hkv"] = c["H"]
    if c["Dh"] == 0:
        if c["H"] <= 0 or c["D"] % c["H"]:
            raise BadInput(f"config.json: model.head_dim is 0 and d_model {c['D']} is not a multiple of n_heads {c['H']}")
        c["Dh"] = c["D"] // c["H"]
    if c["F"] == 0:  # 8/3 * d_model rounded up to a multiple of 64
        c["F"] = -(-8 * c["D"] // (3 * 64)) * 64
    for k in ("V", "D", "H", "Hkv", "Dh", "F"):
        if c[k] <= 0:
            raise BadInput(f"config.json: resolved {k} = {c[k]} must be > 0")
    if c["L"] < 0:
        raise BadInput(f"config.json: model.n_layers must be >= 0 (got {c['L']})")
    if c["H"] % c["Hkv"]:
        raise BadInput(f"config.json: n_kv_heads {c['Hkv']} must divide n_heads {c['H']}")
    if c["Dh"] % 2:
        raise BadInput(f"config.json: head_dim {c['Dh']} must be even (RoPE)")
    att = m.get("attention", {"type": "mha"})
    if not isinstance(att, dict):
        raise BadInput("config.json: model.attention must be an object")
    c["att"] = att.get("type", "mha")
    c["window"] = 0
    c["bias_form"] = att.get("bias_form", "exp")
    if c["att"] in ("swa", "dma"):
        w = att.get("window")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w != int(w) or w <= 0:
            raise BadInput(f"config.json: {c['att']} needs model.attention.window > 0 (got {w!r})")
        c["window"] = int(w)
    elif c["att"] == "mla":
        # DeepSeek-V2/V3 Multi-head Latent Attention (README "MLA"); nope_dim / v_dim 0 mean head_dim
        def dim(key, default):
            v = att.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 0:
                raise BadInput(f"config.json: model.attention.{key} must be a non-negative integer (got {v!r})")
            return int(v) or default
        c["kv_rank"] = dim("kv_rank", 0)
        c["q_rank"] = int(att.get("q_rank", 0))
        c["rope_dim"] = dim("rope_dim", 64)
        c["nope_dim"] = dim("nope_dim", c["Dh"])
        c["v_dim"] = dim("v_dim", c["Dh"])
        if c["kv_rank"] <= 0 or c["rope_dim"] % 2 or c["q_rank"] < 0:
            raise BadInput(f"config.json: mla needs kv_rank > 0, an even rope_dim and q_rank >= 0 (got {att!r})")
        c["Hkv"] = c["H"]  # n_kv_heads does not apply to mla: one key/value head per query head
    elif c["att"] == "nsa":
        # Native Sparse Attention (README "NSA"); cmp_hidden 0 means head_dim
        for key, default in (("cmp_block", 32), ("cmp_stride", 16), ("sel_block", 64), ("sel_count", 16),
                             ("window", 512), ("cmp_hidden", 0)):
            v = att.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 0:
                raise BadInput(f"config.json: model.attention.{key} must be a non-negative integer (got {v!r})")
            c[key] = int(v)
        c["cmp_hidden"] = c["cmp_hidden"] or c["Dh"]
        if (c["cmp_stride"] <= 0 or c["cmp_block"] <= 0 or c["cmp_block"] % c["cmp_stride"] or c["sel_block"] <= 0
                or c["sel_block"] % c["cmp_stride"] or c["sel_count"] < 3 or c["window"] <= 0 or c["qk_norm"]):
            raise BadInput(f"config.json: nsa needs cmp_stride | cmp_block, cmp_stride | sel_block, sel_count >= 3, "
                           f"window > 0 and no qk_norm (got {att!r})")
    elif c["att"] != "mha":
        raise BadInput(f"config.json: attention type {c['att']!r} is not covered by this oracle "
                       "(mha, swa, dma, mla, nsa)")
    if c["att"] == "dma" and c["bias_form"] not in ("exp", "linear"):
        raise BadInput(f"config.json: model.attention.bias_form must be exp or linear (got {c['bias_form']!r})")
    c["local_window"] = int(att.get("local_window", 0) or 0) if c["att"] == "dma" else 0
    if c["local_window"] < 0:
        raise BadInput(f"config.json: model.attention.local_window must be >= 0 (got {c['local_window']})")
    return c


def param_shapes(c):
    """Every parameter of the model: name -> shape, in a fixed order."""
    D, H, Hkv, Dh, F = c["D"], c["H"], c["Hkv"], c["Dh"], c["F"]
    s = {"model.embed_tokens.weight": (c["V"], D)}
    for i in range(c["L"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (D,)
        if c["att"] == "mla":  # Hugging Face DeepseekV3Attention's parameters
            C, R, P, Dv, Q = c["kv_rank"], c["rope_dim"], c["nope_dim"], c["v_dim"], c["q_rank"]
            if Q == 0:
                s[p + "self_attn.q_proj.weight"] = (H * (P + R), D)
            else:
                s[p + "self_attn.q_a_proj.weight"] = (Q, D)
                s[p + "self_attn.q_a_layernorm.weight"] = (Q,)
                s[p + "self_attn.q_b_proj.weight"] = (H * (P + R), Q)
            s[p + "self_attn.kv_a_proj_with_mqa.weight"] = (C + R, D)
            s[p + "self_attn.kv_a_layernorm.weight"] = (C,)
            s[p + "self_attn.kv_b_proj.weight"] = (H * (P + Dv), C)
            s[p + "self_attn.o_proj.weight"] = (D, H * Dv)
        elif c["att"] == "nsa":
            s.update(nsa_param_shapes(c, p + "self_attn."))
        else:
            s[p + "self_attn.q_proj.weight"] = (H * Dh, D)
            s[p + "self_attn.k_proj.weight"] = (Hkv * Dh, D)
            s[p + "self_attn.v_proj.weight"] = (Hkv * Dh, D)
            if c["qk_norm"]:
                s[p + "self_attn.q_norm.weight"] = (Dh,)
                s[p + "self_attn.k_norm.weight"] = (Dh,)
            s[p + "self_attn.o_proj.weight"] = (D, H * Dh)
            if c["att"] == "dma":
                s[p + "self_attn.dt_proj.weight"] = (Hkv, Hkv * Dh)  # nn.Linear(Hkv*Dh -> Hkv), as HF Doge
                s[p + "self_attn.A"] = (Hkv,)
        if c["residual_scale"]:
            s[p + "input_residual"] = (D,)
            s[p + "post_attention_residual"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
        s[p + "mlp.gate_proj.weight"] = (F, D)
        s[p + "mlp.up_proj.weight"] = (F, D)
        s[p + "mlp.down_proj.weight"] = (D, F)
    s["model.norm.weight"] = (D,)
    if not c["tie"]:
        s["lm_head.weight"] = (c["V"], D)
    return s


# ---- the model --------------------------------------------------------------------------------

def rms_norm(x, g, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * g


def rope(x, theta, positions=None):
    """x [B,T,heads,Dh]; rotate-half convention; position of row t: positions[t] (default t = 0..T-1)."""
    T, Dh = x.shape[1], x.shape[3]
    half = Dh // 2
    i = torch.arange(half, dtype=torch.float64)
    freq = theta ** (-2.0 * i / Dh)
    pos = torch.arange(T) if positions is None else positions
    ang = pos.to(torch.float64)[:, None] * freq[None, :]  # [T, half]
    cos = torch.cos(ang).to(x.dtype)[None, :, None, :]
    sin = torch.sin(ang).to(x.dtype)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def visible_mask(T, c):
    """[T(query), T(key)] bool: key s visible to query t."""
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    m = s <= t
    if c["att"] == "swa":
        m = m & (s > t - c["window"])
    return m


def dma_bias_and_mask(v, P, p, c):
    """Dynamic Mask Attention (README "The model"; arXiv 2508.02124): per-key bias from the values and the kept-key mask.

    v [B,T,Hkv,Dh] -> bias [B,Hkv,T] (differentiable), mask [B,Hkv,T(query),T(key)] bool (constant).
    z = concat_heads(v) . W_dt^T; bias = exp(A*softplus(z)) ("exp") or A*softplus(z) ("linear").
    Query i keeps key j iff j <= i and bias_j >= t_i, t_i the w-th largest bias among keys 0..i
    (-inf while i+1 < w): keys tied with t_i are all kept. t is found by sorting each prefix.
    With a local window L > 0 (dmatrain's extension): query i keeps keys i-L+1..i, and of the keys
    0..i-L those whose bias reaches the w-th largest bias among exactly those keys.
    """
    B, T, Hkv, Dh = v.shape
    z = v.reshape(B, T, Hkv * Dh) @ P[p + "self_attn.dt_proj.weight"].T       # [B,T,Hkv]
    a = P[p + "self_attn.A"] * torch.logaddexp(z, torch.zeros_like(z))         # A * softplus(z)
    bias = (torch.exp(a) if c["bias_form"] == "exp" else a).transpose(1, 2)    # [B,Hkv,T]
    b = bias.detach()
    if bias.requires_grad:  # the size of dA's terms: sum over (b, j) of |dbias_j * dbias_j/dA|
        sp = torch.logaddexp(z, torch.zeros_like(z)).transpose(1, 2).detach()
        dbias_dA = b * sp if c["bias_form"] == "exp" else sp

        def record(g, name=p + "self_attn.A", d=dbias_dA):
            ERROR_SCALE[name] = (g.detach() * d).abs().sum(dim=(0, 2)).numpy()
        bias.register_hook(record)
    w, L = c["window"], c["local_window"]
    # thr[..., i]: the threshold for the keys 0..i-L that query i tests (+inf when there are none).
    thr = torch.full((B, Hkv, T), float("-inf"), dtype=b.dtype)
    for i in range(T):
        n = i - L + 1  # keys 0..n-1 are tested against the bias
        if n <= 0:
            thr[:, :, i] = float("inf")
        elif n >= w:
            thr[:, :, i] = torch.sort(b[:, :, :n], dim=-1, descending=True).values[:, :, w - 1]
    qi = torch.arange(T)[:, None]
    kj = torch.arange(T)[None, :]
    causal = kj <= qi                                                            # [query, key]
    recent = (qi - kj < L) & causal
    mask = recent[None, None] | (causal[None, None] & (b[:, :, None, :] >= thr[:, :, :, None]))
    return bias, mask


def mla_attention(a, P, p, c):
    """DeepSeek-V2/V3 Multi-head Latent Attention, as Hugging Face's DeepseekV3Attention computes it
    (rope_interleave = False): a latent c_kv of rank kv_rank (RMSNorm'd) expanded per head into
    k_nope and v, one rotary key shared by all heads, queries [q_nope | RoPE(q_rope)] (optionally
    through a compressed q_a), scores scaled by 1/sqrt(nope + rope), causal."""
    B, T, _ = a.shape
    H, C, R, Pn, Dv, Q = c["H"], c["kv_rank"], c["rope_dim"], c["nope_dim"], c["v_dim"], c["q_rank"]
    if Q == 0:
        q = a @ P[p + "self_attn.q_proj.weight"].T
    else:
        qa = rms_norm(a @ P[p + "self_attn.q_a_proj.weight"].T, P[p + "self_attn.q_a_layernorm.weight"], c["eps"])
        q = qa @ P[p + "self_attn.q_b_proj.weight"].T
    q = q.view(B, T, H, Pn + R)
    q_nope, q_rot = q[..., :Pn], q[..., Pn:]
    ckv = a @ P[p + "self_attn.kv_a_proj_with_mqa.weight"].T                    # [B,T,C+R]
    latent, k_rot = ckv[..., :C], ckv[..., C:]
    kv = rms_norm(latent, P[p + "self_attn.kv_a_layernorm.weight"], c["eps"]) @ P[p + "self_attn.kv_b_proj.weight"].T
    kv = kv.view(B, T, H, Pn + Dv)
    k_nope, v = kv[..., :Pn], kv[..., Pn:]
    q_rot = rope(q_rot, c["theta"])                                             # over the R rotary dims
    k_rot = rope(k_rot.view(B, T, 1, R), c["theta"]).expand(B, T, H, R)
    q = torch.cat([q_nope, q_rot], dim=-1).transpose(1, 2)                      # [B,H,T,P+R]
    k = torch.cat([k_nope, k_rot], dim=-1).transpose(1, 2)
    v = v.transpose(1, 2)                                                       # [B,H,T,Dv]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(Pn + R)).masked_fill(~visible_mask(T, c), float("-inf"))
    o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, H * Dv)
    return o @ P[p + "self_attn.o_proj.weight"].T



# ---- Native Sparse Attention --------------------------------------------------------------------

def nsa_param_shapes(c, pre):
    """NSA's parameters under `pre` (…self_attn.) and their shapes, in the model's order."""
    H, Hkv, Dh, D, F, l = c["H"], c["Hkv"], c["Dh"], c["D"], c["cmp_hidden"], c["cmp_block"]
    s = {"q_proj.weight": (H * Dh, D)}
    for branch in ("cmp", "slc", "win"):
        for kv in ("k", "v"):
            s[f"{branch}_{kv}_proj.weight"] = (Hkv * Dh, D)
    for kv in ("k", "v"):
        s[f"cmp_{kv}_mlp.pos_embed"] = (l, Dh)
        s[f"cmp_{kv}_mlp.fc1.weight"] = (F, l * Dh)
        s[f"cmp_{kv}_mlp.fc2.weight"] = (Dh, F)
    s["g_proj.weight"] = (3 * H, D)
    s["o_proj.weight"] = (D, H * Dh)
    return {pre + k: v for k, v in s.items()}


def masked_attention(q, k, v, mask, scale):
    """q [B,H,T,Dh], k/v [B,H,S,Dh], mask [B or 1,H or 1,T,S] bool. Rows without any key give 0.
    Returns the output and the masked scores."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    has = mask.any(dim=-1, keepdim=True)
    scores = torch.where(has, scores, torch.zeros_like(scores))  # keep empty rows finite
    return (torch.softmax(scores, dim=-1) @ v) * has.to(q.dtype), scores


def nsa_compress(x, pos_embed, w1, w2, l, d):
    """x [B,T,Hkv,Dh] -> [B,Nc,Hkv,Dh]: block c = positions c*d .. c*d+l-1, W2 silu(W1 flatten(block + pos))."""
    B, T, Hkv, Dh = x.shape
    Nc = (T - l) // d + 1 if T >= l else 0
    out = []
    for c in range(Nc):
        block = x[:, c * d:c * d + l] + pos_embed[None, :, None, :]          # [B,l,Hkv,Dh]
        u = block.permute(0, 2, 1, 3).reshape(B, Hkv, l * Dh)               # flatten j-major
        out.append(torch.nn.functional.silu(u @ w1.T) @ w2.T)               # [B,Hkv,Dh]
    if not out:
        return x.new_zeros(B, 0, Hkv, Dh)
    return torch.stack(out, dim=1)


def nsa_select(p, c):
    """p [B,H,T,Nc] compressed attention probabilities (0 where not visible) -> idx [B,Hkv,T,n] and
    the mask of selected selection blocks [B,Hkv,T,Ns].

    Importance of block j for query t: eq. 9, sum_{m < l'/d} sum_{n < l/d} p[(l'/d) j + m - n], each p
    rounded to a multiple of 2^-40 and summed exactly (int64), summed over the query heads of a KV
    head. Blocks 0, J-1, J (J = t // l') are always taken; then the other blocks <= J by importance,
    ties to the lower index, up to min(J+1, n) blocks in all."""
    B, H, T, Nc = p.shape
    Hkv, lp, l, d, n = c["Hkv"], c["sel_block"], c["cmp_block"], c["cmp_stride"], c["sel_count"]
    Ns = -(-T // lp)
    R, C = lp // d, l // d
    ov = torch.zeros(Ns, Nc, dtype=torch.int64)
    for j in range(Ns):
        for m in range(R):
            for nn in range(C):
                cc = R * j + m - nn
                if 0 <= cc < Nc:
                    ov[j, cc] += 1
    fixed = torch.floor(p.detach().to(torch.float64) * 2.0 ** 40 + 0.5).to(torch.int64)  # halves rounded up
    imp = (fixed[..., None, :] * ov).sum(-1)                            # [B,H,T,Ns]
    imp = imp.reshape(B, Hkv, H // Hkv, T, Ns).sum(2)                   # [B,Hkv,T,Ns]
    idx = torch.full((B, Hkv, T, n), -1, dtype=torch.int32)
    chosen = torch.zeros(B, Hkv, T, Ns, dtype=torch.bool)
    big = torch.iinfo(torch.int64).max
    for t in range(T):
        J = t // lp
        key = imp[:, :, t, :J + 1].clone()
        for f in {0, J - 1, J}:
            if f >= 0:
                key[..., f] = big
        # stable descending sort: equal keys keep ascending block order
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :min(J + 1, n)]
        top = torch.sort(order, dim=-1).values
        idx[:, :, t, :top.shape[-1]] = top.to(torch.int32)
        chosen[:, :, t].scatter_(-1, top, True)
    return idx, chosen


def nsa_attention(x, P, pre, c):
    """Native Sparse Attention (README "NSA") on x [B,T,D] with the parameters P[pre + name]: returns
    the layer's output [B,T,D] and the selection idx [B,Hkv,T,n]. Three branches with their own keys
    and values over q = RoPE(x W_q^T): compressed (an MLP per block of l keys at stride d, the
    compressed key rotated at the block's last position; query t sees blocks ending at or before t),
    selected (n blocks of l' keys chosen from the compressed probabilities, shared by a GQA group,
    causal in the own block), window (keys t-w+1 .. t); o = sum_c sigmoid(x W_g^T)_c o_c, then o_proj."""
    B, T, _ = x.shape
    H, Hkv, Dh, theta = c["H"], c["Hkv"], c["Dh"], c["theta"]
    l, d, lp, w = c["cmp_block"], c["cmp_stride"], c["sel_block"], c["window"]
    scale = 1.0 / math.sqrt(Dh)
    g = H // Hkv
    pos = torch.arange(T)

    def proj(name, heads):
        return (x @ P[pre + name].T).view(B, T, heads, Dh)

    def heads_first(t, expand):  # [B,T,h,Dh] -> [B,H,T,Dh], KV heads repeated over their group
        t = t.transpose(1, 2)
        return t.repeat_interleave(g, dim=1) if expand else t

    q = heads_first(rope(proj("q_proj.weight", H), theta), False)

    # compressed branch: compress raw keys/values, rotate the compressed keys at their last position
    kc = nsa_compress(proj("cmp_k_proj.weight", Hkv), P[pre + "cmp_k_mlp.pos_embed"],
                      P[pre + "cmp_k_mlp.fc1.weight"], P[pre + "cmp_k_mlp.fc2.weight"], l, d)
    vc = nsa_compress(proj("cmp_v_proj.weight", Hkv), P[pre + "cmp_v_mlp.pos_embed"],
                      P[pre + "cmp_v_mlp.fc1.weight"], P[pre + "cmp_v_mlp.fc2.weight"], l, d)
    Nc = kc.shape[1]
    last = torch.arange(Nc) * d + l - 1
    kc = rope(kc, theta, last)
    cmp_mask = (last[None, :] <= pos[:, None])[None, None]                 # [1,1,T,Nc]
    o_cmp, cmp_scores = masked_attention(q, heads_first(kc, True), heads_first(vc, True), cmp_mask, scale)

    # selection, from the compressed branch's probabilities (not differentiated)
    p = torch.softmax(cmp_scores.detach(), dim=-1) * cmp_mask  # early rows: all 0
    idx, chosen = nsa_select(p, c)
    block_of = pos // lp
    slc_mask = chosen[..., block_of] & (pos[None, :] <= pos[:, None])       # [B,Hkv,T,T]
    slc_mask = slc_mask.repeat_interleave(g, dim=1)
    ks = heads_first(rope(proj("slc_k_proj.weight", Hkv), theta), True)
    vs = heads_first(proj("slc_v_proj.weight", Hkv), True)
    o_slc, _ = masked_attention(q, ks, vs, slc_mask, scale)

    # window branch: keys t-w+1 .. t
    kw = heads_first(rope(proj("win_k_proj.weight", Hkv), theta), True)
    vw = heads_first(proj("win_v_proj.weight", Hkv), True)
    win_mask = ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - w))[None, None]
    o_win, _ = masked_attention(q, kw, vw, win_mask, scale)

    gates = torch.sigmoid(x @ P[pre + "g_proj.weight"].T).view(B, T, H, 3).permute(0, 2, 1, 3)  # [B,H,T,3]
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win      # [B,H,T,Dh]
    o = o.transpose(1, 2).reshape(B, T, H * Dh)
    return o @ P[pre + "o_proj.weight"].T, idx


def attention(a, P, p, c):
    if c["att"] == "mla":
        return mla_attention(a, P, p, c)
    if c["att"] == "nsa":
        return nsa_attention(a, P, p + "self_attn.", c)[0]
    B, T, _ = a.shape
    H, Hkv, Dh = c["H"], c["Hkv"], c["Dh"]
    q = (a @ P[p + "self_attn.q_proj.weight"].T).view(B, T, H, Dh)
    k = (a @ P[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, Dh)
    v = (a @ P[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, Dh)
    if c["qk_norm"]:
        q = rms_norm(q, P[p + "self_attn.q_norm.weight"], c["eps"])
        k = rms_norm(k, P[p + "self_attn.k_norm.weight"], c["eps"])
    q = rope(q, c["theta"])
    k = rope(k, c["theta"])
    v_kv = v
    kv_of_head = torch.arange(H) // (H // Hkv)  # query head j reads KV head j // (H/Hkv)
    q = q.transpose(1, 2)                        # [B,H,T,Dh]
    k = k[:, :, kv_of_head].transpose(1, 2)      # [B,H,T,Dh]
    v = v[:, :, kv_of_head].transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    if c["att"] == "dma":
        bias, mask = dma_bias_and_mask(v_kv, P, p, c)
        scores = (scores + bias[:, kv_of_head, None, :]).masked_fill(~mask[:, kv_of_head], float("-inf"))
    else:
        scores = scores.masked_fill(~visible_mask(T, c), float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v        # [B,H,T,Dh]
    o = o.transpose(1, 2).reshape(B, T, H * Dh)
    return o @ P[p + "self_attn.o_proj.weight"].T


def forward(P, c, inputs):
    """P: name -> tensor; inputs long [B,T]. Returns logits [B,T,V]."""
    E = P["model.embed_tokens.weight"]
    h = E[inputs]
    for i in range(c["L"]):
        p = f"model.layers.{i}."
        a = rms_norm(h, P[p + "input_layernorm.weight"], c["eps"])
        out = attention(a, P, p, c)
        h = (P[p + "input_residual"] * h if c["residual_scale"] else h) + out
        m = rms_norm(h, P[p + "post_attention_layernorm.weight"], c["eps"])
        gate = m @ P[p + "mlp.gate_proj.weight"].T
        up = m @ P[p + "mlp.up_proj.weight"].T
        mlp = (torch.nn.functional.silu(gate) * up) @ P[p + "mlp.down_proj.weight"].T
        h = (P[p + "post_attention_residual"] * h if c["residual_scale"] else h) + mlp
    W_out = E if c["tie"] else P["lm_head.weight"]
    return rms_norm(h, P["model.norm.weight"], c["eps"]) @ W_out.T


def loss_fn(logits, targets):
    """Mean cross-entropy over positions with target >= 0."""
    V = logits.shape[-1]
    lg = logits.reshape(-1, V)
    t = targets.reshape(-1)
    keep = t >= 0
    nll = torch.logsumexp(lg, dim=-1) - lg.gather(1, t.clamp(min=0)[:, None])[:, 0]
    return (nll * keep.to(lg.dtype)).sum() / keep.sum()


def run_model(weights, c, inputs, targets, dtype):
    """weights: name -> np.ndarray. Returns (logits, loss, {name: grad}) as torch tensors of `dtype`."""
    P = {n: torch.tensor(np.asarray(w), dtype=dtype, requires_grad=True) for n, w in weights.items()}
    inp = torch.tensor(np.asarray(inputs), dtype=torch.long)
    tgt = torch.tensor(np.asarray(targets), dtype=torch.long)
    logits = forward(P, c, inp)
    loss = loss_fn(logits, tgt)
    loss.backward()
    return logits.detach(), loss.detach().reshape(1), {n: p.grad for n, p in P.items()}


# ---- checking the inputs, comparing ---------------------------------------------------------------

def load_inputs(d):
    def need(name):
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            raise BadInput(f"{path}: missing")
        return path

    try:
        with open(need("config.json")) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise BadInput(f"{os.path.join(d, 'config.json')}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise BadInput(f"{os.path.join(d, 'config.json')}: expected an object with a `model` section")
    c = resolve_model_config(cfg["model"])
    try:
        weights, _ = safetensors_np.read(need("model.safetensors"))
        batch, _ = safetensors_np.read(need("batch.safetensors"))
        ours, _ = safetensors_np.read(need("ours.safetensors"))
    except safetensors_np.FormatError as e:
        raise BadInput(str(e)) from None

    shapes = param_shapes(c)
    missing = [n for n in shapes if n not in weights]
    extra = [n for n in weights if n not in shapes]
    if missing or extra:
        raise BadInput(f"model.safetensors does not match the config: missing {missing}, unexpected {extra}")
    for n, s in shapes.items():
        w = weights[n]
        if w.dtype != np.float32 or tuple(w.shape) != s:
            raise BadInput(f"model.safetensors: {n} is {w.dtype} {list(w.shape)}, expected float32 {list(s)}")
        if not np.isfinite(w).all():
            raise BadInput(f"model.safetensors: {n} holds non-finite values")
    for n in ("inputs", "targets"):
        if n not in batch:
            raise BadInput(f"batch.safetensors: no tensor '{n}'")
        if batch[n].dtype != np.int32 or batch[n].ndim != 2:
            raise BadInput(f"batch.safetensors: {n} is {batch[n].dtype} {list(batch[n].shape)}, expected int32 [B,T]")
    inputs, targets = batch["inputs"], batch["targets"]
    if inputs.shape != targets.shape or inputs.size == 0:
        raise BadInput(f"batch.safetensors: inputs {list(inputs.shape)} and targets {list(targets.shape)} "
                       "must have the same non-empty shape")
    if inputs.min() < 0 or inputs.max() >= c["V"]:
        raise BadInput(f"batch.safetensors: inputs must lie in [0, {c['V']}) (got {inputs.min()} .. {inputs.max()})")
    if targets.max() >= c["V"]:
        raise BadInput(f"batch.safetensors: targets must be < vocab_size {c['V']} (got {targets.max()})")
    if not (targets >= 0).any():
        raise BadInput("batch.safetensors: every target is ignored (< 0): the loss is undefined")
    return c, weights, inputs, targets, ours


def rel_error(ours, ref, scale=None):
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = float(np.linalg.norm(ref.ravel()))
    if scale is not None:
        den = max(den, float(np.linalg.norm(np.asarray(scale, dtype=np.float64).ravel())))
    return float(np.linalg.norm((ours - ref).ravel()) / max(den, 1e-30))


def compare(ours, refs, tol):
    """ours: name -> np.ndarray; refs: ordered name -> np.ndarray. Prints lines; returns #failures."""
    failed = 0
    worst = 0.0
    for name, ref in refs.items():
        line = {"name": name}
        if name not in ours:
            line.update(rel=None, ok=False, error="missing from ours.safetensors")
        elif tuple(ours[name].shape) != tuple(ref.shape):
            line.update(rel=None, ok=False,
                        error=f"shape {list(ours[name].shape)}, expected {list(ref.shape)}")
        elif ours[name].dtype != np.float32:
            line.update(rel=None, ok=False, error=f"dtype {ours[name].dtype}, expected float32")
        else:
            r = rel_error(ours[name], ref, ERROR_SCALE.get(name[len("grad."):]) if name.startswith("grad.") else None)
            ok = math.isfinite(r) and r < tol
            line.update(rel=r if math.isfinite(r) else str(r), ok=ok)
            if math.isfinite(r):
                worst = max(worst, r)
        failed += not line["ok"]
        print(json.dumps(line), flush=True)
    for name in ours:
        if name not in refs:
            print(json.dumps({"name": name, "rel": None, "ok": False, "error": "unexpected tensor in ours.safetensors"}))
            failed += 1
    return failed, worst


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    try:
        c, weights, inputs, targets, ours = load_inputs(args.dir)
    except BadInput as e:
        print(json.dumps({"summary": True, "ok": False, "error": f"bad input: {e}"}), flush=True)
        return 2
    logits, loss, grads = run_model(weights, c, inputs, targets, torch.float64)
    refs = {"logits": logits.numpy(), "loss": loss.numpy()}
    for n in param_shapes(c):
        refs["grad." + n] = grads[n].numpy()
    failed, worst = compare(ours, refs, args.tol)
    summary = {"summary": True, "ok": failed == 0, "compared": len(refs), "failed": failed,
               "max_rel": worst, "tol": args.tol, "loss_ref": float(loss[0])}
    print(json.dumps(summary), flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
