#!/usr/bin/python3
"""The DMA ablation study on the CPU (issue 17's investigation): why does DMA trail MHA?

Every arm is `configs/tiny.json` (byte-level, d128 L2 H4/2 head_dim 32, T = 128, 600 steps of
16 x 128 tokens, lr 3e-3 WSD) with only `model.attention` (or, for the Doge-block arms, also
model.qk_norm / model.residual_scale on both the DMA arm and its MHA reference) changed, trained on
the bundled English text, every seed of every arm reported. T = 128 with w = 32 keeps a quarter of
the keys at the last position, the ratio the paper's w = 1024 keeps at T = 4096; the `t256` arms
(T = 256, w = 128, the same tokens per step) keep half, as w = 1024 does at the ladder's T = 2048.

    /usr/bin/python3 scripts/dma_ablation.py run    [--arms A,B,...] [--seeds 1234,2,3] [--jobs N]
    /usr/bin/python3 scripts/dma_ablation.py gather   # runs -> docs/results/dma-ablation/{runs,positions}.csv
    /usr/bin/python3 scripts/dma_ablation.py report   # CSVs -> README tables' numbers (stdout) and PNG plots

`run` skips finished runs (a run directory whose metrics hold the final validation row and whose
positions.csv exists) and resumes unfinished ones with --resume. Runs live in --runs (default
runs/dma-ablation, git-ignored); results go to docs/results/dma-ablation/. Plots are made from the
CSVs alone.
"""
import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "results", "dma-ablation")
BASE = "configs/tiny.json"
STEPS = 600

# name -> (group, description, --set overrides). Order = priority (baselines first).
ARMS = {}


def arm(name, group, desc, attention, train=None, **model):
    sets = ["model.attention=" + json.dumps(attention, separators=(",", ":"))]
    sets += ["model.%s=%s" % (k, json.dumps(v)) for k, v in sorted(model.items())]
    sets += ["train.%s=%s" % (k, json.dumps(v)) for k, v in sorted((train or {}).items())]
    ARMS[name] = (group, desc, sets)


def dma(w, **kw):
    a = {"type": "dma", "window": w}
    a.update(kw)
    return a


arm("mha", "baseline", "causal MHA/GQA", {"type": "mha"})
arm("swa32", "baseline", "sliding window w=32", {"type": "swa", "window": 32})
arm("dma32", "window", "DMA w=32 (paper form: exp bias, A=0)", dma(32))
arm("dma16+L16", "local", "DMA w=16 + local window L=16 (ours; budget 32)", dma(16, local_window=16))
arm("dma128", "window", "DMA w=128=T (every key kept, bias only)", dma(128))
arm("dma64", "window", "DMA w=64", dma(64))
arm("dma8+L24", "local", "DMA w=8 + local L=24 (ours; budget 32)", dma(8, local_window=24))
arm("dma24+L8", "local", "DMA w=24 + local L=8 (ours; budget 32)", dma(24, local_window=8))
arm("swa16", "local", "sliding window w=16 (the local part alone)", {"type": "swa", "window": 16})
arm("dma96", "window", "DMA w=96", dma(96))
arm("mha-doge", "doge", "MHA with Doge's block (QK-norm, residual scales)", {"type": "mha"},
    qk_norm=True, residual_scale=True)
