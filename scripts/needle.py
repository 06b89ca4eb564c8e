#!/usr/bin/python3
"""Needle retrieval grid: pass-key retrieval by context length and needle depth for each attention
variant (issue 20), through `dmatrain needle` (README "Needle retrieval": the trials, the two scores,
the columns). This script only orchestrates: it runs the command over run directories, merges their
rows and draws a depth x length heatmap per run.

    /usr/bin/python3 scripts/needle.py plan   [--grid ladder|cpu-smoke] [--runs GLOB ...]   # the commands
    /usr/bin/python3 scripts/needle.py train  --grid cpu-smoke     # the smoke grid's tiny models (CPU)
    /usr/bin/python3 scripts/needle.py run    [--grid ...] [--runs GLOB ...] [--threads N]
    /usr/bin/python3 scripts/needle.py gather [--grid ...]   # rows -> docs/results/needle/<grid>.csv
    /usr/bin/python3 scripts/needle.py report [--grid ...]   # CSV -> <grid>.png and markdown tables (stdout)

`run` writes one CSV of rows per run directory under --rows (default runs/needle/<grid>, git-ignored),
skipping run directories whose CSV exists, so an interrupted grid continues where it stopped. Every
run directory is scored with the same options; the filler is each run's own validation shards.
Grids:

  ladder     the largest ladder rung, runs/ladder/d512-l6/<variant>/<lr>-s<seed> (T = 2048, the
             32K-token mix tokenizer): lengths 1K-16K (4K-16K beyond train.seq_len: RoPE
             extrapolation, flagged in every row), depths 0-100% by 10, 3 trials, 9 distractors, the
             default needle, question and answer. Decoding runs on the CPU backend: run it on a machine
             with many cores (--threads 0: all of them).
  cpu-smoke  5 tiny byte-level models (configs/tiny.json, one per variant, T = 256, 600 steps on the
             bundled English text; `train` makes them) at lengths 128, 256 and 512 (512 beyond train)
             with a short needle (" The pass key is {key}.") and the question " The pass key is":
             proves the pipeline on 2 CPU cores, not the claim.
"""
import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["mha", "swa", "dma", "mla", "nsa"]

GRIDS = {
    "ladder": dict(runs=["runs/ladder/d512-l6/*/*"], lengths=[1024, 2048, 4096, 8192, 16384],
                   depths=list(range(0, 101, 10)), trials=3, distractors=9, key_digits=5, text=[], threads=0),
    "cpu-smoke": dict(runs=["runs/needle/cpu-smoke-models/*"], lengths=[128, 256, 512], depths=[0, 25, 50, 75, 100],
                      trials=4, distractors=9, key_digits=5, threads=1,
                      text=["--needle", " The pass key is {key}.", "--question", " The pass key is"]),
}

# The smoke grid's models: configs/tiny.json (d 128, 2 layers, 4 heads of 32, 2 KV heads, byte tokens)
# at T = 256 with each variant's attention; windows a quarter of T so that SWA and DMA select.
SMOKE_ATTENTION = {
    "mha": {"type": "mha"},
    "swa": {"type": "swa", "window": 64},
    "dma": {"type": "dma", "window": 64},
    "mla": {"type": "mla", "kv_rank": 32, "rope_dim": 16, "nope_dim": 32, "v_dim": 32},
    "nsa": {"type": "nsa", "cmp_block": 8, "cmp_stride": 4, "sel_block": 16, "sel_count": 4, "window": 32},
}
SMOKE_TRAIN = {"train.seq_len": 256, "train.batch_size": 16, "train.steps": 600, "train.eval_interval": 0,
               "train.eval_batches": 8, "train.checkpoint_interval": 0, "run.device": "cpu", "run.threads": 2,
               "data.train": "build/data/english/train", "data.val": "build/data/english/val"}
SMOKE_DATA = ["data", "prepare", "--tokenizer", "byte", "--val-fraction", "0.03", "--out", "build/data/english",
              "data/english"]


def shell(cmd):
    return " ".join(a if a and all(ch.isalnum() or ch in "-_./=,:*" for ch in a) else "'" + a + "'" for a in cmd)


def finished(run):
    """Whether the run's newest complete checkpoint is its last step (train.steps of its config.json)."""
    try:
        with open(os.path.join(run, "config.json")) as f:
            steps = json.load(f)["train"]["steps"]
    except (OSError, ValueError, KeyError):
        return False
    done = [int(os.path.basename(os.path.dirname(c))[5:])
            for c in glob.glob(os.path.join(run, "checkpoints", "step_*", "COMPLETE"))]
    return bool(done) and max(done) >= steps


def run_dirs(args):
    """The finished runs the globs match (unfinished ones are named and left out)."""
    dirs = []
    for pattern in args.runs:
        for d in sorted(glob.glob(pattern)):
            if not os.path.isdir(os.path.join(d, "checkpoints")):
                continue
            if finished(d):
                dirs.append(d)
            else:
                print("needle: %s has not finished training, left out" % d, file=sys.stderr)
    return dirs


