#!/usr/bin/env python3
"""The ladder launcher end to end on the CPU (ctest Ladder.Smoke, label cpu): the smoke ladder of
configs/ladder/smoke/ (byte tokenizer, T = 64, a few steps per run) through plan -> run -> gather -> report,
with a run stopped mid-way and resumed by the launcher (same final loss as an uninterrupted run, bit for
bit), finished runs skipped, a variant dmatrain refuses listed as not yet available, a size whose variants
differ beyond model.attention refused, a foreign run directory left alone, and the lr rule and the
power-law fit on numbers whose answer is known.

usage: test_ladder.py --dmatrain BIN   (run from anywhere; needs matplotlib for the report)
"""
import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LADDER = os.path.join(REPO, "scripts", "ladder.py")
SPEC = os.path.join("configs", "ladder", "smoke", "ladder.json")
sys.path.insert(0, os.path.join(REPO, "scripts"))
import ladder  # noqa: E402  (the launcher's own functions, for the rule and fit checks)

failures = []
passed = 0


def check(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
        print(f"FAIL: {what}", flush=True)


def sh(cmd, ok=True):
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dmatrain", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="dmat_ladder_")
    try:
        run_all(os.path.abspath(a.dmatrain), tmp)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


def run_all(bin_, tmp):
    py = sys.executable
    data, runs, results = (os.path.join(tmp, x) for x in ("data", "runs", "results"))
    sh([bin_, "data", "prepare", "--tokenizer", "byte", "--out", data, "--val-fraction", "0.03",
        os.path.join(REPO, "data", "english", "devils_dictionary.txt")])
    common = ["--spec", SPEC, "--dmatrain", bin_, "--data", data, "--runs", runs, "--results", results]

    # ---- plan: every variant this dmatrain accepts planned (all five), seeds wait for the sweep; per
    # variant 2 sweep runs, 1 + 2 + 1 waiting
    p = sh([py, LADDER, "plan"] + common + ["--json"])
    plan = json.loads(p.stdout)
    ids = [r["run_id"] for r in plan["runs"]]
    nv = 5 - len(plan["unavailable"])
    check(nv == 5, f"mha, swa, dma, mla, nsa available (unavailable: {plan['unavailable']})")
    sweep = [r for r in plan["runs"] if r["kind"] == "sweep"]
    check(len(sweep) == 2 * nv and all(r["size"] == "s1" and r["seed"] == 1 for r in sweep),
          f"sweep: 2 lrs x {nv} variants at s1, seed 1")
    check(len(ids) == 6 * nv, f"{6 * nv} runs planned before the sweep, got {len(ids)}")
    check(sum(r["status"] == "blocked" for r in plan["runs"]) == 4 * nv, f"{4 * nv} runs wait for the lr choice")
    check(all(r["command"] and "--set train.lr=" in r["command"] and r["flops"] > 0 for r in sweep),
          "sweep runs carry their command and FLOPs")

    # ---- a variant whose configs this dmatrain refuses for their model.attention is listed, not planned
    future = os.path.join(tmp, "future")
    shutil.copytree(os.path.join(REPO, "configs", "ladder", "smoke"), future)
    spec = json.load(open(os.path.join(future, "ladder.json")))
    spec["estimate"]["references"][0]["config"] = os.path.join(REPO, "configs", "tiny.json")
    json.dump(spec, open(os.path.join(future, "ladder.json"), "w"))
    for size in ("s1", "s2", "s3"):
        cfg = json.load(open(os.path.join(future, f"{size}-nsa.json")))
        cfg["model"]["attention"] = {"type": "future"}
        json.dump(cfg, open(os.path.join(future, f"{size}-nsa.json"), "w"))
    fargs = ["--spec", os.path.join(future, "ladder.json"), "--dmatrain", bin_, "--data", data,
             "--runs", os.path.join(tmp, "runs_future"), "--results", os.path.join(tmp, "results_future")]
    fplan = json.loads(sh([py, LADDER, "plan"] + fargs + ["--json"]).stdout)
    check(list(fplan["unavailable"]) == ["nsa"] and "model.attention" in fplan["unavailable"]["nsa"],
          f"a variant dmatrain refuses is not yet available, naming model.attention (got {fplan['unavailable']})")
    check(len(fplan["runs"]) == 6 * 4 and all(r["variant"] != "nsa" for r in fplan["runs"]),
          "the other four variants are planned")
    check("not yet available: nsa" in sh([py, LADDER, "plan"] + fargs).stdout, "plan prints not-yet-available variants")

    # ---- a run stopped mid-way (--stop-at through --slice-steps), then everything with two runs at a time
    target = "s1/mha/lr0.01-s1"
    p = sh([py, LADDER, "run"] + common + ["--only", target, "--slice-steps", "3"])
    check("stop at step 3" in p.stdout and "1 left" in p.stdout, "the sliced launch stops at step 3")
    tplan = {r["run_id"]: r for r in json.loads(sh([py, LADDER, "plan"] + common + ["--json"]).stdout)["runs"]}
    check(tplan[target]["status"] == "partial" and tplan[target]["step"] == 3, "the plan shows the run partial at step 3")
    p = sh([py, LADDER, "run"] + common + ["--parallel", "2"])
    check("resume from step 3" in p.stdout, "the launcher resumes the partial run")
    mark = json.load(open(os.path.join(runs, target, "ladder.json")))
    check(len(mark["launches"]) == 2 and "--resume" in mark["launches"][1]["argv"], "two launches, the second with --resume")
    final = json.loads(sh([py, LADDER, "plan"] + common + ["--json"]).stdout)
    check(all(r["status"] == "finished" for r in final["runs"]), "every run finished")
    check(len(final["runs"]) == 6 * nv, f"{6 * nv} runs in the finished plan")

    # the same command, uninterrupted, in a directory of its own
    canon = tplan[target]["command"].split()
    ref_dir = os.path.join(tmp, "ref")
    sh(canon[:canon.index("--out")] + ["--out", ref_dir])
    ref = [r for r in ladder.read_jsonl(os.path.join(ref_dir, "metrics.jsonl")) if "val_loss" in r][-1]
    rec = json.load(open(os.path.join(results, "runs", target, "record.json")))
    check(rec["val_loss"] == ref["val_loss"], f"resumed run's final val loss {rec['val_loss']} == uninterrupted {ref['val_loss']}")

    # ---- finished runs are skipped
    p = sh([py, LADDER, "run"] + common)
    check("launch " not in p.stdout and f"{6 * nv} run(s) already finished" in p.stdout, "a second run call launches nothing")

    # ---- gather: one row per run, the columns, and values that agree with the runs
    sh([py, LADDER, "gather", "--spec", SPEC, "--results", results])
    rows = list(csv.DictReader(open(os.path.join(results, "runs.csv"))))
    want = ["variant", "size", "seed", "lr", "params", "non_embedding_params", "tokens", "flops", "val_loss", "ppl",
            "tokens_per_s", "wall_s", "commit", "command", "corpus_manifest_sha256"]
    check(rows and all(c in rows[0] for c in want), f"runs.csv has the columns {want}")
    check(len(rows) == 6 * nv, f"{6 * nv} rows (got {len(rows)})")
    corpus_sha = hashlib.sha256(open(os.path.join(data, "manifest.json"), "rb").read()).hexdigest()
    infos = {}
    for r in rows:
        cfg = os.path.join(REPO, "configs", "ladder", "smoke", r["size"] + ("" if r["variant"] == "mha" else "-" + r["variant"]) + ".json")
        if cfg not in infos:
            infos[cfg] = json.loads(sh([bin_, "info", cfg, "--json"]).stdout)
        info = infos[cfg]
        metrics = ladder.read_jsonl(os.path.join(results, "runs", r["run_id"], "metrics.jsonl"))
        last_val = [m for m in metrics if "val_loss" in m][-1]
        steps = info["config"]["train"]["steps"]
        ok = (int(r["tokens"]) == steps * 4 * 64 and int(r["steps"]) == steps
              and abs(float(r["flops"]) - int(r["tokens"]) * info["flops_per_token"]["executed_matmuls"]) <= 1e-9 * float(r["flops"])
              and int(r["params"]) == info["params"]["total"] and int(r["non_embedding_params"]) == info["params"]["non_embedding"]
              and float(r["val_loss"]) == last_val["val_loss"] and last_val["step"] == steps
              and abs(float(r["ppl"]) - math.exp(float(r["val_loss"]))) < 1e-9 * float(r["ppl"])
              and float(r["tokens_per_s"]) > 0 and float(r["wall_s"]) > 0 and r["commit"]
              and r["corpus_manifest_sha256"] == corpus_sha and r["status"] == "finished"
              and f"--set train.lr={r['lr']}" in r["command"] and f"--set train.seed={r['seed']}" in r["command"])
        check(ok, f"row {r['run_id']} agrees with its config, metrics and corpus")
    lrs = {(r["size"], float(r["lr"])) for r in rows if r["size"] != "s1"}
    check(len({lr for _, lr in lrs}) == 1, "every size after the sweep uses the one chosen lr")

    # ---- report: tables, fits, plots; hand-written text between the keep markers survives
    sh([py, LADDER, "report", "--spec", SPEC, "--results", results])
    readme = open(os.path.join(results, "README.md")).read()
    check(all(f"| {v} |" in readme for v in ("mha", "swa", "dma", "mla", "nsa")), "the report has a row per variant")
    check(readme.count("α = ") == nv, "a fit per variant (3 sizes)")
    for png in ("loss_vs_compute.png", "val_curves.png", "lr_sweep.png"):
        path = os.path.join(results, png)
        check(os.path.exists(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", f"{png} is a PNG")
    has_pos = os.path.exists(os.path.join(results, "loss_by_position.png"))
    eval_help = sh([bin_, "eval", "--help"]).stdout
    check(has_pos == ("--positions" in eval_help), "loss-by-position plot exactly when dmatrain eval has --positions")
    check(has_pos or "no loss by position yet" in readme, "the report says why the loss-by-position plot is missing")
    # the loss-by-position plot from positions.csv files (as `dmatrain eval --positions` writes them)
    for r in rows:
        if r["size"] == "s3":
            with open(os.path.join(results, "runs", r["run_id"], "positions.csv"), "w") as f:
                f.write("position,loss,tokens\n" + "".join(f"{i},{3 + 1 / (i + 1):.6f},100\n" for i in range(64)))
    sh([py, LADDER, "report", "--spec", SPEC, "--results", results])
    readme = open(os.path.join(results, "README.md")).read()
    check(os.path.exists(os.path.join(results, "loss_by_position.png")) and "by token position at s3" in readme, "the loss-by-position plot at the largest size with positions")
    with open(os.path.join(results, "README.md"), "w") as f:
        f.write(readme.replace("(Conclusions: written by hand, kept across reports.)", "HAND-WRITTEN CONCLUSION"))
    sh([py, LADDER, "report", "--spec", SPEC, "--results", results])
    check("HAND-WRITTEN CONCLUSION" in open(os.path.join(results, "README.md")).read(), "the kept text survives a new report")

    # ---- a size whose variants differ beyond model.attention is refused
    bad = os.path.join(tmp, "bad")
    shutil.copytree(os.path.join(REPO, "configs", "ladder", "smoke"), bad)
    spec = json.load(open(os.path.join(bad, "ladder.json")))
    spec["estimate"]["references"][0]["config"] = os.path.join(REPO, "configs", "tiny.json")
    json.dump(spec, open(os.path.join(bad, "ladder.json"), "w"))
    cfg = json.load(open(os.path.join(bad, "s2-dma.json")))
    cfg["train"] = {"weight_decay": 0.1}
    json.dump(cfg, open(os.path.join(bad, "s2-dma.json"), "w"))
    badargs = ["--spec", os.path.join(bad, "ladder.json"), "--dmatrain", bin_, "--data", data,
               "--runs", os.path.join(tmp, "runs_bad"), "--results", os.path.join(tmp, "results_bad")]
    for sub in ("plan", "run"):
        p = sh([py, LADDER, sub] + badargs, ok=False)
        check(p.returncode == 1 and "size s2" in p.stderr and "train.weight_decay" in p.stderr and "dma" in p.stderr,
              f"{sub} refuses s2 whose dma config changes train.weight_decay: {p.stderr.strip()}")
    check(not os.path.exists(os.path.join(tmp, "runs_bad")), "nothing was launched for the refused ladder")

    # ---- a run directory not made by the launcher is left alone
    runs3 = os.path.join(tmp, "runs3")
    foreign = os.path.join(runs3, "s1", "mha", "lr0.003-s1")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as f:
        f.write("mine")
    p = sh([py, LADDER, "run"] + ["--spec", SPEC, "--dmatrain", bin_, "--data", data, "--runs", runs3,
                                  "--results", os.path.join(tmp, "results3"), "--only", "s1/mha/lr0.003-s1"], ok=False)
    check(p.returncode == 1 and "not created by scripts/ladder.py" in p.stderr, f"a foreign run directory is refused: {p.stderr.strip()}")
    check(os.listdir(foreign) == ["notes.txt"] and open(os.path.join(foreign, "notes.txt")).read() == "mine",
          "the foreign directory is untouched")

    # ---- a budget of zero launches nothing
    p = sh([py, LADDER, "run"] + ["--spec", SPEC, "--dmatrain", bin_, "--data", data, "--runs", os.path.join(tmp, "runs4"),
                                  "--results", os.path.join(tmp, "results4"), "--budget-s", "0"])
    check("launch " not in p.stdout and not os.path.exists(os.path.join(tmp, "runs4")), "--budget-s 0 launches nothing")

    # ---- corpus check: a recorded manifest matches, a changed shard checksum is refused
    rec_path = os.path.join(tmp, "corpus.json")
    sh([py, LADDER, "check-corpus", os.path.join(data, "manifest.json"), "--record", rec_path])
    check(sh([py, LADDER, "check-corpus", os.path.join(data, "manifest.json"), "--expect", rec_path]).returncode == 0,
          "the recorded manifest matches")
    p = sh([py, LADDER, "check-corpus", os.path.join(data, "manifest.json"), "--record", rec_path], ok=False)
    check(p.returncode == 1 and "not overwritten" in p.stderr, "--record refuses an existing file")
    m = json.load(open(rec_path))
    m["train"]["shards"][0]["fnv1a64"] = "0" * 16
    json.dump(m, open(rec_path, "w"))
    p = sh([py, LADDER, "check-corpus", os.path.join(data, "manifest.json"), "--expect", rec_path], ok=False)
    check(p.returncode == 1 and "train/shard_000000.bin" in p.stderr, f"a changed shard is refused: {p.stderr.strip()}")

    # ---- the lr rule and the fit, on numbers whose answer is known
    class S:
        lrs = [1e-3, 2e-3, 4e-3]
        lr_rule, lr_tolerance = "shared_if_fair", 0.02

        def seeds_for(self, size):
            return [1]
    res = {("a", "mha", 1e-3, 1): 3.00, ("a", "mha", 2e-3, 1): 2.90, ("a", "mha", 4e-3, 1): 2.95,
           ("a", "dma", 1e-3, 1): 3.10, ("a", "dma", 2e-3, 1): 3.01, ("a", "dma", 4e-3, 1): 3.00}
    c = ladder.choose_lr(S(), "a", ["mha", "dma"], res)
    check(c["mode"] == "shared" and c["lr"] == {"mha": 2e-3, "dma": 2e-3}, f"shared lr 2e-3 within 0.01 nats (got {c['lr']})")
    s2 = S()
    s2.lr_tolerance = 0.005
    c = ladder.choose_lr(s2, "a", ["mha", "dma"], res)
    check(c["mode"] == "per_variant" and c["lr"] == {"mha": 2e-3, "dma": 4e-3}, f"per-variant lrs past the tolerance (got {c['lr']})")
    c = ladder.choose_lr(S(), "a", ["mha", "dma", "swa"], res)
    check(c["mode"] == "pending" and c["lr"]["mha"] is None, "shared rule waits for every variant's sweep")
    res_div = dict(res)
    res_div[("a", "mha", 2e-3, 1)] = float("inf")
    c = ladder.choose_lr(S(), "a", ["mha", "dma"], res_div)
    check(c["lr"] == {"mha": 4e-3, "dma": 4e-3}, f"a diverged lr is never chosen (got {c['lr']})")
    res_dead = dict(res)
    res_dead[("a", "dma", 1e-3, 1)] = res_dead[("a", "dma", 2e-3, 1)] = res_dead[("a", "dma", 4e-3, 1)] = float("inf")
    c = ladder.choose_lr(S(), "a", ["mha", "dma"], res_dead)
    check(c["lr"] == {"mha": 2e-3, "dma": None}, f"a variant whose every lr diverged waits, the others go on (got {c['lr']})")
    cs = [1e15, 3e15, 1e16, 3e16, 1e17]
    ls = [40.0 * x ** -0.1 + 1.5 for x in cs]
    a_, alpha, e, rms = ladder.fit_power_law(cs, ls)
    check(abs(alpha - 0.1) < 2e-3 and abs(e - 1.5) < 2e-2 and rms < 1e-3, f"fit recovers α 0.1, e 1.5 (got {alpha:.4f}, {e:.4f})")
    check(ladder.fit_power_law(cs[:2], ls[:2]) is None, "no fit from two sizes")


if __name__ == "__main__":
    sys.exit(main())