arm("dma32-doge", "doge", "DMA w=32 with Doge's block", dma(32), qk_norm=True, residual_scale=True)
arm("dma32-linear", "bias", "DMA w=32, linear bias A*softplus(z)", dma(32, bias_form="linear"))
arm("dma32-A1", "bias", "DMA w=32, A initialised to 1", dma(32, a_init=1.0))
arm("dma32-Aneg1", "bias", "DMA w=32, A initialised to -1", dma(32, a_init=-1.0))
arm("dma32-dt0.2", "bias", "DMA w=32, dt_proj init std 0.2 (10x)", dma(32, dt_init_std=0.2))
arm("dma32-lr0.1", "bias", "DMA w=32, lr of A and dt_proj x0.1", dma(32, bias_lr_scale=0.1))
arm("dma32-lr10", "bias", "DMA w=32, lr of A and dt_proj x10", dma(32, bias_lr_scale=10.0))
arm("dma128-linear", "bias", "DMA w=128=T, linear bias", dma(128, bias_form="linear"))
# T = 256 with half the keys kept (the ladder's w = 1024 of T = 2048), same tokens per step (8 x 256)
T256 = {"seq_len": 256, "batch_size": 8}
arm("t256-mha", "t256", "T=256: causal MHA", {"type": "mha"}, train=T256)
arm("t256-swa128", "t256", "T=256: sliding window w=128", {"type": "swa", "window": 128}, train=T256)
arm("t256-dma128", "t256", "T=256: DMA w=128 (paper form)", dma(128), train=T256)
arm("t256-dma64+L64", "t256", "T=256: DMA w=64 + local L=64 (ours; budget 128)", dma(64, local_window=64),
    train=T256)

SEEDS = [1234, 2, 3]


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def binary(args):
    b = os.path.abspath(args.dmatrain)
    if not os.access(b, os.X_OK):
        sys.exit("dma_ablation: %s is not an executable dmatrain (build with scripts/setup.sh, or pass --dmatrain)" % b)
    return b


def ensure_data(args):
    d = os.path.abspath(args.data)
    if os.path.exists(os.path.join(d, "manifest.json")):
        return d
    sh([binary(args), "data", "prepare", "--tokenizer", "byte", "--val-fraction", "0.03", "--out", d,
        os.path.join(ROOT, "data", "english")])
    return d


def run_dir(args, name, seed):
    return os.path.join(os.path.abspath(args.runs), "%s_s%d" % (name, seed))


def finished(rd):
    m = os.path.join(rd, "metrics.jsonl")
    if not os.path.exists(m) or not os.path.exists(os.path.join(rd, "positions.csv")):
        return False
    rows = [json.loads(l) for l in open(m) if l.strip()]
    return any(r.get("step") == STEPS and "val_loss" in r for r in rows)