def label(run):
    """A run directory as a file name: runs/ladder/d512-l6/nsa/lr2e-3-s1 -> d512-l6_nsa_lr2e-3-s1."""
    parts = os.path.normpath(run).split(os.sep)
    if parts and parts[0] == "runs":
        parts = parts[1:]
    if len(parts) > 1 and parts[0] in ("ladder", "needle"):
        parts = parts[1:]
    if len(parts) > 1 and parts[0].endswith("-models"):
        parts = parts[1:]
    return "_".join(parts)


def needle_command(args, g, run, out):
    cmd = [args.dmatrain, "needle", run, "--lengths", ",".join(map(str, args.lengths)),
           "--depths", ",".join("%g" % d for d in args.depths), "--trials", str(args.trials),
           "--distractors", str(g["distractors"]), "--key-digits", str(g["key_digits"]),
           "--threads", str(args.threads), "--out", out]
    return cmd + g["text"]


def smoke_train_command(args, variant):
    cmd = [args.dmatrain, "train", "configs/tiny.json", "--out", os.path.join("runs/needle/cpu-smoke-models", variant)]
    sets = dict(SMOKE_TRAIN, **{"model.attention": SMOKE_ATTENTION[variant], "run.name": "needle-smoke-" + variant})
    for k, v in sets.items():
        cmd += ["--set", "%s=%s" % (k, v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))]
    return cmd


def cmd_plan(args, g):
    if args.grid == "cpu-smoke":
        print(shell([args.dmatrain] + SMOKE_DATA))
        for v in VARIANTS:
            print(shell(smoke_train_command(args, v)))
    dirs = run_dirs(args)
    if not dirs:
        print("# no run directory matches %s yet; for each RUN:" % " ".join(args.runs))
        dirs = ["RUN"]
    for run in dirs:
        print(shell(needle_command(args, g, run, os.path.join(args.rows, label(run) + ".csv"))))


