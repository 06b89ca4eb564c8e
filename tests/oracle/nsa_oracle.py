#!/usr/bin/python3
"""Independent PyTorch oracle for dmatrain's Native Sparse Attention layer (CPU reference).

The layer is torch_oracle.py's (nsa_attention: written from the layer's definition, README "NSA" and
kernels/cpu/nsa_attention.cpp's header, not from the C++ code; float64, dense masks, the selection
re-implemented in torch). This runs it on x alone and compares the output, the selected blocks and
the gradients of x and every parameter for the loss sum(out * dout) with what the C++ ops produced.

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
from torch_oracle import BadInput, nsa_attention, nsa_param_shapes, rel_error  # noqa: E402


def layer_config(c):
    """nsa.json's keys as torch_oracle's model config names them (D is d_model there, Dh the head dim)."""
    return {"H": c["H"], "Hkv": c["Hkv"], "Dh": c["D"], "D": c["d_model"], "theta": c["rope_theta"],
            **{k: c[k] for k in ("cmp_block", "cmp_stride", "sel_block", "sel_count", "window", "cmp_hidden")}}


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
    shapes = nsa_param_shapes(layer_config(c), "self_attn.")
    expect = {"x": (c["B"], c["T"], c["d_model"]), "dout": (c["B"], c["T"], c["d_model"]), **shapes}
    for n, s in expect.items():
        if n not in inputs:
            raise BadInput(f"inputs.safetensors: {n} missing")
        if inputs[n].dtype != np.float64 or tuple(inputs[n].shape) != s:
            raise BadInput(f"inputs.safetensors: {n} is {inputs[n].dtype} {list(inputs[n].shape)}, expected float64 {list(s)}")
    return c, inputs, ours, shapes


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
    out, idx = nsa_attention(x, P, "self_attn.", layer_config(c))
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
