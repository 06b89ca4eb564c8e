#!/usr/bin/python3
"""MQAR (multi-query associative recall, Zoology) grid: answer accuracy by model width and sequence
length for each attention variant, the DMA paper's recall comparison (issue 20).

Every cell is configs/mqar/<variant>.json (2 layers, head_dim 32, n_heads = width / 32, no GQA) with
the width, the sequence length, the vocabulary and the data set per cell; only model.attention
differs between variants. Data: `dmatrain data mqar` (one data set per vocab/pairs/length, shared
by the variants and seeds), the loss on the answers only; accuracy: `dmatrain eval RUN --json` on
the test set (exact match per query).

    /usr/bin/python3 scripts/mqar.py plan   [--grid paper|cpu-smoke] [selection]   # cells and commands
    /usr/bin/python3 scripts/mqar.py run    [--grid ...] [selection] [--jobs N] [--device cpu|cuda|auto]
    /usr/bin/python3 scripts/mqar.py gather [--grid ...]    # runs -> docs/results/mqar/<grid>.csv
    /usr/bin/python3 scripts/mqar.py report [--grid ...]    # CSV -> <grid>.png and a markdown table (stdout)

Test sets are whole batches of train.batch_size (eval averages full batches only), 3072 and 512
examples. selection: --widths 64,128 --lengths 1024,2048 --variants mha,swa,dma,mla,nsa --seeds 1,2 (default: the
grid's). `run` generates missing data, skips finished cells (eval.json present), resumes unfinished
ones (--resume) and evaluates each finished run. Runs live in --runs (default runs/mqar/<grid>,
git-ignored), data in --data (default build/data/mqar). Grids:

  paper      the paper's grid: widths 32-256, lengths 1K-8K, min(512, T/4) pairs (512 where they fit:
             a sequence holds the 2P context tokens and P queries with their answers, 4P <= T),
             vocab 8192, SWA window / DMA kept keys 512, MLA kv_rank width/4, NSA at its paper's blocks
             with window 512; 2 seeds; GPU.
  cpu-smoke  one cell per variant at width 64, T 64, 4 pairs, vocab 64, window 16 (a quarter of T,
             so that SWA and DMA do select), 600 steps of 64 sequences: proves the pipeline on 2 CPU
             cores (about 8 minutes a run). Not the paper's grid.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["mha", "swa", "dma", "mla", "nsa"]

GRIDS = {
    "paper": dict(widths=[32, 64, 128, 256], lengths=[1024, 2048, 4096, 8192], seeds=[1, 2], vocab=8192,
                  max_pairs=512, window=512, steps=4000, batch=64, lr=1e-3, train_examples=100000,
                  test_examples=3072, device="auto", threads=0),
    "cpu-smoke": dict(widths=[64], lengths=[64], seeds=[1], vocab=64, max_pairs=4, window=16, steps=600,
                      batch=64, lr=1e-2, train_examples=20000, test_examples=512, device="cpu", threads=2),
}
DATA_SEED = 1234  # the data of a cell does not depend on the model seed


def pairs_for(g, T):
    return min(g["max_pairs"], T // 4)


def attention(variant, g, width):
    if variant == "mha":
        return {"type": "mha"}
    if variant == "swa":
        return {"type": "swa", "window": g["window"]}
    if variant == "dma":
        return {"type": "dma", "window": g["window"]}
    if variant == "mla":
        return {"type": "mla", "kv_rank": max(1, width // 4), "rope_dim": 16, "nope_dim": 16, "v_dim": 32}
    if variant == "nsa":
        # the NSA paper's blocks with the grid's window; where a sequence is shorter than 16 selection
        # blocks (the cpu-smoke grid), blocks scaled by T/1024 so that the selection still selects
        f = min(1.0, g["window"] / 512.0)
        stride = max(2, int(16 * f))
        return {"type": "nsa", "cmp_block": 2 * stride, "cmp_stride": stride, "sel_block": 4 * stride,
                "sel_count": 16 if f == 1.0 else 3, "window": g["window"]}
    sys.exit("mqar: unknown variant %r (have %s)" % (variant, ", ".join(VARIANTS)))


def data_dir(args, g, T):
    return os.path.join(args.data, "v%d-p%d-t%d" % (g["vocab"], pairs_for(g, T), T))


def data_command(args, g, T):
    return [args.dmatrain, "data", "mqar", "--out", data_dir(args, g, T), "--vocab", str(g["vocab"]), "--pairs",
            str(pairs_for(g, T)), "--seq-len", str(T), "--train-examples", str(g["train_examples"]),
            "--test-examples", str(g["test_examples"]), "--seed", str(DATA_SEED)]


def cells(args, g):
    for T in args.lengths:
        for width in args.widths:
            for variant in args.variants:
                for seed in args.seeds:
                    yield dict(T=T, width=width, variant=variant, seed=seed,
                               name="d%d-t%d-%s-s%d" % (width, T, variant, seed))


def train_command(args, g, c):
    d = data_dir(args, g, c["T"])
    sets = {
        "model.vocab_size": g["vocab"], "model.d_model": c["width"], "model.n_heads": max(1, c["width"] // 32),
        "model.n_kv_heads": max(1, c["width"] // 32), "model.attention": attention(c["variant"], g, c["width"]),
        "train.seq_len": c["T"], "train.steps": g["steps"], "train.batch_size": g["batch"], "train.lr": g["lr"],
        "train.seed": c["seed"], "train.eval_batches": 1, "data.train": d + "/train", "data.val": d + "/test",
        "run.device": args.device or g["device"], "run.threads": g["threads"], "run.name": c["name"],
    }
    cmd = [args.dmatrain, "train", os.path.join("configs", "mqar", c["variant"] + ".json"),
           "--out", os.path.join(args.runs, c["name"])]
    for k, v in sets.items():
        cmd += ["--set", "%s=%s" % (k, v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))]
    return cmd


def shell(cmd):
    return " ".join(a if all(ch.isalnum() or ch in "-_./=,:" for ch in a) else "'" + a + "'" for a in cmd)


def cmd_plan(args, g):
    for T in args.lengths:
        print(shell(data_command(args, g, T)))
    for c in cells(args, g):
        print(shell(train_command(args, g, c)))
        print(shell([args.dmatrain, "eval", os.path.join(args.runs, c["name"]), "--json"]))


def run_cell(args, g, c):
    run = os.path.join(args.runs, c["name"])
    ev = os.path.join(run, "eval.json")
    if os.path.exists(ev):
        return "%s: done" % c["name"]
    cmd = train_command(args, g, c)
    if os.path.exists(os.path.join(run, "checkpoints")):
        cmd.append("--resume")
    t0 = time.time()
    with open(run + ".log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=log, cwd=ROOT)
    if rc != 0:
        return "%s: train failed (rc %d, see %s.log)" % (c["name"], rc, run)
    out = subprocess.run([args.dmatrain, "eval", run, "--json"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return "%s: eval failed: %s" % (c["name"], out.stderr.strip().splitlines()[-1:])
    result = json.loads(out.stdout)
    result["wall_s"] = time.time() - t0
    with open(ev, "w") as f:
        json.dump(result, f)
    return "%s: accuracy %.4f (%.0f s)" % (c["name"], result["accuracy"], result["wall_s"])


def cmd_run(args, g):
    os.makedirs(args.runs, exist_ok=True)
    for T in args.lengths:
        if not os.path.exists(os.path.join(data_dir(args, g, T), "manifest.json")):
            print(shell(data_command(args, g, T)), flush=True)
            subprocess.check_call(data_command(args, g, T), cwd=ROOT)
    todo = list(cells(args, g))
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        for msg in ex.map(lambda c: run_cell(args, g, c), todo):
            print(msg, flush=True)


def metrics_rows(run):
    rows = []
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def cmd_gather(args, g):
    out = []
    for c in cells(args, g):
        run = os.path.join(args.runs, c["name"])
        ev = os.path.join(run, "eval.json")
        if not os.path.exists(ev):
            print("mqar: %s not finished, left out" % c["name"], file=sys.stderr)
            continue
        with open(ev) as f:
            e = json.load(f)
        rows = metrics_rows(run)
        train = [r for r in rows if "loss" in r]
        tps = [r["tokens_per_s"] for r in train[1:]] or [train[-1]["tokens_per_s"]]
        out.append(dict(grid=args.grid, variant=c["variant"], width=c["width"], seq_len=c["T"],
                        pairs=pairs_for(g, c["T"]), vocab=g["vocab"], window=g["window"], seed=c["seed"],
                        steps=train[-1]["step"], final_train_loss="%.4f" % train[-1]["loss"],
                        test_loss="%.4f" % e["loss"], accuracy="%.4f" % e["accuracy"], answers=e["tokens"],
                        train_s="%.0f" % train[-1]["time"], tokens_per_s="%.0f" % (sum(tps) / len(tps))))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.grid + ".csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0].keys()) if out else ["grid"])
        w.writeheader()
        w.writerows(out)
    print("mqar: %d runs -> %s" % (len(out), path))


def cmd_report(args, g):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(args.out, args.grid + ".csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit("mqar: %s holds no runs" % path)
    lengths = sorted({int(r["seq_len"]) for r in rows})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    acc = {}
    for r in rows:
        acc.setdefault((r["variant"], int(r["width"]), int(r["seq_len"])), []).append(float(r["accuracy"]))
    # the paper's figure: one panel per sequence length, accuracy against model width, a line per variant
    fig, axes = plt.subplots(1, len(lengths), figsize=(max(6.0, 4.2 * len(lengths)), 4.0), squeeze=False)
    for ax, T in zip(axes[0], lengths):
        for v in variants:
            ws = sorted({w for (vv, w, t) in acc if vv == v and t == T})
            means = [sum(acc[(v, w, T)]) / len(acc[(v, w, T)]) for w in ws]
            lo = [m - min(acc[(v, w, T)]) for m, w in zip(means, ws)]
            hi = [max(acc[(v, w, T)]) - m for m, w in zip(means, ws)]
            ax.errorbar(ws, means, yerr=[lo, hi], marker="o", capsize=3, label=v)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model width")
        ax.set_title("T = %d, %d pairs" % (T, pairs_for(g, T)))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (test set)")
    axes[0][-1].legend(fontsize=8)
    title = "MQAR accuracy by width and length, %s grid%s" % (
        args.grid, "\n(a CPU smoke test of the pipeline, not the paper's grid)" if args.grid == "cpu-smoke" else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = os.path.join(args.out, args.grid + ".png")
    fig.savefig(png, dpi=120)
    print("mqar: %s" % png)
    # the table: mean accuracy (and each seed) per cell
    widths = sorted({int(r["width"]) for r in rows})
    print("| variant | " + " | ".join("d%d T%d" % (w, T) for T in lengths for w in widths) + " |")
    print("|---|" + "---|" * (len(lengths) * len(widths)))
    for v in variants:
        cellsv = []
        for T in lengths:
            for w in widths:
                a = acc.get((v, w, T))
                cellsv.append("–" if not a else "%.3f (%s)" % (sum(a) / len(a), ", ".join("%.3f" % x for x in a))
                              if len(a) > 1 else "%.3f" % a[0])
        print("| %s | %s |" % (v, " | ".join(cellsv)))


def ints(s):
    return [int(x) for x in s.split(",") if x]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["plan", "run", "gather", "report"])
    p.add_argument("--grid", default="cpu-smoke", choices=sorted(GRIDS))
    p.add_argument("--widths", type=ints)
    p.add_argument("--lengths", type=ints)
    p.add_argument("--variants", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--seeds", type=ints)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--device", help="run.device for every run (default: the grid's)")
    p.add_argument("--dmatrain", default=os.path.join("build", "dmatrain"))
    p.add_argument("--runs", help="run directories (default runs/mqar/<grid>)")
    p.add_argument("--data", default=os.path.join("build", "data", "mqar"))
    p.add_argument("--out", default=os.path.join("docs", "results", "mqar"))
    args = p.parse_args()
    g = GRIDS[args.grid]
    args.widths = args.widths or g["widths"]
    args.lengths = args.lengths or g["lengths"]
    args.variants = args.variants or VARIANTS
    args.seeds = args.seeds or g["seeds"]
    args.runs = args.runs or os.path.join("runs", "mqar", args.grid)
    os.chdir(ROOT)  # paths in commands and results are relative to the repository
    for T in args.lengths:
        if pairs_for(g, T) < 1:
            sys.exit("mqar: T = %d holds no pair (4P <= T)" % T)
    for v in args.variants:
        attention(v, g, 64)  # unknown variants exit here
    {"plan": cmd_plan, "run": cmd_run, "gather": cmd_gather, "report": cmd_report}[args.command](args, g)


if __name__ == "__main__":
    main()
