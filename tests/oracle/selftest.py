#!/usr/bin/python3
"""Self-test of torch_oracle.py: proves it passes on a correct "ours" and fails on wrong ones.

    /usr/bin/python3 tests/oracle/selftest.py

For a few small random configs (MHA/SWA/MLA, GQA/MQA, tied/untied, qk_norm, residual_scale, ignored
targets) it writes a DIR the way the C++ test does, with "ours" computed by the oracle's own torch
code in float32, and checks:
  1. the oracle's vectorised float64 model equals a literal loop-by-loop numpy transcription of the
     model definition (so the oracle itself matches the written definition, not just itself);
  2. torch_oracle.py DIR exits 0 on the float32 result;
  3. it exits 1 when one gradient is perturbed, one is missing, one is extra, or "ours" used a
     window one too large (the SWA off-by-one), and 2 on bad input.
Exit 0 iff every check holds.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import safetensors_np  # noqa: E402
import torch_oracle as orc  # noqa: E402

PY = sys.executable
failures = []


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    if not cond:
        failures.append(what)


def random_case(seed, model, B=2, T=7):
    rng = np.random.default_rng(seed)
    c = orc.resolve_model_config(model)
    weights = {}
    for n, s in orc.param_shapes(c).items():
        if n.endswith("norm.weight") or n.endswith("residual"):
            w = 1.0 + 0.3 * rng.standard_normal(s)   # gains near 1, not exactly 1
        else:
            w = rng.standard_normal(s) * (0.5 if "embed" in n else 1.0 / math.sqrt(s[-1]))
        weights[n] = w.astype(np.float32)
    inputs = rng.integers(0, c["V"], size=(B, T)).astype(np.int32)
    targets = rng.integers(0, c["V"], size=(B, T)).astype(np.int32)
    targets[0, 1] = -1      # ignored positions
    targets[1, -1] = -100
    return c, weights, inputs, targets


# ---- a literal transcription of the definition, loops everywhere (float64 numpy) --------------------

def naive_logits(c, W, inputs):
    V, D, H, Hkv, Dh, eps = c["V"], c["D"], c["H"], c["Hkv"], c["Dh"], c["eps"]
    W = {k: v.astype(np.float64) for k, v in W.items()}

    def rms(x, g):
        return x / math.sqrt(sum(float(e) * float(e) for e in x) / len(x) + eps) * g

    def rot(x, t):  # rotate-half RoPE over all of x (MLA: its rotary dims)
        n = len(x)
        y = np.empty_like(x)
        for i in range(n // 2):
            f = c["theta"] ** (-2.0 * i / n)
            co, si = math.cos(t * f), math.sin(t * f)
            y[i] = x[i] * co - x[i + n // 2] * si
            y[i + n // 2] = x[i + n // 2] * co + x[i] * si
        return y

    def mla_qkv(p, a, t):
        """Per head q, k, v of Multi-head Latent Attention (DeepSeek-V2/V3) at position t."""
        C, R, P, Dv, Q = c["kv_rank"], c["rope_dim"], c["nope_dim"], c["v_dim"], c["q_rank"]
        if Q == 0:
            qf = W[p + "self_attn.q_proj.weight"] @ a
        else:
            qf = W[p + "self_attn.q_b_proj.weight"] @ rms(W[p + "self_attn.q_a_proj.weight"] @ a,
                                                         W[p + "self_attn.q_a_layernorm.weight"])
        ckv = W[p + "self_attn.kv_a_proj_with_mqa.weight"] @ a
        kv = W[p + "self_attn.kv_b_proj.weight"] @ rms(ckv[:C], W[p + "self_attn.kv_a_layernorm.weight"])
        kr = rot(ckv[C:], t)
        q = [np.concatenate([qf[j * (P + R):j * (P + R) + P], rot(qf[j * (P + R) + P:(j + 1) * (P + R)], t)])
             for j in range(H)]
        k = [np.concatenate([kv[j * (P + Dv):j * (P + Dv) + P], kr]) for j in range(H)]
        v = [kv[j * (P + Dv) + P:(j + 1) * (P + Dv)] for j in range(H)]
        return q, k, v

    B, T = inputs.shape
    out = np.zeros((B, T, V))
    for b in range(B):
        h = [W["model.embed_tokens.weight"][inputs[b, t]].copy() for t in range(T)]
        for li in range(c["L"]):
            p = f"model.layers.{li}."
            a = [rms(h[t], W[p + "input_layernorm.weight"]) for t in range(T)]
            if c["att"] == "mla":
                q, k, v = map(list, zip(*[mla_qkv(p, a[t], t) for t in range(T)]))
                Dq, Dv = c["nope_dim"] + c["rope_dim"], c["v_dim"]
            else:
                q = [[W[p + "self_attn.q_proj.weight"][j * Dh:(j + 1) * Dh] @ a[t] for j in range(H)] for t in range(T)]
                k = [[W[p + "self_attn.k_proj.weight"][j * Dh:(j + 1) * Dh] @ a[t] for j in range(Hkv)]
                     for t in range(T)]
                v = [[W[p + "self_attn.v_proj.weight"][j * Dh:(j + 1) * Dh] @ a[t] for j in range(Hkv)]
                     for t in range(T)]
                if c["qk_norm"]:
                    q = [[rms(x, W[p + "self_attn.q_norm.weight"]) for x in row] for row in q]
                    k = [[rms(x, W[p + "self_attn.k_norm.weight"]) for x in row] for row in k]
                q = [[rot(x, t) for x in q[t]] for t in range(T)]
                k = [[rot(x, t) for x in k[t]] for t in range(T)]
                Dq, Dv = Dh, Dh
            new_h = []
            for t in range(T):
                o = np.zeros(H * Dv)
                for j in range(H):
                    g = j // (H // Hkv)
                    keys = [s for s in range(T) if s <= t and (c["att"] != "swa" or s > t - c["window"])]
                    sc = [float(q[t][j] @ k[s][g]) / math.sqrt(Dq) for s in keys]
                    mx = max(sc)
                    e = [math.exp(x - mx) for x in sc]
                    z = sum(e)
                    o[j * Dv:(j + 1) * Dv] = sum(e[i] / z * v[s][g] for i, s in enumerate(keys))
                att = W[p + "self_attn.o_proj.weight"] @ o
                r1 = W[p + "input_residual"] if c["residual_scale"] else 1.0
                x = r1 * h[t] + att
                m = rms(x, W[p + "post_attention_layernorm.weight"])
                gt = W[p + "mlp.gate_proj.weight"] @ m
                up = W[p + "mlp.up_proj.weight"] @ m
                act = np.array([gv / (1.0 + math.exp(-gv)) for gv in gt]) * up
                r2 = W[p + "post_attention_residual"] if c["residual_scale"] else 1.0
                new_h.append(r2 * x + W[p + "mlp.down_proj.weight"] @ act)
            h = new_h
        Wout = W["model.embed_tokens.weight"] if c["tie"] else W["lm_head.weight"]
        for t in range(T):
            out[b, t] = Wout @ rms(h[t], W["model.norm.weight"])
    return out


def naive_loss(logits, targets):
    tot, n = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if targets[b, t] >= 0:
                row = logits[b, t]
                mx = row.max()
                tot += mx + math.log(np.exp(row - mx).sum()) - row[targets[b, t]]
                n += 1
    return tot / n


# ---- writing a case and running the oracle --------------------------------------------------------

def write_case(d, model, c, weights, inputs, targets, ours_model=None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model": model, "train": {"seed": 1}}, f)
    safetensors_np.write(os.path.join(d, "model.safetensors"), weights)
    safetensors_np.write(os.path.join(d, "batch.safetensors"), {"inputs": inputs, "targets": targets})
    oc = orc.resolve_model_config(ours_model or model)
    logits, loss, grads = orc.run_model(weights, oc, inputs, targets, torch.float32)
    ours = {"logits": logits.numpy(), "loss": loss.numpy()}
    for n in orc.param_shapes(c):
        ours["grad." + n] = grads[n].numpy()
    safetensors_np.write(os.path.join(d, "ours.safetensors"), ours)
    return ours


def oracle(d, *extra):
    r = subprocess.run([PY, os.path.join(HERE, "torch_oracle.py"), d, *extra], capture_output=True, text=True)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    return r.returncode, lines, r.stderr


def main():
    cases = [
        ("mha_untied", {"vocab_size": 11, "d_model": 8, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "head_dim": 4,
                        "ffn_dim": 12, "tie_embeddings": False, "rope_theta": 10000.0, "qk_norm": False,
                        "residual_scale": False, "norm_eps": 1e-6, "init_std": 0.02,
                        "attention": {"type": "mha", "window": 0}}),
        ("swa_gqa_doge_tied", {"vocab_size": 13, "d_model": 12, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                               "head_dim": 6, "ffn_dim": 10, "tie_embeddings": True, "rope_theta": 100.0,
                               "qk_norm": True, "residual_scale": True, "norm_eps": 1e-5,
                               "attention": {"type": "swa", "window": 3}}),
        ("mqa_defaults", {"vocab_size": 9, "d_model": 16, "n_layers": 1, "n_heads": 4, "n_kv_heads": 1,
                          "head_dim": 0, "ffn_dim": 0, "attention": {"type": "mha"}}),
        ("mla", {"vocab_size": 11, "d_model": 12, "n_layers": 2, "n_heads": 3, "n_kv_heads": 3, "head_dim": 4,
                 "ffn_dim": 10, "rope_theta": 100.0, "attention": {"type": "mla", "kv_rank": 5, "rope_dim": 4,
                                                                 "nope_dim": 6, "v_dim": 3}}),
        ("mla_q_rank", {"vocab_size": 11, "d_model": 12, "n_layers": 1, "n_heads": 2, "n_kv_heads": 0,
                        "head_dim": 4, "ffn_dim": 10, "residual_scale": True, "tie_embeddings": True,
                        "attention": {"type": "mla", "kv_rank": 4, "q_rank": 5, "rope_dim": 2}}),
    ]
    root = tempfile.mkdtemp(prefix="oracle_selftest_")
    for i, (tag, model) in enumerate(cases):
        c, w, inp, tgt = random_case(100 + i, model)
        # 1. vectorised oracle == literal definition
        logits, loss, _ = orc.run_model(w, c, inp, tgt, torch.float64)
        ref = naive_logits(c, w, inp)
        check(orc.rel_error(logits.numpy(), ref) < 1e-12, f"{tag}: oracle logits equal the loop transcription "
              f"(rel {orc.rel_error(logits.numpy(), ref):.2e})")
        check(abs(float(loss[0]) - naive_loss(ref, tgt)) < 1e-12, f"{tag}: oracle loss equals the loop transcription")

        # 2. a correct float32 "ours" passes
        d = os.path.join(root, tag)
        ours = write_case(d, model, c, w, inp, tgt)
        rc, lines, err = oracle(d)
        n_grads = len(orc.param_shapes(c))
        check(rc == 0 and lines[-1].get("ok") is True and len(lines) == 3 + n_grads,
              f"{tag}: float32 ours passes (rc {rc}, max_rel {lines[-1].get('max_rel') if lines else None}) {err[-300:]}")

        # 3. wrong "ours" fail
        gname = "grad." + list(orc.param_shapes(c))[1]
        bad = dict(ours)
        g = bad[gname].copy()
        g.flat[0] += 1e-3 * np.linalg.norm(g)
        bad[gname] = g
        safetensors_np.write(os.path.join(d, "ours.safetensors"), bad)
        rc, lines, _ = oracle(d)
        flagged = [x["name"] for x in lines if x.get("ok") is False and "name" in x]
        check(rc == 1 and flagged == [gname], f"{tag}: one perturbed gradient fails (rc {rc}, flagged {flagged})")
        rc, _, _ = oracle(d, "--tol", "1e-2")
        check(rc == 0, f"{tag}: the same perturbation passes under --tol 1e-2 (rc {rc})")

        bad = dict(ours)
        del bad[gname]
        safetensors_np.write(os.path.join(d, "ours.safetensors"), bad)
        rc, lines, _ = oracle(d)
        check(rc == 1, f"{tag}: a missing gradient fails (rc {rc})")

        bad = dict(ours)
        bad["grad.not_a_param"] = np.zeros(3, np.float32)
        safetensors_np.write(os.path.join(d, "ours.safetensors"), bad)
        rc, lines, _ = oracle(d)
        check(rc == 1, f"{tag}: an extra tensor fails (rc {rc})")

        bad = dict(ours)
        bad["logits"] = bad["logits"][:, :, :-1].copy()
        safetensors_np.write(os.path.join(d, "ours.safetensors"), bad)
        rc, lines, _ = oracle(d)
        check(rc == 1, f"{tag}: logits of the wrong shape fail (rc {rc})")

    # The SWA off-by-one: ours computed with window w+1 must be caught.
    tag, model = cases[1]
    c, w, inp, tgt = random_case(101, model)
    d = os.path.join(root, "swa_off_by_one")
    wider = json.loads(json.dumps(model))
    wider["attention"]["window"] += 1
    write_case(d, model, c, w, inp, tgt, ours_model=wider)
    rc, lines, _ = oracle(d)
    check(rc == 1 and any(x.get("name") == "logits" and x["ok"] is False for x in lines),
          f"swa: ours with window w+1 fails on logits (rc {rc})")

    # Bad input: exit 2.
    d = os.path.join(root, "bad_input")
    tag, model = cases[0]
    c, w, inp, tgt = random_case(100, model)
    write_case(d, model, c, w, inp, tgt)
    dma = json.loads(json.dumps(model))
    dma["attention"] = {"type": "dma", "window": 4}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model": dma}, f)
    rc, lines, _ = oracle(d)
    check(rc == 2, f"unsupported attention type is bad input (rc {rc})")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model": model}, f)
    w2 = dict(w)
    del w2["model.norm.weight"]
    safetensors_np.write(os.path.join(d, "model.safetensors"), w2)
    rc, lines, _ = oracle(d)
    check(rc == 2 and "model.norm.weight" in lines[-1].get("error", ""), f"a missing weight is bad input (rc {rc})")
    os.remove(os.path.join(d, "model.safetensors"))
    rc, _, _ = oracle(d)
    check(rc == 2, f"a missing file is bad input (rc {rc})")
    rc, _, _ = oracle(os.path.join(root, "no_such_dir"))
    check(rc == 2, f"a missing folder is bad input (rc {rc})")

    if failures:
        print(f"cases kept in {root} for inspection")
    else:
        shutil.rmtree(root)
    print(json.dumps({"selftest": True, "ok": not failures, "failed": failures}))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
