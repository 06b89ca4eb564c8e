#!/usr/bin/python3
"""Independent PyTorch oracle for dmatrain's Native Sparse Attention layer (CPU reference).

Written from the layer's definition (README "NSA (CPU reference)", kernels/cpu/nsa_attention.cpp's
header), not from the C++ code: builds the layer in float64 with dense masks, runs it on x, and
compares the output, the selected blocks and the gradients of x and every parameter for the loss
sum(out * dout) with what the C++ ops produced.

    /usr/bin/python3 tests/oracle/nsa_oracle.py DIR [--tol 1e-9]

DIR: nsa.json (B, T, H, Hkv, D, d_model, cmp_hidden, rope_theta, cmp_block, cmp_stride, sel_block,
sel_count, window), inputs.safetensors (x, dout [B,T,d_model] and the parameters as
self_attn.<name>, F64), ours.safetensors (out, grad.x, grad.self_attn.<name> F64; idx I32
[B,Hkv,T,sel_count]). One JSON line per compared tensor {"name", "rel", "ok"}
(rel = ||ours - ref|| / max(||ref||, 1e-30); idx: the number of differing entries), then a summary.
Exit 0: all pass; 1: a mismatch or a missing tensor; 2: bad input.
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


class BadInput(Exception):
    pass


def param_shapes(c):
    """The layer's parameters (under self_attn.) and their shapes."""
    H, Hkv, D, dm, F, l = c["H"], c["Hkv"], c["D"], c["d_model"], c["cmp_hidden"], c["cmp_block"]
    s = {"q_proj.weight": (H * D, dm)}
    for branch in ("cmp", "slc", "win"):
        for kv in ("k", "v"):
            s[f"{branch}_{kv}_proj.weight"] = (Hkv * D, dm)
    for kv in ("k", "v"):
        s[f"cmp_{kv}_mlp.pos_embed"] = (l, D)
        s[f"cmp_{kv}_mlp.fc1.weight"] = (F, l * D)
        s[f"cmp_{kv}_mlp.fc2.weight"] = (D, F)
    s["g_proj.weight"] = (3 * H, dm)
    s["o_proj.weight"] = (dm, H * D)
    return {"self_attn." + k: v for k, v in s.items()}