def cmd_train(args, g):
    if args.grid != "cpu-smoke":
        sys.exit("needle: `train` makes the cpu-smoke grid's models only (the ladder's come from scripts/ladder.py)")
    if not os.path.exists("build/data/english/manifest.json"):
        subprocess.check_call([args.dmatrain] + SMOKE_DATA)
    for v in VARIANTS:
        run = os.path.join("runs/needle/cpu-smoke-models", v)
        if os.path.exists(os.path.join(run, "train_done.json")):
            print("needle: %s trained" % run)
            continue
        cmd = smoke_train_command(args, v)
        if os.path.isdir(os.path.join(run, "checkpoints")):
            cmd.append("--resume")
        print(shell(cmd), flush=True)
        os.makedirs(os.path.dirname(run), exist_ok=True)
        t0 = time.time()
        with open(run + ".log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=log)
        if rc != 0:
            sys.exit("needle: training %s failed (rc %d, see %s.log)" % (run, rc, run))
        with open(os.path.join(run, "train_done.json"), "w") as f:
            json.dump({"wall_s": time.time() - t0}, f)


def cmd_run(args, g):
    dirs = run_dirs(args)
    if not dirs:
        sys.exit("needle: no run directory with checkpoints matches %s" % " ".join(args.runs))
    os.makedirs(args.rows, exist_ok=True)
    for run in dirs:
        out = os.path.join(args.rows, label(run) + ".csv")
        if os.path.exists(out):
            print("needle: %s done (%s)" % (run, out))
            continue
        cmd = needle_command(args, g, run, out)
        print(shell(cmd), flush=True)
        t0 = time.time()
        with open(out[:-4] + ".log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=log)
        if rc != 0:
            sys.exit("needle: %s failed (rc %d, see %s.log)" % (run, rc, out[:-4]))
        print("needle: %s: %.0f s -> %s" % (run, time.time() - t0, out), flush=True)


def cmd_gather(args, g):
    rows = []
    for path in sorted(glob.glob(os.path.join(args.rows, "*.csv"))):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for r in csv.DictReader(f):
                rows.append(dict({"label": os.path.basename(path)[:-4]}, **r))
    if not rows:
        sys.exit("needle: no rows in %s (run first)" % args.rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.grid + ".csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print("needle: %d rows of %d runs -> %s" % (len(rows), len({r["label"] for r in rows}), path))


def cells(rows):
    """(label, length, depth) -> the rows of that cell."""
    out = {}
    for r in rows:
        out.setdefault((r["label"], int(r["length"]), float(r["depth"])), []).append(r)
    return out


def order(labels, variant_of):
    return sorted(labels, key=lambda l: (VARIANTS.index(variant_of[l]) if variant_of[l] in VARIANTS else 99, l))


def cmd_report(args, g):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(args.out, args.grid + ".csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit("needle: %s holds no rows" % path)
    variant_of = {r["label"]: r["variant"] for r in rows}
    labels = order(variant_of.keys(), variant_of)
    lengths = sorted({int(r["length"]) for r in rows})
    depths = sorted({float(r["depth"]) for r in rows})
    train_len = {}  # the lengths beyond train.seq_len, per label
    for r in rows:
        if r["beyond_train"] == "1":
            train_len.setdefault(r["label"], set()).add(int(r["length"]))
    c = cells(rows)
    scores = [("exact", "greedy exact match", lambda rs: sum(int(r["exact"]) for r in rs) / len(rs)),
              ("rank1", "likelihood rank 1 of %s" % rows[0]["candidates"],
               lambda rs: sum(int(r["rank"]) == 1 for r in rs) / len(rs))]
    # one column per run, one row per score: depth (rows) x length (columns)
    fig, axes = plt.subplots(len(scores), len(labels), figsize=(2.2 + 2.3 * len(labels), 1.0 + 2.6 * len(scores)),
                             squeeze=False)
    for j, lab in enumerate(labels):
        for i, (key, name, fn) in enumerate(scores):
            ax = axes[i][j]
            m = [[fn(c[(lab, n, d)]) if (lab, n, d) in c else float("nan") for n in lengths] for d in depths]
            im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for a, d in enumerate(depths):
                for b, n in enumerate(lengths):
                    if m[a][b] == m[a][b]:
                        ax.text(b, a, "%.2f" % m[a][b], ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(lengths)))
            ax.set_xticklabels([("%dK" % (n // 1024) if n % 1024 == 0 else str(n)) +
                                ("*" if n in train_len.get(lab, ()) else "") for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)))
            ax.set_yticklabels(["%g%%" % d for d in depths], fontsize=7)
            if i == 0:
                name_of_run = variant_of[lab] if lab == variant_of[lab] else "%s\n%s" % (variant_of[lab], lab)
                ax.set_title(name_of_run, fontsize=8)
            if j == 0:
                ax.set_ylabel("%s\nneedle depth" % name, fontsize=8)
            if i == len(scores) - 1:
                ax.set_xlabel("context length", fontsize=7)
    fig.subplots_adjust(wspace=0.35, hspace=0.3)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="fraction of trials")
    trials = len(next(iter(c.values())))
    title = "Needle retrieval, %s grid: %d trials per cell (* length beyond train.seq_len)" % (args.grid, trials)
    if args.grid == "cpu-smoke":
        title += "\n(tiny CPU models: shows the pipeline, not the claim)"
    fig.suptitle(title, fontsize=10)
    png = os.path.join(args.out, args.grid + ".png")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print("needle: %s" % png)
    # the tables: per run, the two scores by length (all depths), then mean rank and log-probability
    print("| variant | run | " + " | ".join("exact / rank 1 @ %d" % n for n in lengths) +
          " | mean rank | mean logprob |")
    print("|---|---|" + "---|" * (len(lengths) + 2))
    for lab in labels:
        mine = [r for r in rows if r["label"] == lab]
        per = []
        for n in lengths:
            rs = [r for r in mine if int(r["length"]) == n]
            per.append("–" if not rs else "%.2f / %.2f%s" % (scores[0][2](rs), scores[1][2](rs),
                                                             " *" if n in train_len.get(lab, ()) else ""))
        print("| %s | %s | %s | %.2f | %.2f |" % (variant_of[lab], lab, " | ".join(per),
                                                  sum(int(r["rank"]) for r in mine) / len(mine),
                                                  sum(float(r["logprob"]) for r in mine) / len(mine)))


def numbers(s):
    return [float(x) for x in s.split(",") if x]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["plan", "train", "run", "gather", "report"])
    p.add_argument("--grid", default="cpu-smoke", choices=sorted(GRIDS))
    p.add_argument("--runs", nargs="+", help="run directory globs (default: the grid's)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--depths", type=numbers)
    p.add_argument("--trials", type=int)
    p.add_argument("--threads", type=int, help="CPU threads of each needle run (default: the grid's; 0: all)")
    p.add_argument("--dmatrain", default=os.path.join("build", "dmatrain"))
    p.add_argument("--rows", help="per-run CSVs (default runs/needle/<grid>)")
    p.add_argument("--out", default=os.path.join("docs", "results", "needle"))
    args = p.parse_args()
    g = GRIDS[args.grid]
    args.runs = args.runs or g["runs"]
    args.lengths = args.lengths or g["lengths"]
    args.depths = args.depths or g["depths"]
    args.trials = args.trials or g["trials"]
    args.threads = g["threads"] if args.threads is None else args.threads
    args.rows = args.rows or os.path.join("runs", "needle", args.grid)
    os.chdir(ROOT)  # paths in commands, configs and results are relative to the repository
    {"plan": cmd_plan, "train": cmd_train, "run": cmd_run, "gather": cmd_gather, "report": cmd_report}[args.command](
        args, g)


if __name__ == "__main__":
    main()
