#!/usr/bin/python3
"""Our MLA model against Hugging Face transformers' DeepseekV3ForCausalLM loaded with our weights.

    python3 tests/oracle/hf_deepseek_v3.py DIR [--tol 0.02] [--device cuda|cpu]

DIR (written by tests/test_gpu_mla.cpp): config.json (a resolved dmatrain config with
model.attention.type "mla"), model.safetensors (our F32 weights, Hugging Face DeepSeek-V3 names),
batch.safetensors (`inputs` I32 [B,T]), ours.safetensors (`logits` F32 [B,T,V], our model's).

The model maps onto a DeepseekV3Config with dense MLPs in every layer (first_k_dense_replace =
n_layers, so no expert is ever built), num_key_value_heads = num_attention_heads, rope_interleave =
False (our rotate-half RoPE over the rotary dims), no rope scaling, no attention bias; the weights
load with strict=True, so a name or shape that differs fails. Configs transformers cannot express
(residual scales, QK-norm, a norm_eps other than the 1e-6 DeepseekV3 uses for kv_a_layernorm and
q_a_layernorm) are refused as bad input. The reference runs in float32.

Prints one JSON line {"rel", "max_abs", "tol", "ok"} with rel = ||ours - ref|| / ||ref|| over all logits.
Exit 0: within tol; 1: not; 2: bad input; 3: skipped (transformers, or its DeepseekV3, is missing).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import safetensors_np  # noqa: E402

SKIP = 3


class BadInput(Exception):
    pass


def hf_config_kwargs(model):
    """A resolved dmatrain `model` section -> DeepseekV3Config keyword arguments."""
    att = model.get("attention", {})
    if att.get("type") != "mla":
        raise BadInput(f"model.attention.type must be mla (got {att.get('type')!r})")
    for key in ("qk_norm", "residual_scale"):
        if model.get(key, False):
            raise BadInput(f"model.{key} has no DeepseekV3 counterpart")
    if abs(float(model.get("norm_eps", 1e-6)) - 1e-6) > 1e-12:
        raise BadInput("model.norm_eps must be 1e-6: DeepseekV3's kv_a_layernorm and q_a_layernorm use 1e-6")
    H = int(model["n_heads"])
    if int(model.get("n_kv_heads", H) or H) != H:
        raise BadInput("mla has n_kv_heads = n_heads")
    L = int(model["n_layers"])
    q_rank = int(att.get("q_rank", 0))
    return dict(
        vocab_size=int(model["vocab_size"]), hidden_size=int(model["d_model"]),
        intermediate_size=int(model["ffn_dim"]), moe_intermediate_size=int(model["ffn_dim"]),
        num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
        n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=L,  # every layer's MLP dense: no expert weights exist
        kv_lora_rank=int(att["kv_rank"]), q_lora_rank=q_rank if q_rank > 0 else None,
        qk_rope_head_dim=int(att["rope_dim"]), qk_nope_head_dim=int(att["nope_dim"]),
        v_head_dim=int(att["v_dim"]), hidden_act="silu", max_position_embeddings=1 << 16,
        rms_norm_eps=float(model.get("norm_eps", 1e-6)), rope_theta=float(model.get("rope_theta", 10000.0)),
        rope_scaling=None, rope_interleave=False, attention_bias=False, attention_dropout=0.0,
        tie_word_embeddings=bool(model.get("tie_embeddings", False)),
    )


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--tol", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        import torch
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError as e:
        print(json.dumps({"skipped": True, "why": f"transformers' DeepseekV3 is not importable ({e})"}), flush=True)
        return SKIP
    try:
        with open(os.path.join(args.dir, "config.json")) as f:
            kwargs = hf_config_kwargs(json.load(f)["model"])
        weights, _ = safetensors_np.read(os.path.join(args.dir, "model.safetensors"))
        batch, _ = safetensors_np.read(os.path.join(args.dir, "batch.safetensors"))
        ours, _ = safetensors_np.read(os.path.join(args.dir, "ours.safetensors"))
    except (OSError, KeyError, ValueError, BadInput) as e:
        print(json.dumps({"ok": False, "error": f"bad input: {e}"}), flush=True)
        return 2

    try:
        config = DeepseekV3Config(**kwargs)
    except TypeError:  # a transformers version without some of these keywords (rope_interleave: newer ones)
        kwargs.pop("rope_interleave")
        config = DeepseekV3Config(**kwargs)
    if getattr(config, "rope_interleave", False):
        print(json.dumps({"ok": False, "error": "this transformers interleaves the rotary dims"}), flush=True)
        return 2
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    state = {n: torch.tensor(np.asarray(w, dtype=np.float32)) for n, w in weights.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # buffers (rotary inv_freq, expert score biases) are not ours to supply
    missing = [n for n in missing if not n.endswith(("inv_freq", "e_score_correction_bias"))]
    if missing or unexpected:
        print(json.dumps({"ok": False, "error": f"weights do not match DeepseekV3: missing {missing}, "
                                                f"unexpected {unexpected}"}), flush=True)
        return 1
    model.to(args.device)
    inputs = torch.tensor(np.asarray(batch["inputs"], dtype=np.int64), device=args.device)
    with torch.no_grad():
        ref = model(input_ids=inputs).logits.float().cpu().numpy().astype(np.float64)
    got = np.asarray(ours["logits"], dtype=np.float64)
    if got.shape != ref.shape:
        print(json.dumps({"ok": False, "error": f"logits {list(got.shape)}, transformers {list(ref.shape)}"}))
        return 1
    rel = float(np.linalg.norm((got - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))
    line = {"rel": rel, "max_abs": float(np.abs(got - ref).max()), "tol": args.tol, "ok": rel < args.tol}
    print(json.dumps(line), flush=True)
    return 0 if line["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
