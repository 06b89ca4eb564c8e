#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/<target>/ (docs/fuzzing.md).

    python3 tests/fuzz/make_corpus.py --dmatrain build/dmatrain

Seeds are small valid inputs and edge cases of each reader's format; a harness whose input has
several parts (config, tokenizer, checkpoint) takes them NUL-separated (see its fuzz_<target>.cpp).
The checkpoint seeds come from a real checkpoint that `dmatrain train` writes for the harness's
config. Inputs that once crashed a reader are added by hand as crash-<what> and are kept.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def nul(*parts):
    return b"\0".join(p.encode() if isinstance(p, str) else p for p in parts)


def compact(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ---- token shards (src/data/shard.h) ------------------------------------------------------------
def shard(tokens, vocab, width=2, version=1, magic=b"DMATOKS\0", count=None):
    n = len(tokens) if count is None else count
    h = magic + struct.pack("<IIQI", version, width, n, vocab) + bytes(36)
    fmt = "<H" if width == 2 else "<I"
    return h + b"".join(struct.pack(fmt, t) for t in tokens)


def shards():
    put("shard", "u16", shard([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 256], 257))
    put("shard", "u32", shard([70000, 1, 99999, 5, 6, 7, 8], 100000, width=4))
    put("shard", "empty", shard([], 257))
    put("shard", "one_token", shard([3], 4))
    put("shard", "token_at_vocab", shard([0, 1, 2, 4], 4))
    put("shard", "truncated", shard([1, 2, 3], 257)[:-1])
    put("shard", "trailing", shard([1, 2, 3], 257) + b"\0")
    put("shard", "count_huge", shard([1, 2], 257, count=(1 << 63) + 1))
    put("shard", "bad_magic", shard([1, 2], 257, magic=b"DMATOKX\0"))
    put("shard", "version2", shard([1, 2], 257, version=2))
    put("shard", "width3", shard([1, 2], 257, width=3))
    put("shard", "vocab0", shard([], 0))
    put("shard", "header_only_short", shard([], 257)[:40])


# ---- safetensors (src/io/safetensors.h) -----------------------------------------------------------
def safetensors(header, data, pad=True):
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    w = struct.pack("<6f", *range(6))
    b = struct.pack("<3f", 1, 2, 3)
    put("safetensors", "two_f32", safetensors(
        {"__metadata__": {"format": "dmatrain"}, "a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}, w + b))
    put("safetensors", "dtypes", safetensors(
        {"bf": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}, "d": {"dtype": "F64", "shape": [1], "data_offsets": [4, 12]},
         "i": {"dtype": "I32", "shape": [1, 1, 1, 1], "data_offsets": [12, 16]}, "u16": {"dtype": "U16", "shape": [1], "data_offsets": [16, 18]},
         "u32": {"dtype": "U32", "shape": [1], "data_offsets": [18, 22]}}, bytes(range(22))))
    put("safetensors", "scalar_and_empty", safetensors(
        {"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [4, 4]}},
        struct.pack("<f", 7)))
    put("safetensors", "header_only", safetensors({}, b""))
    put("safetensors", "overlap", safetensors(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)))
    put("safetensors", "gap", safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)))
    put("safetensors", "shape_mismatch", safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)))
    put("safetensors", "huge_shape", safetensors(
        {"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 0]}}, b""))
    put("safetensors", "five_dims", safetensors({"a": {"dtype": "U16", "shape": [1, 1, 1, 1, 1], "data_offsets": [0, 2]}}, bytes(2)))
    put("safetensors", "bad_dtype", safetensors({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)))
    put("safetensors", "length_past_end", struct.pack("<Q", 1 << 40) + b"{}")
    put("safetensors", "short", b"\x02\0\0")
    put("safetensors", "not_object", safetensors([1, 2], b""))
    put("safetensors", "metadata_number", safetensors({"__metadata__": {"x": 1}}, b""))


# ---- JSONL and text documents (src/data/documents.h) -----------------------------------------------
def documents():
    put("documents", "jsonl", '{"text": "first document\\r\\nwith CRLF"}\n\n{"text": "caf\\u00e9 \\ud83d\\ude00", "id": 3}\n'
        '{"text": ""}\r\n{"text": "no newline at the end"}')
    put("documents", "jsonl_bad_line", '{"text": "ok"}\n{"text": 5}\n')
    put("documents", "jsonl_not_object", '["text"]\n')
    put("documents", "jsonl_truncated", '{"text": "abc\n')
    put("documents", "text_paragraphs", "Title\n\nparagraph one\nline two\n\n\n\nsecond document\r\n  \t\n\n third\rlone CR\n")
    put("documents", "only_blank", "\n\n  \n\t\n")
    put("documents", "binary", b"abc\0def\n")
    put("documents", "utf8_invalid", b"\xff\xfe text \xc3\x28\n\n\n\xe2\x82\n")


# ---- tokenizer.json (src/tokenizer/bpe.h) ----------------------------------------------------------
def tokenizers():
    src = os.path.join(ROOT, "tests/fixtures/tokenizer/ours/hand.json")
    with open(src, encoding="utf-8") as f:
        hand = json.load(f)
    put("tokenizer", "hand", compact(hand))
    put("tokenizer", "hand_text", nul(compact(hand), "The quick brown fox <|endoftext|> 12 345\n\n\u00e9\u0301"))

    t = json.loads(json.dumps(hand))
    t["normalizer"] = {"type": "NFC"}
    put("tokenizer", "nfc", nul(compact(t), "e\u0301 \u212b \uac00\u11a8 a\u0328\u0301"))

    t = json.loads(json.dumps(hand))
    t["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    t["model"]["ignore_merges"] = True
    put("tokenizer", "llama3_split", nul(compact(t), "I'M here: 1234567 apples\r\n\r\n  x"))

    t = json.loads(json.dumps(hand))
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    t["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in t["model"]["merges"]]
    t["added_tokens"].append({"id": 300, "content": "<pad>", "special": True})
    put("tokenizer", "digits_pairs_gap", nul(compact(t), "2025-12-05 <pad><|endoftext|>"))

    t = json.loads(json.dumps(hand))
    t["model"]["vocab"]["\u0120t"] = 1 << 27
    put("tokenizer", "id_far_beyond", compact(t))
    t = json.loads(json.dumps(hand))
    t["model"]["type"] = "WordPiece"
    put("tokenizer", "wordpiece", compact(t))
    t = json.loads(json.dumps(hand))
    t["added_tokens"] = []
    put("tokenizer", "no_eot", compact(t))
    put("tokenizer", "not_json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}")


# ---- configs (src/config) ------------------------------------------------------------------------------
def configs():
    with open(os.path.join(ROOT, "configs/tiny.json"), encoding="utf-8") as f:
        tiny = json.load(f)
    put("config", "tiny", json.dumps(tiny, indent=1))
    put("config", "tiny_sets", nul(json.dumps(tiny), "", "train.lr=3e-4", "run.name=123", "model.attention.type=swa",
                                   "model.attention.window=16"))
    base = {"model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4}, "train": {"seq_len": 64},
            "data": {"train": "t", "val": "v"}}
    put("config", "include_dma", nul(compact({"include": "base.json", "model": {"attention": {"type": "dma", "window": 8,
                                                                                                "local_window": 4}}}),
                                     compact(base)))
    put("config", "include_mla", nul(compact({"include": ["base.json"], "model": {"attention": {"type": "mla", "kv_rank": 16,
                                                                                                  "q_rank": 8, "rope_dim": 8}}}),
                                     compact(base), "train.zero=1", "run.device=cpu"))
    put("config", "include_cycle", nul(compact({"include": "base.json", "data": {"train": "a", "val": "b"}}),
                                       compact({"include": "config.json"})))
    put("config", "sizes_wrap", nul(compact(base), "", "model.vocab_size=144115188075855872", "train.seq_len=9223372036854775807"))
    put("config", "huge_number", nul(compact(base), "", "train.lr=1e400"))
    put("config", "wsd_spike", compact({"include": "base.json", "train": {"schedule": "wsd", "loss_spike_z": 3,
                                                                           "on_nonfinite": "skip", "grad_accum": 2}}))
    put("config", "set_bad", nul(compact(base), "", "=1", "a..b=2", "include=x.json", "model.d_model.x=1"))


# ---- checkpoint folders (src/train/checkpoint.h) --------------------------------------------------------
# The harness's config (fuzz_checkpoint.cpp, kConfig): a checkpoint of it, from `dmatrain train`.
CKPT_CONFIG = {
    "model": {"vocab_size": 32, "d_model": 8, "n_layers": 1, "n_heads": 2, "tie_embeddings": True},
    "train": {"steps": 4, "batch_size": 2, "seq_len": 8, "checkpoint_interval": 2},
    "data": {"train": "unused", "val": "unused"},
    "run": {"name": "fuzz"},
}


def checkpoints(dmatrain):
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "val"):
            os.makedirs(os.path.join(tmp, split))
            with open(os.path.join(tmp, split, "0.bin"), "wb") as f:
                f.write(shard([(7 * i) % 32 for i in range(200)], 32))
        cfg = json.loads(json.dumps(CKPT_CONFIG))
        cfg["data"] = {"train": os.path.join(tmp, "train"), "val": os.path.join(tmp, "val")}
        with open(os.path.join(tmp, "c.json"), "w") as f:
            json.dump(cfg, f)
        run = os.path.join(tmp, "run")
        subprocess.run([dmatrain, "train", os.path.join(tmp, "c.json"), "--out", run, "--set", "run.device=cpu"],
                       check=True, stdout=subprocess.DEVNULL)
        ck = os.path.join(run, "checkpoints", "step_00000002")
        read = lambda name: open(os.path.join(ck, name), "rb").read()
        state, config, model = read("state_rank0.json"), read("config.json"), read("model.safetensors")
    put("checkpoint", "valid", nul(state, config, model))
    st = json.loads(state)
    put("checkpoint", "valid_odd", nul(json.dumps(st) + (" " if len(json.dumps(st)) % 2 == 0 else ""), config, model))
    for name, change in [("negative_step", {"step": -5}), ("string_step", {"step": "2"}), ("other_step", {"step": 4}),
                         ("world_huge", {"world_size": (1 << 63) - 1}), ("elapsed_nan", {"elapsed_s": "nan"}),
                         ("skipped_many", {"skipped_steps": 3}), ("losses_bad", {"recent_losses": [1.0, None]})]:
        put("checkpoint", name, nul(json.dumps({**st, **change}), config, model))
    c = json.loads(config)
    c["model"]["d_model"] = 16
    put("checkpoint", "model_changed", nul(state, json.dumps(c), model))
    c = json.loads(config)
    c["train"]["seed"] = 7
    c["train"]["batch_size"] = 4
    put("checkpoint", "train_changed", nul(state, json.dumps(c), model))
    put("checkpoint", "weights_truncated", nul(state, config, model[:-4]))
    put("checkpoint", "no_weights", nul(state, config))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dmatrain", help="the dmatrain binary, for the checkpoint seeds (skipped without it)")
    a = ap.parse_args()
    shards()
    safetensors_seeds()
    documents()
    tokenizers()
    configs()
    if a.dmatrain:
        checkpoints(a.dmatrain)
    else:
        print("make_corpus: no --dmatrain: checkpoint seeds not written", file=sys.stderr)


if __name__ == "__main__":
    main()