def command(args, name, seed, data):
    sets = ["train.steps=%d" % STEPS, "train.seed=%d" % seed, "train.eval_interval=100", "train.eval_batches=0",
            "train.checkpoint_interval=300", "run.threads=%d" % args.threads, "run.device=cpu",
            "data.train=%s/train" % data, "data.val=%s/val" % data] + ARMS[name][2]
    cmd = [binary(args), "train", BASE, "--out", run_dir(args, name, seed)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_one(args, name, seed, data):
    rd = run_dir(args, name, seed)
    if finished(rd):
        return "skip"
    cmd = command(args, name, seed, data)
    has_ckpt = os.path.isdir(os.path.join(rd, "checkpoints"))
    if os.path.exists(rd) and not has_ckpt:
        # A run that died before its first checkpoint left only logs: keep them aside, never delete.
        shutil.move(rd, rd + ".failed-%d" % int(time.time()))
    log = open(rd + ".log", "a") if os.path.isdir(os.path.dirname(rd)) else None
    t0 = time.time()
    subprocess.run(cmd + (["--resume"] if has_ckpt else []), check=True, cwd=ROOT, stdout=log,
                   stderr=subprocess.STDOUT)
    pos = os.path.join(rd, "positions.csv")
    if os.path.exists(pos):
        os.remove(pos)  # written by this script alone; a resumed run's is stale
    subprocess.run([binary(args), "eval", rd, "--positions", pos], check=True, cwd=ROOT, stdout=log,
                   stderr=subprocess.STDOUT)
    return "%.0f s" % (time.time() - t0)


def cmd_run(args):
    data = ensure_data(args)
    os.makedirs(os.path.abspath(args.runs), exist_ok=True)
    arms = args.arms.split(",") if args.arms else list(ARMS)
    for a in arms:
        if a not in ARMS:
            sys.exit("dma_ablation: unknown arm %r (arms: %s)" % (a, ", ".join(ARMS)))
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(a, s) for a in arms for s in seeds]

    def go(j):
        r = run_one(args, j[0], j[1], data)
        print("%-14s seed %-5d %s" % (j[0], j[1], r), flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        list(ex.map(go, jobs))


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def cmd_gather(args):
    os.makedirs(OUT, exist_ok=True)
    rows, pos_rows, curves = [], [], []
    for name, (group, desc, sets) in ARMS.items():
        for seed in SEEDS:
            rd = run_dir(args, name, seed)
            if not finished(rd):
                continue
            ms = [json.loads(l) for l in open(os.path.join(rd, "metrics.jsonl")) if l.strip()]
            vals = [m for m in ms if "val_loss" in m]
            train = [m for m in ms if "loss" in m]
            final = [m for m in vals if m["step"] == STEPS][-1]
            cmd = command(args, name, seed, "DATA")
            cmd[0] = "build/dmatrain"
            cmd[cmd.index("--out") + 1] = "RUN_DIR"
            rows.append({
                "arm": name, "group": group, "description": desc, "seed": seed,
                "attention": [s for s in sets if s.startswith("model.attention=")][0].split("=", 1)[1],
                "block": ";".join(s for s in sets if not s.startswith("model.attention=")) or "llama",
                "val_loss": "%.5f" % final["val_loss"], "ppl": "%.4f" % final["ppl"],
                "train_loss_avg": "%.5f" % train[-1]["loss_avg"], "tokens": final["tokens"],
                "tokens_per_s": "%.0f" % (sum(m["tokens_per_s"] for m in train[-10:]) / len(train[-10:])),
                "wall_s": "%.1f" % final["time"], "commit": args.commit or git_commit(),
                "command": " ".join(cmd)})
            for m in vals:
                curves.append({"arm": name, "seed": seed, "step": m["step"], "val_loss": "%.5f" % m["val_loss"]})
            with open(os.path.join(rd, "positions.csv")) as f:
                for r in csv.DictReader(f):
                    pos_rows.append({"arm": name, "seed": seed, "position": r["position"], "loss": r["loss"]})
    write_csv(os.path.join(OUT, "runs.csv"), rows)
    write_csv(os.path.join(OUT, "curves.csv"), curves)
    write_csv(os.path.join(OUT, "positions.csv"), pos_rows)
    print("gathered %d runs into %s" % (len(rows), OUT))


def write_csv(path, rows):
    if not rows:
        return
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def read_csv(name):
    with open(os.path.join(OUT, name)) as f:
        return list(csv.DictReader(f))


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def cmd_report(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_csv("runs.csv")
    by = {}
    for r in runs:
        by.setdefault(r["arm"], []).append(r)
    mha = mean_std([float(r["val_loss"]) for r in by.get("mha", [])]) if "mha" in by else None
    print("| arm | what | seeds | val loss (mean ± std) | each seed | vs its MHA |")
    print("|---|---|---|---|---|---|")
    for name in ARMS:
        if name not in by:
            continue
        xs = [float(r["val_loss"]) for r in sorted(by[name], key=lambda r: int(r["seed"]))]
        m, s = mean_std(xs)
        ref = mha
        for suffix_or_prefix, ref_arm in (("-doge", "mha-doge"), ("t256-", "t256-mha")):
            if (name.endswith(suffix_or_prefix) or name.startswith(suffix_or_prefix)) and ref_arm in by:
                ref = mean_std([float(r["val_loss"]) for r in by[ref_arm]])
        d = "%+.3f" % (m - ref[0]) if ref else ""
        print("| %s | %s | %d | %.4f ± %.4f | %s | %s |" % (name, ARMS[name][1], len(xs), m, s,
                                                          " ".join("%.4f" % x for x in xs), d))

    # 1. every arm, every seed
    names = [n for n in ARMS if n in by]
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, n in enumerate(names):
        xs = [float(r["val_loss"]) for r in by[n]]
        ax.scatter([i] * len(xs), xs, s=14, color="C0")
        m, s = mean_std(xs)
        ax.errorbar([i], [m], yerr=[s if s == s else 0], fmt="_", color="k", markersize=16, capsize=4)
    if mha:
        ax.axhline(mha[0], color="C3", lw=0.8, ls="--", label="MHA mean")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("validation loss (nats/byte), 600 steps")
    ax.set_title("DMA ablations, tiny (T=128, byte-level English): every seed, mean ± std")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "arms.png"), dpi=110)
    plt.close(fig)

    # 2. window sweep
    fig, ax = plt.subplots(figsize=(6, 4))
    ws, ms, ss = [], [], []
    for w in (32, 64, 96, 128):
        if "dma%d" % w in by:
            m, s = mean_std([float(r["val_loss"]) for r in by["dma%d" % w]])
            ws.append(w), ms.append(m), ss.append(s)
    ax.errorbar(ws, ms, yerr=ss, marker="o", capsize=3, label="DMA (paper form)")
    for n, c in (("mha", "C3"), ("swa32", "C2")):
        if n in by:
            m, _ = mean_std([float(r["val_loss"]) for r in by[n]])
            ax.axhline(m, color=c, ls="--", lw=1, label=n)
    if "dma16+L16" in by:
        m, s = mean_std([float(r["val_loss"]) for r in by["dma16+L16"]])
        ax.errorbar([32], [m], yerr=[s], marker="s", color="C4", capsize=3, label="DMA w16 + local 16 (ours)")
    ax.set_xlabel("keys kept per query (w), T = 128")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "window.png"), dpi=110)
    plt.close(fig)

    # 3. loss by position (mean over seeds, then over bins of 8 positions)
    pos = read_csv("positions.csv")
    plot_positions(plt, pos, ("mha", "swa32", "dma32", "dma128", "dma16+L16", "dma32-doge"), 32, "positions.png")
    plot_positions(plt, pos, ("t256-mha", "t256-swa128", "t256-dma128", "t256-dma64+L64"), 128, "positions_t256.png")

    # 4. validation curves (mean over seeds)
    cur = read_csv("curves.csv")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in ("mha", "swa32", "dma32", "dma64", "dma128", "dma16+L16"):
        pts = {}
        for r in cur:
            if r["arm"] == n:
                pts.setdefault(int(r["step"]), []).append(float(r["val_loss"]))
        if pts:
            st = sorted(pts)
            ax.plot(st, [sum(pts[s]) / len(pts[s]) for s in st], marker=".", label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "curves.png"), dpi=110)
    plt.close(fig)
    print("plots written to", OUT)