def rope(x, pos, theta):
    """Rotate-half RoPE of x [..., T, heads, D] at integer positions pos [T]."""
    D = x.shape[-1]
    half = D // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    ang = pos.to(torch.float64)[:, None] * freq[None, :]          # [T, half]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]  # [T, 1, half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def softmax_attention(q, k, v, mask, scale):
    """q [B,H,T,D], k/v [B,H,S,D], mask [B or 1,H or 1,T,S] bool. Rows without any key give 0."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    has = mask.any(dim=-1, keepdim=True)
    scores = torch.where(has, scores, torch.zeros_like(scores))  # keep empty rows finite
    return (torch.softmax(scores, dim=-1) @ v) * has.to(q.dtype), scores


def compress(x, pos_embed, w1, w2, l, d):
    """x [B,T,Hkv,D] -> [B,Nc,Hkv,D]: block c = positions c*d .. c*d+l-1, W2 silu(W1 flatten(block + pos))."""
    B, T, Hkv, D = x.shape
    Nc = (T - l) // d + 1 if T >= l else 0
    out = []
    for c in range(Nc):
        block = x[:, c * d:c * d + l] + pos_embed[None, :, None, :]          # [B,l,Hkv,D]
        u = block.permute(0, 2, 1, 3).reshape(B, Hkv, l * D)                 # flatten j-major
        out.append(torch.nn.functional.silu(u @ w1.T) @ w2.T)                # [B,Hkv,D]
    if not out:
        return x.new_zeros(B, 0, Hkv, D)
    return torch.stack(out, dim=1)


def select_blocks(p, c):
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
    fixed = torch.floor(p.detach() * 2.0 ** 40 + 0.5).to(torch.int64)  # [B,H,T,Nc], halves rounded up
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


def layer(P, x, c):
    B, T, _ = x.shape
    H, Hkv, D, theta = c["H"], c["Hkv"], c["D"], c["rope_theta"]
    l, d, lp, w = c["cmp_block"], c["cmp_stride"], c["sel_block"], c["window"]
    scale = 1.0 / math.sqrt(D)
    g = H // Hkv
    pre = "self_attn."
    pos = torch.arange(T)

    def proj(name, heads):
        return (x @ P[pre + name].T).view(B, T, heads, D)

    def heads_first(t, expand):  # [B,T,h,D] -> [B,H,T,D], KV heads repeated over their group
        t = t.transpose(1, 2)
        return t.repeat_interleave(g, dim=1) if expand else t

    q = heads_first(rope(proj("q_proj.weight", H), pos, theta), False)

    # compressed branch: compress raw keys/values, rotate the compressed keys at their last position
    kc = compress(proj("cmp_k_proj.weight", Hkv), P[pre + "cmp_k_mlp.pos_embed"], P[pre + "cmp_k_mlp.fc1.weight"],
                  P[pre + "cmp_k_mlp.fc2.weight"], l, d)
    vc = compress(proj("cmp_v_proj.weight", Hkv), P[pre + "cmp_v_mlp.pos_embed"], P[pre + "cmp_v_mlp.fc1.weight"],
                  P[pre + "cmp_v_mlp.fc2.weight"], l, d)
    Nc = kc.shape[1]
    last = torch.arange(Nc) * d + l - 1
    kc = rope(kc, last, theta)
    cmp_mask = (last[None, :] <= pos[:, None])[None, None]                 # [1,1,T,Nc]
    o_cmp, cmp_scores = softmax_attention(q, heads_first(kc, True), heads_first(vc, True), cmp_mask, scale)

    # selection, from the compressed branch's probabilities (not differentiated)
    p = torch.softmax(cmp_scores.detach(), dim=-1) * cmp_mask  # early rows: all 0
    idx, chosen = select_blocks(p, c)
    block_of = pos // lp
    slc_mask = chosen[..., block_of] & (pos[None, :] <= pos[:, None])       # [B,Hkv,T,T]
    slc_mask = slc_mask.repeat_interleave(g, dim=1)
    ks = heads_first(rope(proj("slc_k_proj.weight", Hkv), pos, theta), True)
    vs = heads_first(proj("slc_v_proj.weight", Hkv), True)
    o_slc, _ = softmax_attention(q, ks, vs, slc_mask, scale)

    # window branch: keys t-w+1 .. t
    kw = heads_first(rope(proj("win_k_proj.weight", Hkv), pos, theta), True)
    vw = heads_first(proj("win_v_proj.weight", Hkv), True)
    win_mask = ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - w))[None, None]
    o_win, _ = softmax_attention(q, kw, vw, win_mask, scale)

    gates = torch.sigmoid(x @ P[pre + "g_proj.weight"].T).view(B, T, H, 3).permute(0, 2, 1, 3)  # [B,H,T,3]
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win      # [B,H,T,D]
    o = o.transpose(1, 2).reshape(B, T, H * D)
    return o @ P[pre + "o_proj.weight"].T, idx


def load(d):
    def need(name):
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            raise BadInput(f"{path}: missing")
        return path

    try:
        with open(need("nsa.json")) as f:
            c = json.load(f)
        inputs, _ = safetensors_np.read(need("inputs.safetensors"))
        ours, _ = safetensors_np.read(need("ours.safetensors"))
    except (json.JSONDecodeError, safetensors_np.FormatError) as e:
        raise BadInput(str(e)) from None
    keys = ("B", "T", "H", "Hkv", "D", "d_model", "cmp_hidden", "cmp_block", "cmp_stride", "sel_block",
            "sel_count", "window")
    for k in keys + ("rope_theta",):
        if k not in c:
            raise BadInput(f"nsa.json: {k} missing")
    for k in keys:
        if not isinstance(c[k], int) or c[k] <= 0:
            raise BadInput(f"nsa.json: {k} must be a positive integer (got {c[k]!r})")
    if c["H"] % c["Hkv"] or c["cmp_block"] % c["cmp_stride"] or c["sel_block"] % c["cmp_stride"] or c["D"] % 2:
        raise BadInput("nsa.json: needs Hkv | H, d | l, d | l', even D")
    shapes = param_shapes(c)
    expect = {"x": (c["B"], c["T"], c["d_model"]), "dout": (c["B"], c["T"], c["d_model"]), **shapes}
    for n, s in expect.items():
        if n not in inputs:
            raise BadInput(f"inputs.safetensors: {n} missing")
        if inputs[n].dtype != np.float64 or tuple(inputs[n].shape) != s:
            raise BadInput(f"inputs.safetensors: {n} is {inputs[n].dtype} {list(inputs[n].shape)}, expected float64 {list(s)}")
    return c, inputs, ours, shapes


def rel_error(a, b):
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--tol", type=float, default=1e-9)
    args = ap.parse_args(argv)
    try:
        c, inputs, ours, shapes = load(args.dir)
    except BadInput as e:
        print(json.dumps({"summary": True, "ok": False, "error": f"bad input: {e}"}), flush=True)
        return 2

    P = {n: torch.tensor(inputs[n], dtype=torch.float64, requires_grad=True) for n in shapes}
    x = torch.tensor(inputs["x"], dtype=torch.float64, requires_grad=True)
    out, idx = layer(P, x, c)
    (out * torch.tensor(inputs["dout"], dtype=torch.float64)).sum().backward()
    refs = {"out": out.detach().numpy(), "grad.x": x.grad.numpy()}
    for n in shapes:
        refs["grad." + n] = P[n].grad.numpy()

    failed, worst = 0, 0.0
    line = {"name": "idx"}
    if "idx" not in ours or ours["idx"].dtype != np.int32 or tuple(ours["idx"].shape) != tuple(idx.shape):
        line.update(ok=False, error=f"missing or not int32 {list(idx.shape)}")
    else:
        diff = int((ours["idx"] != idx.numpy()).sum())
        ranked = sum(t // c["sel_block"] + 1 > c["sel_count"] for t in range(c["T"]))
        line.update(rel=diff, ok=diff == 0, ranked_queries=ranked)
    failed += not line["ok"]
    print(json.dumps(line), flush=True)
    for name, ref in refs.items():
        line = {"name": name}
        if name not in ours:
            line.update(rel=None, ok=False, error="missing from ours.safetensors")
        elif tuple(ours[name].shape) != tuple(ref.shape):
            line.update(rel=None, ok=False, error=f"shape {list(ours[name].shape)}, expected {list(ref.shape)}")
        else:
            r = rel_error(ours[name], ref)
            ok = math.isfinite(r) and r < args.tol and float(np.linalg.norm(ref)) > 0
            line.update(rel=r if math.isfinite(r) else str(r), ok=ok)
            if math.isfinite(r):
                worst = max(worst, r)
        failed += not line["ok"]
        print(json.dumps(line), flush=True)
    print(json.dumps({"summary": True, "ok": failed == 0, "compared": len(refs) + 1, "failed": failed,
                      "max_rel": worst, "tol": args.tol}), flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
