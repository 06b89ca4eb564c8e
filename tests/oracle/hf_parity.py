#!/usr/bin/python3
"""Our models against Hugging Face transformers, through `dmatrain export --format hf`.

    python3 tests/oracle/hf_parity.py --dmatrain build/dmatrain [--work DIR] [--arch mha,swa,dma,mla]
                                      [--device cpu|cuda] [--tol 5e-5]

For each attention type: train a small model on the CPU backend for a few steps on the bundled
English text (tokenized with data/tokenizer/dmat-mix-32k.json, the corpus tokenizer of our runs),
export it (fp32), load the folder with AutoModelForCausalLM.from_pretrained (no custom code,
attn_implementation "eager", float32) and compare its logits on validation sequences with ours
(`dmatrain eval RUN --logits`, our CPU backend in fp32). Also: the exported tokenizer loads with
AutoTokenizer and encodes sample text (special-token text included) to the ids `dmatrain tokenizer
encode --special` gives, adding no BOS or EOS.

Peers: mha LlamaForCausalLM, swa MistralForCausalLM (tied embeddings here, to cover the tied
export), dma DogeForCausalLM (QK-norm, residual scales), mla DeepseekV3ForCausalLM (dense MLPs,
query compression).

Tolerance: rel = ||ours - ref|| / ||ref|| over the compared logits < --tol (5e-5). Both sides are
fp32 evaluations of the same function. Our fp32 model is within 1e-5 relative of an fp64 reference
at the oracle's shapes (tests/test_oracle.cpp); transformers' eager fp32 is another such evaluation,
with its own summation orders. fp32 rounding grows about with the square root of the reduction
lengths, which here are up to ~4x the oracle's (d 128, ffn 384, T 64 against d 32, ffn 48, T 16):
2 x 1e-5 x sqrt(4) = 4e-5, rounded up to 5e-5. On --device cuda, TF32 is switched off, so matmuls
stay fp32.

DMA and ties. Query i keeps the keys whose bias reaches the w-th largest of keys 0..i; we keep
every key tied at that threshold, transformers' Doge keeps exactly w by torch.topk (ties broken
arbitrarily). In layer 0 a key's bias depends on its token alone, so repeated tokens tie often.
A row whose threshold is tied can differ, and from the next layer on, everything after it can too
(its keys and values feed every later query, its bias every later threshold). So for dma the rule
is: in each sequence, compare the positions before the first tied row of any layer and KV head,
where tied means the (w+1)-th largest bias is within 1e-5 relative of the w-th (exact ties and
anything fp32 rounding could reorder), the biases taken from transformers' own forward (hooks on
dt_proj). At least --min-selected rows with active selection (i >= w) must be compared, else the
check is inconclusive (exit 1). Excluded rows are counted and their largest difference reported.

Prints one JSON line per architecture and a summary line. Exit 0: all within tolerance; 1: a
mismatch (or too few DMA rows); 2: a dmatrain command or the inputs failed; 3: skipped (torch or
transformers not importable).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SKIP = 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer", "dmat-mix-32k.json")
CORPUS = os.path.join(ROOT, "data", "english")

T = 64            # sequence length
DMA_WINDOW = 8    # w < T: selection active from row 8 on; small w keeps layer-0 ties rarer (see above)
TRAIN = ["--set", "model.vocab_size=32768", "--set", f"train.seq_len={T}", "--set", "train.batch_size=4",
         "--set", "train.steps=30", "--set", "train.eval_interval=0", "--set", "train.eval_batches=1",
         "--set", "train.checkpoint_interval=0", "--set", "run.device=cpu", "--set", "run.log_interval=10"]
ARCHS = {
    "mha": ("LlamaForCausalLM", []),
    "swa": ("MistralForCausalLM", ["--set", 'model.attention={"type":"swa","window":16}',
                                   "--set", "model.tie_embeddings=true"]),
    "dma": ("DogeForCausalLM", ["--set", "model.qk_norm=true", "--set", "model.residual_scale=true", "--set",
                                'model.attention={"type":"dma","window":%d,"a_init":-0.5}' % DMA_WINDOW]),
    "mla": ("DeepseekV3ForCausalLM", ["--set", 'model.attention={"type":"mla","kv_rank":32,"rope_dim":16,'
                                               '"q_rank":48}']),
}
SAMPLE = ("The Devil's Dictionary, 1911: ABSENT, adj. Peculiarly exposed to the tooth of detraction.\n\n"
          "  Tabs\tand  spaces, digits 1234567 and 3.14159, 'quotes', \"double\", café naïve 日本語 🙂\r\n"
          "<|endoftext|> ends a document.")


class Failed(Exception):
    pass


def sh(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise Failed(f"{' '.join(cmd)} exited {r.returncode}: {(r.stdout + r.stderr)[-2000:]}")
    return r.stdout


def ties_first_row(model, inputs, w, torch):
    """Per sequence, the first row of any layer / KV head whose top-w threshold is tied (T if none)."""
    captured = []
    hooks = [layer.self_attn.dt_proj.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=inputs)
    for h in hooks:
        h.remove()
    B, Tn = inputs.shape
    first = [Tn] * B
    for layer, dt in zip(model.model.layers, captured):
        # as DogeAttention: dt_states = exp(A * softplus(dt)), one bias per key and KV head
        bias = torch.exp(layer.self_attn.A.detach() * torch.nn.functional.softplus(dt)).cpu()  # [B, T, Hkv]
        for b in range(B):
            for h in range(bias.shape[2]):
                for i in range(w, Tn):
                    if i >= first[b]:
                        break
                    s = torch.sort(bias[b, : i + 1, h], descending=True).values
                    t, nxt = float(s[w - 1]), float(s[w])
                    if t - nxt <= 1e-5 * abs(t):
                        first[b] = i
                        break
    return first


def compare_arch(args, arch, np, torch, AutoModelForCausalLM, safetensors_np):
    expected, sets = ARCHS[arch]
    run_dir = os.path.join(args.work, arch)
    hf_dir = os.path.join(args.work, arch + "_hf")
    logits_path = os.path.join(args.work, arch + "_logits.safetensors")
    data = ["--set", f"data.train={args.work}/data/train", "--set", f"data.val={args.work}/data/val"]
    sh([args.dmatrain, "train", os.path.join(ROOT, "configs", "tiny.json"), "--out", run_dir] + TRAIN + data + sets)
    out = sh([args.dmatrain, "export", run_dir, "--format", "hf", "--out", hf_dir])
    if expected not in out:
        raise Failed(f"export says {out.strip()!r}, expected {expected}")
    sh([args.dmatrain, "eval", run_dir, "--batches", "2", "--logits", logits_path])
    ours, _ = safetensors_np.read(logits_path)
    inputs = torch.tensor(np.asarray(ours["inputs"], dtype=np.int64), device=args.device)
    targets = np.asarray(ours["targets"], dtype=np.int64)
    got = np.asarray(ours["logits"], dtype=np.float64)

    try:
        model, info = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32,
                                                           output_loading_info=True)
    except TypeError:  # transformers 4.x: torch_dtype
        model, info = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                           torch_dtype=torch.float32, output_loading_info=True)
    if type(model).__name__ != expected:
        raise Failed(f"transformers built {type(model).__name__}, expected {expected}")
    # buffers are not ours to supply, nor is a tied head
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [n for n in info.get("missing_keys", []) if not n.endswith(("inv_freq", "e_score_correction_bias"))
               and not (tied and n == "lm_head.weight")]
    bad = {k: v for k, v in (("missing", missing), ("unexpected", list(info.get("unexpected_keys", []))),
                             ("mismatched", list(info.get("mismatched_keys", [])))) if v}
    if bad:
        raise Failed(f"the weights do not load as {expected}: {bad}")
    model = model.to(args.device).eval()
    with torch.no_grad():
        ref = model(input_ids=inputs).logits.float().cpu().numpy().astype(np.float64)
    if ref.shape != got.shape:
        raise Failed(f"logits {list(got.shape)}, transformers {list(ref.shape)}")

    B, Tn, V = ref.shape
    mask = np.ones((B, Tn), dtype=bool)
    line = {"arch": arch, "peer": expected, "sequences": B, "positions": B * Tn}
    if arch == "dma":
        first = ties_first_row(model, inputs, DMA_WINDOW, torch)
        for b in range(B):
            mask[b, first[b]:] = False
        selected = int(sum(max(0, f - DMA_WINDOW) for f in first))
        line.update({"first_tied_row": first, "selection_rows_compared": selected,
                     "rows_excluded_for_ties": int((~mask).sum())})
        if (~mask).any():
            line["max_abs_excluded"] = float(np.abs(got[~mask] - ref[~mask]).max())
    a, r = got[mask], ref[mask]
    rel = float(np.linalg.norm((a - r).ravel()) / max(np.linalg.norm(r.ravel()), 1e-30))

    def ce(lg):
        lg = lg - lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        return float(-np.take_along_axis(lp, targets[..., None], -1)[..., 0][mask].mean())

    line.update({"compared": int(mask.sum()), "rel": rel, "max_abs": float(np.abs(a - r).max()),
                 "loss_ours": ce(got), "loss_hf": ce(ref), "tol": args.tol})
    line["ok"] = rel < args.tol
    if arch == "dma" and line["selection_rows_compared"] < args.min_selected:
        line["ok"] = False
        line["why"] = (f"inconclusive: only {line['selection_rows_compared']} rows with active selection before a "
                       f"tie (need {args.min_selected})")
    return line


def check_tokenizer(args, AutoTokenizer):
    hf_dir = os.path.join(args.work, "mha_hf")
    sample = os.path.join(args.work, "sample.txt")
    # newline="": the bytes as written (\r\n included), here and when read back below
    with open(sample, "w", encoding="utf-8", newline="") as f:
        f.write(SAMPLE)
        with open(os.path.join(CORPUS, "devils_dictionary.txt"), encoding="utf-8") as g:
            f.write(g.read(4000))
    # --special: added-token text becomes its id, as transformers' tokenizers do by default; and
    # tok(text) must add nothing around the text (no BOS or EOS: dmatrain never adds them)
    ours = [int(x) for x in sh([args.dmatrain, "tokenizer", "encode", "--special", "--tokenizer",
                                hf_dir + "/tokenizer.json", "--file", sample]).split()]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    with open(sample, encoding="utf-8", newline="") as f:
        text = f.read()
    theirs = list(tok(text)["input_ids"])
    line = {"check": "tokenizer", "class": type(tok).__name__, "tokens": len(ours), "same_ids": ours == theirs,
            "eos_token_id": tok.eos_token_id, "eos_is_32767": tok.eos_token_id == 32767}
    if ours != theirs:
        k = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        line["first_difference"] = {"at": k, "ours": ours[k:k + 8], "hf": theirs[k:k + 8]}
    line["ok"] = line["same_ids"] and line["eos_is_32767"]
    return line


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dmatrain", required=True)
    ap.add_argument("--work", default="")
    ap.add_argument("--arch", default="mha,swa,dma,mla")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=5e-5)
    ap.add_argument("--min-selected", type=int, default=64)
    args = ap.parse_args(argv)
    try:
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import transformers
    except ImportError as e:
        print(json.dumps({"skipped": True, "why": f"torch or transformers is not importable ({e})"}), flush=True)
        return SKIP
    import safetensors_np

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.dmatrain = os.path.abspath(args.dmatrain)
    own_work = not args.work
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="hf_parity_"))
    if os.path.exists(args.work) and not own_work:
        shutil.rmtree(args.work)
    os.makedirs(args.work, exist_ok=True)
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "device": args.device,
                      "work": args.work}), flush=True)
    results = []
    try:
        sh([args.dmatrain, "data", "prepare", "--tokenizer", TOKENIZER, "--val-fraction", "0.03", "--out",
            os.path.join(args.work, "data"), CORPUS])
        archs = [a for a in args.arch.split(",") if a]
        for arch in archs:
            if arch not in ARCHS:
                raise Failed(f"unknown --arch {arch} (choose from {', '.join(ARCHS)})")
        for arch in archs:
            line = compare_arch(args, arch, np, torch, AutoModelForCausalLM, safetensors_np)
            print(json.dumps(line), flush=True)
            results.append(line["ok"])
        if "mha" in archs:
            line = check_tokenizer(args, AutoTokenizer)
            print(json.dumps(line), flush=True)
            results.append(line["ok"])
    except Failed as e:
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        return 2
    ok = all(results)
    print(json.dumps({"ok": ok, "checks": len(results), "passed": sum(results)}), flush=True)
    if own_work and ok:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