def plot_positions(plt, pos, arms, w, filename):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for n in arms:
        pts = {}
        for r in pos:
            if r["arm"] == n:
                pts.setdefault(int(r["position"]), []).append(float(r["loss"]))
        if not pts:
            continue
        T = max(pts) + 1
        b = 8
        xs = [i * b + b / 2 for i in range(T // b)]
        ys = [sum(sum(pts[t]) / len(pts[t]) for t in range(i * b, i * b + b)) / b for i in range(T // b)]
        ax.plot(xs, ys, marker=".", label=n)
        drawn = True
    if not drawn:
        plt.close(fig)
        return
    ax.axvline(w, color="grey", lw=0.6, ls=":", label="w = %d" % w)
    ax.set_xlabel("position in the sequence (bins of 8)")
    ax.set_ylabel("validation loss")
    ax.set_title("loss by position (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, filename), dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["run", "gather", "report"])
    p.add_argument("--arms", default="", help="comma-separated arm names (default: all, in priority order)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    p.add_argument("--dmatrain", default=os.path.join(ROOT, "build", "dmatrain"))
    p.add_argument("--data", default=os.path.join(ROOT, "build", "data", "english"))
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "dma-ablation"))
    p.add_argument("--commit", default="", help="the commit the binary was built from (default: HEAD)")
    args = p.parse_args()
    {"run": cmd_run, "gather": cmd_gather, "report": cmd_report}[args.what](args)


if __name__ == "__main__":
    main()
