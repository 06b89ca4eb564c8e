#!/usr/bin/env python3
"""The Chinchilla ladder: attention variants × model sizes at ~20 tokens per parameter.

    ladder.py plan    [options]   every run: variant, size, seed, lr, steps, tokens, FLOPs, minutes, command
    ladder.py run     [options]   launch the runs in order, skipping finished ones, resuming partial ones
    ladder.py gather  [options]   one row per finished run into RESULTS/runs.csv
    ladder.py report  [options]   RESULTS/README.md (tables, lr choice, fits) and PNG plots
    ladder.py check-corpus MANIFEST (--expect FILE | --record FILE)

A ladder is described by a spec (configs/ladder/ladder.json; configs/ladder/README.md explains it):
sizes, variants, the learning-rate sweep, seeds, where runs and results go, the corpus, and the
throughput figures the time estimates rest on. Run it from the repository root.

Contracts:
- Within a size, variants differ in model.attention (and run.name / run.dir) only: every config is
  resolved by `dmatrain info --json` before anything is planned, and a size whose variants differ in
  anything else is refused. A variant whose config `dmatrain info` rejects for its model.attention is
  "not yet available" (listed, not planned); so is one the CUDA backend cannot run yet (info's
  cuda_unsupported) when the runs would train on a GPU; any other config error is an error.
- A run is finished when its record exists: RESULTS/runs/<size>/<variant>/lr<lr>-s<seed>/record.json
  with its metrics.jsonl and config.json beside it (committed results; small files only). The launcher
  writes the record when the trainer has reached the last step, its final checkpoint is complete and
  metrics.jsonl holds the final validation loss. Finished runs are never launched again.
- Run directories (RUNS/<run id>) are created by this launcher, which marks them with ladder.json; a
  directory without that mark, or whose mark or saved config describe another run, is refused, never
  overwritten. A partial run continues with `dmatrain train --resume` (bit-exact, README.md).
- Time slicing: with a budget (--max-minutes / --budget-s), a run that would not finish in time is
  launched with --stop-at (a step estimated to end before the deadline) and continues in a later call;
  at the deadline the children get SIGTERM (the trainer writes a checkpoint and stops).
Only the Python standard library is needed, except `report`, which needs matplotlib.
"""
import argparse
import csv
import fnmatch
import functools
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

CSV_COLUMNS = ["variant", "size", "seed", "lr", "status", "params", "non_embedding_params", "tokens", "flops",
               "val_loss", "ppl", "tokens_per_s", "wall_s", "steps", "gpus", "device", "commit", "command",
               "corpus_manifest_sha256", "run_id"]
KEEP_BEGIN, KEEP_END = "<!-- keep -->", "<!-- /keep -->"


class LadderError(Exception):
    """A problem the user can act on; printed as one `error: ...` line, exit code 1."""


# ---------------------------------------------------------------------------------------------
# small helpers


def load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LadderError(f"{what} {path} does not exist")
    except json.JSONDecodeError as e:
        raise LadderError(f"{what} {path} is not valid JSON: {e}")


def write_text_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_jsonl(path):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill; the trainer rewrites metrics from the checkpoint on resume
    return rows


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fmt_lr(lr):
    return format(lr, "g")


def human(x):
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a, b, ignore):
    """Dotted keys whose values differ between two resolved configs, minus those under `ignore`."""
    fa, fb = flat(a), flat(b)
    keys = sorted(set(fa) | set(fb))
    skip = lambda k: any(k == i or k.startswith(i + ".") for i in ignore)
    return [(k, fa.get(k, "<absent>"), fb.get(k, "<absent>")) for k in keys if not skip(k) and fa.get(k) != fb.get(k)]


# ---------------------------------------------------------------------------------------------
# the spec

SPEC_KEYS = {"comment", "name", "sizes", "variants", "config", "lr_sweep", "lr_choice", "seeds", "positions_sizes",
             "runs_dir", "results_dir", "corpus", "estimate"}


class Spec:
    def __init__(self, path):
        self.path = path
        self.dir = os.path.dirname(path)  # relative paths stay relative: commands must work in another checkout
        j = load_json(path, "ladder spec")
        if not isinstance(j, dict):
            raise LadderError(f"ladder spec {path} must be a JSON object")
        unknown = set(j) - SPEC_KEYS
        if unknown:
            raise LadderError(f"ladder spec {path}: unknown key(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(SPEC_KEYS))})")

        kind_names = {list: "list", dict: "object", str: "string"}

        def need(key, kind, where=j, name=None):
            name = name or key
            if key not in where:
                raise LadderError(f"ladder spec {path}: {name} is required")
            v = where[key]
            if not isinstance(v, kind):
                raise LadderError(f"ladder spec {path}: {name} must be a JSON {kind_names[kind]} (got {json.dumps(v)})")
            return v

        self.name = j.get("name", "ladder")
        self.sizes = need("sizes", list)
        self.variants = need("variants", list)
        if not self.sizes or not self.variants or len(set(self.sizes)) != len(self.sizes) or len(set(self.variants)) != len(self.variants):
            raise LadderError(f"ladder spec {path}: sizes and variants must be non-empty lists without repeats")
        if self.variants[0] != "mha":
            raise LadderError(f"ladder spec {path}: the first variant must be mha, the reference every other variant is compared with (got {self.variants[0]})")
        cfg = need("config", dict)
        self.config_patterns = {"mha": need("mha", str, cfg, "config.mha"), "default": need("default", str, cfg, "config.default")}
        sweep = need("lr_sweep", dict)
        self.lrs = [float(x) for x in need("values", list, sweep, "lr_sweep.values")]
        if len(self.lrs) < 1 or any(not (x > 0) for x in self.lrs):
            raise LadderError(f"ladder spec {path}: lr_sweep.values must be positive numbers")
        self.lrs.sort()
        self.sweep_sizes = need("sizes", list, sweep, "lr_sweep.sizes")
        for s in self.sweep_sizes:
            if s not in self.sizes:
                raise LadderError(f"ladder spec {path}: lr_sweep.sizes names {s}, which is not in sizes")
        choice = need("lr_choice", dict)
        self.lr_rule = need("rule", str, choice, "lr_choice.rule")
        if self.lr_rule not in ("shared_if_fair", "per_variant"):
            raise LadderError(f"ladder spec {path}: lr_choice.rule must be shared_if_fair or per_variant (got {self.lr_rule})")
        self.lr_tolerance = float(choice.get("tolerance_nats", 0.0))
        seeds = need("seeds", dict)
        self.seeds = {}
        for k, v in seeds.items():
            if k != "default" and k not in self.sizes:
                raise LadderError(f"ladder spec {path}: seeds names {k}, which is not a size (or \"default\")")
            if not isinstance(v, list) or not v or not all(isinstance(x, int) for x in v):
                raise LadderError(f"ladder spec {path}: seeds.{k} must be a non-empty list of integers")
            self.seeds[k] = v
        if "default" not in self.seeds:
            raise LadderError(f"ladder spec {path}: seeds.default is required")
        self.positions_sizes = j.get("positions_sizes", [])
        for s in self.positions_sizes:
            if s not in self.sizes:
                raise LadderError(f"ladder spec {path}: positions_sizes names {s}, which is not in sizes")
        self.runs_dir = need("runs_dir", str)
        self.results_dir = need("results_dir", str)
        corpus = need("corpus", dict)
        self.corpus_dir = need("dir", str, corpus, "corpus.dir")
        self.expect_manifest = corpus.get("expect_manifest")
        est = need("estimate", dict)
        self.est_device = est.get("device", "the reference device")
        self.references = need("references", list, est, "estimate.references")
        self.variant_speed = est.get("variant_speed", {})
        self.overhead_s = float(est.get("overhead_s", 0))
        if not self.references:
            raise LadderError(f"ladder spec {path}: estimate.references needs at least one measured throughput")

    def seeds_for(self, size):
        return self.seeds.get(size, self.seeds["default"])

    def config_path(self, size, variant):
        pat = self.config_patterns["mha" if variant == "mha" else "default"]
        return os.path.normpath(os.path.join(self.dir, pat.format(size=size, variant=variant)))

    def sweep_size_for(self, size):
        """The swept size whose lr choice `size` uses: the largest swept size not after it, else None."""
        chosen = None
        for s in self.sizes:
            if s in self.sweep_sizes:
                chosen = s
            if s == size:
                return chosen
        return chosen


# ---------------------------------------------------------------------------------------------
# dmatrain


class Dmatrain:
    def __init__(self, path):
        self.path = path
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise LadderError(f"dmatrain binary {path} not found or not executable (build it, or pass --dmatrain PATH)")
        self._positions = None

    def info(self, config, sets=()):
        """(resolved info dict, None) or (None, the error line)."""
        cmd = [self.path, "info", config, "--json"]
        for s in sets:
            cmd += ["--set", s]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            err = (p.stderr.strip() or p.stdout.strip()).splitlines()
            return None, err[-1] if err else f"exit code {p.returncode}"
        try:
            return json.loads(p.stdout), None
        except json.JSONDecodeError:
            raise LadderError(f"{self.path} info --json printed no JSON: is the binary older than the ladder (it needs info --json)?")

    def has_positions(self):
        if self._positions is None:
            p = subprocess.run([self.path, "eval", "--help"], capture_output=True, text=True)
            self._positions = "--positions" in (p.stdout + p.stderr)
        return self._positions


@functools.lru_cache(maxsize=None)
def gpu_visible():
    """True when nvidia-smi lists a GPU (runs with run.device auto then train on CUDA)."""
    try:
        p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    except OSError:
        return False
    return p.returncode == 0 and "GPU" in p.stdout


def cuda_refusal(info):
    """The reason `dmatrain info` gives why the CUDA backend cannot run a config (None: it can, or the
    run will not be on CUDA): such a variant is not available on this machine."""
    why = info.get("cuda_unsupported")
    device = info["config"].get("run", {}).get("device", "auto")
    if not why or device == "cpu" or (device == "auto" and not gpu_visible()):
        return None
    return why


def attention_error(err):
    """True when `dmatrain info` refused a config for its attention settings (a variant not built yet)."""
    return "model.attention" in err


# ---------------------------------------------------------------------------------------------
# resolving the ladder: every config of every size, the equivalence check, the estimates


class Rung:
    def __init__(self, size, variant, config, info, unavailable):
        self.size, self.variant, self.config, self.info, self.unavailable = size, variant, config, info, unavailable


def data_sets(data_dir):
    return [f"data.train={os.path.join(data_dir, 'train')}", f"data.val={os.path.join(data_dir, 'val')}"]


def resolve(spec, dm, data_dir):
    """{size: {variant: Rung}}; refuses sizes whose variants differ in more than model.attention."""
    rungs = {}
    for size in spec.sizes:
        rungs[size] = {}
        for v in spec.variants:
            path = spec.config_path(size, v)
            if not os.path.exists(path):
                raise LadderError(f"config {path} (size {size}, variant {v}) does not exist")
            info, err = dm.info(path, data_sets(data_dir))
            if info is None:
                if v == "mha" or not attention_error(err):
                    raise LadderError(f"config {path} (size {size}, variant {v}) is invalid: {err}")
                rungs[size][v] = Rung(size, v, path, None, err)
                continue
            got = info["config"]["model"]["attention"]["type"]
            if got != v:
                raise LadderError(f"config {path} is listed as variant {v} but its model.attention.type is {got}")
            why_not_here = cuda_refusal(info)
            if why_not_here:
                if v == "mha":
                    raise LadderError(f"config {path} (size {size}, variant mha) cannot run on this GPU: {why_not_here}")
                rungs[size][v] = Rung(size, v, path, None, why_not_here)
                continue
            rungs[size][v] = Rung(size, v, path, info, None)
        ref = rungs[size]["mha"]
        for v, r in rungs[size].items():
            if v == "mha" or r.info is None:
                continue
            diff = config_differences(ref.info["config"], r.info["config"], ["model.attention", "run.name", "run.dir"])
            if diff:
                shown = "; ".join(f"{k}: {a} in {os.path.basename(ref.config)}, {b} in {os.path.basename(r.config)}"
                                  for k, a, b in diff[:6])
                raise LadderError(f"size {size}: variant {v} differs from mha in more than model.attention ({shown}): "
                                  f"a comparison within a size must change the attention alone")
    return rungs


class Estimator:
    """Tokens/s of a rung on the spec's device: the executed-matmul FLOP rate of the measured reference
    configs, interpolated log-linearly in FLOPs per token (held constant outside the references), times
    the variant's speed relative to mha."""

    def __init__(self, spec, dm):
        self.points = []
        for ref in spec.references:
            path = os.path.normpath(os.path.join(spec.dir, ref["config"]))
            info, err = dm.info(path)
            if info is None:
                raise LadderError(f"estimate.references: config {path}: {err}")
            f = info["flops_per_token"]["executed_matmuls"]
            self.points.append((f, float(ref["tokens_per_s"]) * f))
        self.points.sort()
        self.variant_speed = spec.variant_speed
        self.overhead_s = spec.overhead_s

    def tokens_per_s(self, mha_info, variant):
        """Estimated tokens/s of `variant` at the size whose mha config resolved to `mha_info`."""
        f = mha_info["flops_per_token"]["executed_matmuls"]
        pts = self.points
        if f <= pts[0][0]:
            rate = pts[0][1]
        elif f >= pts[-1][0]:
            rate = pts[-1][1]
        else:
            for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
                if f0 <= f <= f1:
                    t = (math.log(f) - math.log(f0)) / (math.log(f1) - math.log(f0))
                    rate = math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
                    break
        return rate / f * float(self.variant_speed.get(variant, 1.0))


# ---------------------------------------------------------------------------------------------
# records (the committed results of finished runs)


def record_dir(results_dir, run_id):
    return os.path.join(results_dir, "runs", run_id)


def load_records(results_dir):
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "runs", "**", "record.json"), recursive=True)):
        rows.append(load_json(path, "run record"))
    return rows


# ---------------------------------------------------------------------------------------------
# the learning-rate choice


def choose_lr(spec, size, variants, results):
    """The lr rule at swept size `size` over `variants` (those available), from sweep results.

    results: {(size, variant, lr, seed): val_loss or inf (diverged)}. Each variant's sweep is its runs at
    every lr of lr_sweep.values with the first seed of the size. Rule "per_variant": each variant takes
    the lr of its lowest validation loss. Rule "shared_if_fair": once every available variant's sweep is
    complete, the shared candidate is the lr that minimises the largest regret (loss at that lr minus the
    variant's best loss) over variants; it is used by all when that regret is ≤ tolerance_nats, else each
    variant takes its own best. Returns {"lr": {variant: lr or None}, "mode", "lines": [text]}."""
    seed = spec.seeds_for(size)[0]
    table, best = {}, {}
    for v in variants:
        losses = {lr: results.get((size, v, lr, seed)) for lr in spec.lrs}
        if all(x is not None for x in losses.values()):
            table[v] = losses
            lr_best = min(spec.lrs, key=lambda lr: (losses[lr], lr))
            best[v] = lr_best
    lines, out = [], {v: None for v in variants}
    failed = [v for v in best if math.isinf(table[v][best[v]])]
    for v in failed:
        lines.append(f"{v}: every lr of the sweep at {size} diverged: lower lr_sweep.values (its later runs wait)")
        del best[v], table[v]
    variants = [v for v in variants if v not in failed]
    pending = [v for v in variants if v not in table]
    for v in best:
        if best[v] in (spec.lrs[0], spec.lrs[-1]) and len(spec.lrs) > 1:
            lines.append(f"warning: {v}'s best lr at {size} ({fmt_lr(best[v])}) is at the edge of the sweep: extend lr_sweep.values")
    if spec.lr_rule == "per_variant":
        for v in best:
            out[v] = best[v]
            lines.append(f"{v}: lr {fmt_lr(best[v])} (its best at {size}, val loss {table[v][best[v]]:.4f})")
        mode = "per_variant"
    elif pending or not variants:
        mode = "pending"
        lines.append(f"shared_if_fair: waiting for the sweep at {size} of {', '.join(pending)}")
    else:
        regret = {lr: max(table[v][lr] - table[v][best[v]] for v in variants) for lr in spec.lrs}
        shared = min(spec.lrs, key=lambda lr: (regret[lr], lr))
        if regret[shared] <= spec.lr_tolerance:
            mode = "shared"
            for v in variants:
                out[v] = shared
            lines.append(f"shared lr {fmt_lr(shared)}: every variant's loss there is at most {regret[shared]:.4f} nats above its own best "
                         f"at {size} (tolerance {spec.lr_tolerance} nats)")
        else:
            mode = "per_variant"
            for v in variants:
                out[v] = best[v]
            lines.append(f"per-variant lr: the best shared lr {fmt_lr(shared)} costs one variant {regret[shared]:.4f} nats at {size} "
                         f"(tolerance {spec.lr_tolerance}); " + ", ".join(f"{v} {fmt_lr(best[v])}" for v in variants))
    for v in pending:
        if spec.lr_rule == "per_variant":
            lines.append(f"{v}: waiting for its sweep at {size}")
    return {"lr": out, "mode": mode, "lines": lines, "table": table, "best": best}


def results_from_records(records):
    res = {}
    for r in records:
        loss = r.get("val_loss")
        key = (r["size"], r["variant"], float(r["lr"]), int(r["seed"]))
        res[key] = float("inf") if r.get("status") == "diverged" or loss is None else float(loss)
    return res


# ---------------------------------------------------------------------------------------------
# the plan


class Run:
    def __init__(self, size, variant, lr, seed, rung, kind):
        self.size, self.variant, self.lr, self.seed, self.rung, self.kind = size, variant, lr, seed, rung, kind
        self.run_id = f"{size}/{variant}/lr{fmt_lr(lr) if lr is not None else '?'}-s{seed}"
        self.status, self.step, self.blocked = "todo", 0, None
        self.cmd = []
        self.est_s = 0.0

    @property
    def steps(self):
        return self.rung.info["config"]["train"]["steps"]

    @property
    def tokens(self):
        return self.rung.info["tokens"]


class Plan:
    """runs (launch order), choices ({swept size: choose_lr result}), unavailable ({variant: why}), records."""


def newest_checkpoint(run_dir):
    best = None
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")):
        m = re.fullmatch(r"step_(\d{8,18})", os.path.basename(p))
        if m and os.path.exists(os.path.join(p, "COMPLETE")):
            s = int(m.group(1))
            best = s if best is None or s > best else best
    return best


def run_dir_finished(run_dir, steps):
    if newest_checkpoint(run_dir) != steps:
        return None
    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "val_loss" in r and r.get("step") == steps]
    return rows[-1] if rows else None


def train_command(args, run, run_dir):
    """(argv, the --set overrides): the run's canonical command, without --resume / --stop-at."""
    sets = [f"train.lr={fmt_lr(run.lr)}", f"train.seed={run.seed}"] + data_sets(args.data)
    tc = run.rung.info["config"]["train"]
    if args.gpus > 1:
        if tc["batch_size"] % args.gpus:
            raise LadderError(f"--gpus {args.gpus}: {run.rung.config} has train.batch_size {tc['batch_size']}, not divisible "
                              f"by the number of ranks (the global batch must stay {tc['batch_size']} x {tc['grad_accum']} sequences)")
        sets.append(f"train.batch_size={tc['batch_size'] // args.gpus}")
    cmd = [args.dmatrain, "train", run.rung.config]
    for s in sets:
        cmd += ["--set", s]
    cmd += ["--out", run_dir]
    if args.gpus > 1:
        mpi = ["mpirun", "-np", str(args.gpus)]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            mpi.append("--allow-run-as-root")
        cmd = mpi + cmd
    return cmd, sets


def expected_config(dm, run):
    info, err = dm.info(run.rung.config, run.sets)
    if info is None:
        raise LadderError(f"{run.run_id}: {err}")
    return info["config"]


def make_plan(spec, args, dm, rungs, est):
    """Every run of the ladder in launch order, each with its status read from the records and run dirs."""
    records = load_records(args.results)
    results = results_from_records(records)
    recorded = {r["run_id"]: r for r in records}
    available = {size: [v for v in spec.variants if rungs[size][v].info is not None] for size in spec.sizes}
    plan = Plan()
    plan.runs, plan.choices, plan.unavailable = [], {}, {}
    for size in spec.sizes:
        for v in spec.variants:
            if rungs[size][v].info is None:
                plan.unavailable.setdefault(v, rungs[size][v].unavailable)
    for s in spec.sweep_sizes:
        plan.choices[s] = choose_lr(spec, s, available[s], results)
    seen = set()

    def add(run):
        if run.run_id in seen:
            return
        seen.add(run.run_id)
        plan.runs.append(run)

    for size in spec.sizes:
        seeds = spec.seeds_for(size)
        if size in spec.sweep_sizes:
            for v in available[size]:
                for lr in spec.lrs:
                    add(Run(size, v, lr, seeds[0], rungs[size][v], "sweep"))
        src = spec.sweep_size_for(size)
        for v in available[size]:
            if src is None:
                lr = rungs[size][v].info["config"]["train"]["lr"]
                blocked = None
            else:
                lr = plan.choices[src]["lr"].get(v)
                blocked = None if lr is not None else f"waiting for the lr choice at {src}"
            for seed in seeds:
                if blocked and size in spec.sweep_sizes and seed == seeds[0]:
                    continue  # will be one of the sweep's runs, whichever lr is chosen
                r = Run(size, v, lr, seed, rungs[size][v], "seed")
                r.blocked = blocked
                add(r)
    for r in plan.runs:
        r.overhead_s = est.overhead_s
        r.est_s = r.tokens / est.tokens_per_s(rungs[r.size]["mha"].info, r.variant) + est.overhead_s
        r.run_dir = os.path.join(args.runs, r.run_id)
        if r.blocked:
            r.status = "blocked"
            continue
        r.cmd, r.sets = train_command(args, r, r.run_dir)
        rec = recorded.get(r.run_id)
        if rec:
            r.status = rec.get("status", "finished")
            continue
        if os.path.isdir(r.run_dir):
            if run_dir_finished(r.run_dir, r.steps):
                r.status = "unrecorded"
            else:
                r.step = newest_checkpoint(r.run_dir) or 0
                r.status = "partial"
    plan.records = records
    return plan


def corpus_train_tokens(spec, data_dir):
    for path in (os.path.join(data_dir, "manifest.json"), spec.expect_manifest):
        if path and os.path.exists(path):
            try:
                return load_json(path, "corpus manifest")["train"]["tokens"], path
            except (KeyError, TypeError):
                pass
    return None, None


# ---------------------------------------------------------------------------------------------
# corpus check


def manifest_shards(m, path):
    try:
        out = {"tokenizer": m["tokenizer"]["hash"]}
        for part in ("train", "val"):
            out[part + ".tokens"] = m[part]["tokens"]
            for s in m[part]["shards"]:
                out[s["file"]] = f"{s['tokens']} tokens, fnv1a64 {s['fnv1a64']}"
        return out
    except (KeyError, TypeError) as e:
        raise LadderError(f"corpus manifest {path} lacks {e} (is it a manifest written by dmatrain data prepare?)")


def check_corpus(manifest, expect):
    """Raises LadderError naming the first difference between the shards of two manifests."""
    got = manifest_shards(load_json(manifest, "corpus manifest"), manifest)
    want = manifest_shards(load_json(expect, "committed corpus manifest"), expect)
    keys = list(want) + [k for k in got if k not in want]  # tokenizer, totals, then shard by shard
    diff = [k for k in keys if got.get(k) != want.get(k)]
    if diff:
        k = diff[0]
        raise LadderError(
            f"corpus {manifest} differs from the committed manifest {expect} in {len(diff)} entr"
            f"{'y' if len(diff) == 1 else 'ies'}; first {k}: {got.get(k, '<absent>')}, expected "
            f"{want.get(k, '<absent>')}. The shards are not the ones the ladder's results were made with "
            f"(other source trees, tokenizer or recipe): re-create them with scripts/data/ladder_corpus.sh, or, if "
            f"this corpus is the new reference, record it with --record into a new file and point the spec at it")


def cmd_check_corpus(args):
    if bool(args.expect) == bool(args.record):
        raise LadderError("check-corpus needs exactly one of --expect FILE or --record FILE")
    if args.record:
        if os.path.exists(args.record):
            raise LadderError(f"--record {args.record}: the file exists; it is not overwritten (remove it first if it is stale)")
        manifest_shards(load_json(args.manifest, "corpus manifest"), args.manifest)
        shutil.copyfile(args.manifest, args.record)
        print(f"recorded {args.manifest} as {args.record} (sha256 {sha256_file(args.record)})")
        return 0
    check_corpus(args.manifest, args.expect)
    print(f"corpus {args.manifest}: every shard matches {args.expect}")
    return 0


# ---------------------------------------------------------------------------------------------
# plan


def load_ladder(args):
    spec = Spec(args.spec)
    args.runs = args.runs or spec.runs_dir
    args.results = args.results or spec.results_dir
    args.data = args.data or spec.corpus_dir
    dm = Dmatrain(args.dmatrain)
    rungs = resolve(spec, dm, args.data)
    est = Estimator(spec, dm)
    return spec, dm, rungs, est


def selected(args, run):
    return not args.only or any(fnmatch.fnmatch(run.run_id, p) for p in args.only)


def cmd_plan(args):
    spec, dm, rungs, est = load_ladder(args)
    plan = make_plan(spec, args, dm, rungs, est)
    runs = [r for r in plan.runs if selected(args, r)]
    train_tokens, corpus_src = corpus_train_tokens(spec, args.data)
    if args.json:
        print(json.dumps({
            "unavailable": plan.unavailable,
            "choices": {s: {"lr": c["lr"], "mode": c["mode"], "lines": c["lines"]} for s, c in plan.choices.items()},
            "runs": [{"run_id": r.run_id, "variant": r.variant, "size": r.size, "lr": r.lr, "seed": r.seed, "kind": r.kind,
                      "status": r.status, "step": r.step, "steps": r.steps if r.rung.info else None, "tokens": r.tokens,
                      "flops": r.tokens * r.rung.info["flops_per_token"]["executed_matmuls"], "est_s": r.est_s,
                      "command": shlex.join(r.cmd) if r.cmd else None, "blocked": r.blocked} for r in runs]}, indent=1))
        return 0
    print(f"ladder {spec.name}: spec {args.spec}, binary {args.dmatrain}, data {args.data}, runs {args.runs}, results {args.results}")
    avail = [v for v in spec.variants if v not in plan.unavailable]
    print(f"variants planned: {', '.join(avail)}")
    for v, why in plan.unavailable.items():
        print(f"not yet available: {v} ({why})")
    print()
    print(f"sizes (estimates: one {spec.est_device}; tokens/s interpolated from measured references, see the spec):")
    hdr = f"{'size':<10}{'non-emb':>10}{'total':>9}{'steps':>7}{'tokens':>9}{'tok/param':>10}{'epochs':>7}{'FLOP/tok':>10}{'est tok/s':>11}{'est min':>8}"
    print(hdr)
    for size in spec.sizes:
        info = rungs[size]["mha"].info
        p, tok = info["params"], info["tokens"]
        tps = est.tokens_per_s(info, "mha")
        ep = f"{tok / train_tokens:.2f}" if train_tokens else "?"
        print(f"{size:<10}{human(p['non_embedding']):>10}{human(p['total']):>9}{info['config']['train']['steps']:>7}"
              f"{human(tok):>9}{tok / p['non_embedding']:>10.1f}{ep:>7}{info['flops_per_token']['executed_matmuls']:>10.3g}"
              f"{human(tps):>11}{(tok / tps + est.overhead_s) / 60:>8.1f}")
    if train_tokens:
        print(f"(epochs: tokens / {train_tokens:,} training tokens of {corpus_src})")
    print()
    for s, c in plan.choices.items():
        print(f"lr choice at {s} (rule {spec.lr_rule}; sweep {', '.join(fmt_lr(x) for x in spec.lrs)}, seed {spec.seeds_for(s)[0]}):")
        for line in c["lines"] or ["no sweep results yet"]:
            print(f"  {line}")
    print()
    print(f"{'run':<28}{'kind':<6}{'status':<14}{'steps':>6}{'tokens':>9}{'FLOPs':>10}{'est min':>8}")
    for r in runs:
        st = f"partial {r.step}" if r.status == "partial" else r.status
        print(f"{r.run_id:<28}{r.kind:<6}{st:<14}{r.steps:>6}{human(r.tokens):>9}"
              f"{r.tokens * r.rung.info['flops_per_token']['executed_matmuls']:>10.3g}{r.est_s / 60:>8.1f}")
        print(f"    {shlex.join(r.cmd) if r.cmd else '(' + r.blocked + ')'}")
    todo = [r for r in runs if r.status in ("todo", "partial", "blocked")]
    left = sum(r.est_s * (1 - r.step / r.steps) for r in todo)
    print()
    print(f"{len(runs)} runs: {sum(r.status in ('finished', 'diverged', 'unrecorded') for r in runs)} done, "
          f"{sum(r.status == 'partial' for r in runs)} partial, {sum(r.status == 'todo' for r in runs)} to do, "
          f"{sum(r.status == 'blocked' for r in runs)} waiting for an lr choice; estimated device time: "
          f"{sum(r.est_s for r in runs) / 60:.1f} min in all, {left / 60:.1f} min left (one GPU, one run at a time)")
    return 0


# ---------------------------------------------------------------------------------------------
# run


def git_commit(args):
    if args.commit:
        return args.commit
    if os.environ.get("DMAT_COMMIT"):
        return os.environ["DMAT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def global_batch(cfg, ranks):
    t = cfg["train"]
    return t["batch_size"] * t["grad_accum"] * ranks


def check_run_dir(run, args, expected_cfg, corpus_sha):
    """Refuses a run directory that this launcher did not create or that holds another run."""
    mark_path = os.path.join(run.run_dir, "ladder.json")
    if not os.path.exists(mark_path):
        raise LadderError(f"run directory {run.run_dir} exists but was not created by scripts/ladder.py (no ladder.json): "
                          f"it is not touched; move it away, or pass --runs DIR to use another runs directory")
    mark = load_json(mark_path, "run mark")
    for key, want in (("run_id", run.run_id), ("lr", run.lr), ("seed", run.seed), ("corpus_manifest_sha256", corpus_sha)):
        if mark.get(key) != want:
            raise LadderError(f"run directory {run.run_dir} holds another run: its ladder.json has {key} = {mark.get(key)}, "
                              f"this run has {want}; it is not touched (move it away to run this one)")
    saved = os.path.join(run.run_dir, "config.json")
    if os.path.exists(saved):
        cfg = load_json(saved, "saved config")
        diff = config_differences(cfg, expected_cfg, ["data", "run", "train.batch_size", "train.grad_accum"])
        if global_batch(cfg, mark["launches"][-1]["gpus"]) != global_batch(expected_cfg, args.gpus):
            diff.append(("global batch (batch_size x grad_accum x ranks)", global_batch(cfg, mark["launches"][-1]["gpus"]),
                         global_batch(expected_cfg, args.gpus)))
        if diff:
            shown = "; ".join(f"{k}: {a} there, {b} now" for k, a, b in diff[:6])
            raise LadderError(f"run directory {run.run_dir} holds a run of another config ({shown}); it is not touched")
    return mark


def median_tokens_per_s(rows):
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r.get("step", 0) > 1]
    return statistics.median(tps) if tps else None


def seconds_per_step(run, plan_calibration):
    """Seconds per optimizer step on this machine, evaluations included: the run's own metrics when it has
    any, else the planned estimate times the measured/planned ratio of finished runs here."""
    rows = read_jsonl(os.path.join(run.run_dir, "metrics.jsonl"))
    last = [r for r in rows if "time" in r and r.get("step", 0) > 0]
    if last and last[-1]["step"] >= 5:
        return last[-1]["time"] / last[-1]["step"]
    return (run.est_s - run.overhead_s) / run.steps * plan_calibration


def calibration(plan):
    """Median over finished records of (measured seconds per step) / (planned seconds per step)."""
    ratios = []
    for r in plan.runs:
        rec = next((x for x in plan.records if x.get("run_id") == r.run_id), None)
        if rec and rec.get("status") == "finished" and rec.get("wall_s") and r.est_s > 0:
            ratios.append(rec["wall_s"] / max(r.est_s - r.overhead_s, 1e-9))
    return statistics.median(ratios) if ratios else 1.0


def write_record(run, args, dm, corpus_sha, status, final_row=None, error=None):
    """The committed record of a finished (or diverged) run: record.json, metrics.jsonl, config.json and,
    where measured, positions.csv. Written into a temporary folder and renamed: a record is whole or absent."""
    dest = record_dir(args.results, run.run_id)
    if os.path.exists(dest):
        raise LadderError(f"record {dest} exists already; it is not overwritten")
    mark = load_json(os.path.join(run.run_dir, "ladder.json"), "run mark")
    rows = read_jsonl(os.path.join(run.run_dir, "metrics.jsonl"))
    info = run.rung.info
    device = None
    log = os.path.join(run.run_dir, "train.log")
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            for line in f:
                m = re.search(r"backend: (.*)$", line)
                if m:
                    device = m.group(1).strip()
    tokens = final_row["tokens"] if final_row else None
    f_exec = info["flops_per_token"]["executed_matmuls"]
    rec = {
        "run_id": run.run_id, "variant": run.variant, "size": run.size, "seed": run.seed, "lr": run.lr, "status": status,
        "params": info["params"]["total"], "non_embedding_params": info["params"]["non_embedding"],
        "steps": run.steps, "tokens": tokens, "flops_per_token": f_exec,
        "flops": tokens * f_exec if tokens is not None else None,
        "val_loss": final_row["val_loss"] if final_row else None, "ppl": final_row["ppl"] if final_row else None,
        "tokens_per_s": median_tokens_per_s(rows), "wall_s": final_row["time"] if final_row else None,
        "gpus": mark["launches"][-1]["gpus"], "device": device,
        "commit": "+".join(dict.fromkeys(l["commit"] for l in mark["launches"])),
        "command": mark["command"], "config": os.path.relpath(run.rung.config),
        "corpus_manifest_sha256": corpus_sha, "error": error,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = dest + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for name in ("metrics.jsonl", "config.json", "positions.csv"):
        src = os.path.join(run.run_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(tmp, name))
    with open(os.path.join(tmp, "record.json"), "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    os.replace(tmp, dest)
    return rec


def finalize(run, args, dm, spec, corpus_sha):
    """A run whose trainer reached the end: loss by position where wanted and possible, then its record."""
    final = run_dir_finished(run.run_dir, run.steps)
    pos = os.path.join(run.run_dir, "positions.csv")
    if run.size in spec.positions_sizes and not os.path.exists(pos):
        if dm.has_positions():
            p = subprocess.run([dm.path, "eval", run.run_dir, "--positions", pos], capture_output=True, text=True)
            if p.returncode != 0:
                print(f"  {run.run_id}: dmatrain eval --positions failed ({(p.stderr or p.stdout).strip().splitlines()[-1:]}); "
                      f"recorded without loss by position", flush=True)
        else:
            print(f"  {run.run_id}: this dmatrain has no eval --positions: recorded without loss by position", flush=True)
    rec = write_record(run, args, dm, corpus_sha, "finished", final)
    print(f"  {run.run_id}: finished, val loss {rec['val_loss']:.4f} (ppl {rec['ppl']:.3f}), "
          f"{human(rec['tokens_per_s'] or 0)} tok/s, record {record_dir(args.results, run.run_id)}", flush=True)


class Child:
    pass


def launch(run, args, commit, corpus_sha, stop_at, slot):
    os.makedirs(os.path.dirname(run.run_dir), exist_ok=True)
    mark_path = os.path.join(run.run_dir, "ladder.json")
    resume = os.path.exists(os.path.join(run.run_dir, "config.json"))
    if os.path.exists(mark_path):
        mark = load_json(mark_path, "run mark")
    else:
        os.makedirs(run.run_dir)
        mark = {"run_id": run.run_id, "variant": run.variant, "size": run.size, "lr": run.lr, "seed": run.seed,
                "config": os.path.relpath(run.rung.config), "command": shlex.join(run.cmd),
                "corpus_manifest_sha256": corpus_sha, "launches": []}
    cmd = list(run.cmd) + (["--resume"] if resume else []) + (["--stop-at", str(stop_at)] if stop_at else [])
    mark["launches"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
                             "gpus": args.gpus, "from_step": run.step, "argv": shlex.join(cmd)})
    write_text_atomic(mark_path, json.dumps(mark, indent=1) + "\n")
    env = dict(os.environ)
    if args.parallel > 1:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * args.gpus + i) for i in range(args.gpus))
    log = open(os.path.join(run.run_dir, "launcher.log"), "a")
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    c = Child()
    c.run, c.slot, c.stop_at, c.log_path, c.terminated = run, slot, stop_at, log.name, False
    # The child stays in the launcher's process group: whatever stops the launcher's group (Ctrl-C, a
    # job scheduler) reaches the trainer too, which checkpoints on SIGINT/SIGTERM; no orphan trains on.
    c.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    c.log = log
    what = f"resume from step {run.step}" if resume else "start"
    print(f"launch {run.run_id} ({what}{f', stop at step {stop_at}' if stop_at else ''}"
          f"{f', GPU slot {slot}' if args.parallel > 1 else ''}): {shlex.join(cmd)}", flush=True)
    return c


def log_tail(path, n=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def cmd_run(args):
    spec, dm, rungs, est = load_ladder(args)
    if args.max_minutes is not None and args.budget_s is not None:
        raise LadderError("give --max-minutes or --budget-s, not both")
    budget = args.budget_s if args.budget_s is not None else (args.max_minutes * 60 if args.max_minutes is not None else None)
    start = time.time()
    deadline = start + budget if budget is not None else None
    manifest = os.path.join(args.data, "manifest.json")
    if not os.path.exists(manifest):
        raise LadderError(f"corpus manifest {manifest} does not exist: prepare the corpus first "
                          f"(scripts/data/ladder_corpus.sh, or --data DIR with DIR/train, DIR/val, DIR/manifest.json)")
    if spec.expect_manifest and not args.no_corpus_check:
        check_corpus(manifest, spec.expect_manifest)
    elif not spec.expect_manifest:
        print(f"note: the spec names no committed corpus manifest: the shards in {args.data} are not checked")
    corpus_sha = sha256_file(manifest)
    commit = git_commit(args)
    children, launched, failed = [], set(), None
    stopping = {"signal": None}

    def on_signal(sig, _frame):
        stopping["signal"] = sig

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    slots = list(range(args.parallel))
    first = make_plan(spec, args, dm, rungs, est)
    done0 = [r for r in first.runs if selected(args, r) and r.status in ("finished", "diverged")]
    if done0:
        print(f"{len(done0)} run(s) already finished (records in {os.path.join(args.results, 'runs')}): skipped")
    while True:
        plan = make_plan(spec, args, dm, rungs, est)
        for r in plan.runs:  # runs the trainer finished while no launcher was watching
            if r.status == "unrecorded" and selected(args, r) and not any(c.run.run_id == r.run_id for c in children):
                check_run_dir(r, args, expected_config(dm, r), corpus_sha)
                finalize(r, args, dm, spec, corpus_sha)
        if any(r.status == "unrecorded" for r in plan.runs if selected(args, r)):
            plan = make_plan(spec, args, dm, rungs, est)
        calib = calibration(plan)
        ready = [r for r in plan.runs if selected(args, r) and r.status in ("todo", "partial") and r.run_id not in launched]
        while ready and slots and failed is None and stopping["signal"] is None:
            r = ready.pop(0)
            stop_at = None
            if args.slice_steps:
                stop_at = r.step + args.slice_steps
            if deadline is not None:
                left = deadline - time.time() - est.overhead_s
                n = int(left / max(seconds_per_step(r, calib), 1e-9))
                if left < args.min_piece_s or n < 1:
                    ready = []
                    break
                stop_at = min(stop_at or 1 << 62, r.step + n)
            if stop_at is not None and stop_at >= r.steps:
                stop_at = None
            if os.path.exists(r.run_dir):
                check_run_dir(r, args, expected_config(dm, r), corpus_sha)
            launched.add(r.run_id)
            children.append(launch(r, args, commit, corpus_sha, stop_at, slots.pop(0)))
        if not children:
            break
        # wait for a child to end; at the deadline or on a signal, ask every child to checkpoint and stop
        while True:
            now = time.time()
            if (stopping["signal"] is not None or (deadline is not None and now >= deadline)):
                for c in children:
                    if c.proc.poll() is None and not c.terminated:
                        c.terminated, c.term_time = True, now
                        c.proc.send_signal(signal.SIGTERM)
                for c in children:
                    if c.terminated and c.proc.poll() is None and now - c.term_time > args.kill_after_s:
                        c.proc.kill()
            done = [c for c in children if c.proc.poll() is not None]
            if done:
                break
            time.sleep(0.2)
        for c in done:
            children.remove(c)
            slots.append(c.slot)
            slots.sort()
            c.log.close()
            rc, r = c.proc.returncode, c.run
            if rc == 0 and run_dir_finished(r.run_dir, r.steps):
                finalize(r, args, dm, spec, corpus_sha)
            elif rc == 0:
                print(f"  {r.run_id}: stopped at step {newest_checkpoint(r.run_dir)} of {r.steps} (continues in a later call)", flush=True)
            elif c.terminated:
                print(f"  {r.run_id}: stopped by {'the budget' if stopping['signal'] is None else 'a signal'} at step "
                      f"{newest_checkpoint(r.run_dir) or 0} of {r.steps} (continues with --resume in a later call)", flush=True)
            elif "training diverged" in log_tail(c.log_path, 5):
                rec = write_record(r, args, dm, corpus_sha, "diverged", error=log_tail(c.log_path, 1).strip())
                print(f"  {r.run_id}: diverged ({rec['error']}); recorded as diverged", flush=True)
            else:
                failed = r
                print(f"  {r.run_id}: dmatrain exited with code {rc}; last lines of {c.log_path}:\n{log_tail(c.log_path)}", flush=True)
        if stopping["signal"] is not None and not children:
            break
    elapsed = time.time() - start
    plan = make_plan(spec, args, dm, rungs, est)
    sel = [r for r in plan.runs if selected(args, r)]
    left = [r for r in sel if r.status not in ("finished", "diverged")]
    print(f"ladder run: {elapsed / 60:.1f} min; {len(sel) - len(left)} of {len(sel)} runs done"
          + (f", {len(left)} left (run again to continue)" if left else ""))
    if failed is not None:
        raise LadderError(f"run {failed.run_id} failed (log: {os.path.join(failed.run_dir, 'launcher.log')}); later runs were not launched")
    if stopping["signal"] is not None:
        return 130
    return 0


# ---------------------------------------------------------------------------------------------
# gather


def csv_row(rec):
    row = {k: rec.get(k) for k in CSV_COLUMNS}
    for k, v in row.items():
        if v is None:
            row[k] = ""
        elif isinstance(v, float) and k in ("val_loss", "ppl"):
            row[k] = repr(v)
    return row


def cmd_gather(args):
    spec = Spec(args.spec)
    args.results = args.results or spec.results_dir
    records = load_records(args.results)
    order = {s: i for i, s in enumerate(spec.sizes)}
    vorder = {v: i for i, v in enumerate(spec.variants)}
    records.sort(key=lambda r: (vorder.get(r["variant"], 99), order.get(r["size"], 99), r["lr"], r["seed"]))
    os.makedirs(args.results, exist_ok=True)
    out = os.path.join(args.results, "runs.csv")
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in records:
            w.writerow(csv_row(r))
    os.replace(tmp, out)
    print(f"gathered {len(records)} runs into {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# report


def read_csv(path):
    if not os.path.exists(path):
        raise LadderError(f"{path} does not exist: run `ladder.py gather` first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in CSV_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise LadderError(f"{path} lacks the column(s) {', '.join(missing)}")
    for r in rows:
        r["lr"] = float(r["lr"])
        r["seed"] = int(r["seed"])
        for k in ("val_loss", "ppl", "flops", "tokens_per_s", "wall_s"):
            r[k] = float(r[k]) if r[k] not in ("", None) else None
        for k in ("params", "non_embedding_params", "tokens"):
            r[k] = int(r[k]) if r[k] not in ("", None) else None
    return rows


def fit_power_law(c, l):
    """Least squares of L = a·C^(−α) + e over (C, L) points: for each e on a grid below min L, a and α from
    a linear fit of log(L − e) on log C; the e with the smallest squared error in L wins, then the grid is
    refined around it. Returns (a, α, e, rms) or None with fewer than 3 points."""
    if len(c) < 3:
        return None
    x = [math.log(v) for v in c]
    lo, hi = 0.0, min(l) * (1 - 1e-9)

    def solve(e):
        y = [math.log(v - e) for v in l]
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxx = sum((xi - mx) ** 2 for xi in x)
        if sxx == 0:
            return None
        b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx
        a = math.exp(my - b * mx)
        sse = sum((a * math.exp(b * xi) + e - li) ** 2 for xi, li in zip(x, l))
        return sse, a, -b, e

    best = None
    for _ in range(4):
        grid = [lo + (hi - lo) * k / 400 for k in range(401)]
        for e in grid:
            if e >= min(l):
                continue
            s = solve(e)
            if s and (best is None or s[0] < best[0]):
                best = s
        step = (hi - lo) / 400
        lo, hi = max(0.0, best[3] - 2 * step), min(min(l) * (1 - 1e-9), best[3] + 2 * step)
    sse, a, alpha, e = best
    return a, alpha, e, math.sqrt(sse / len(c))


def mean_std(xs):
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def cmd_report(args):
    spec = Spec(args.spec)
    args.results = args.results or spec.results_dir
    rows = read_csv(os.path.join(args.results, "runs.csv"))
    variants = [v for v in spec.variants if any(r["variant"] == v for r in rows)]
    sizes = [s for s in spec.sizes if any(r["size"] == s for r in rows)]
    results = {(r["size"], r["variant"], r["lr"], r["seed"]): (r["val_loss"] if r["status"] == "finished" else float("inf"))
               for r in rows}
    choices = {s: choose_lr(spec, s, [v for v in spec.variants if any(r["variant"] == v for r in rows)], results)
               for s in spec.sweep_sizes}

    def chosen_lr(size, v):
        src = spec.sweep_size_for(size)
        return choices[src]["lr"].get(v) if src else None

    def chosen_rows(size, v):
        """Finished runs of (size, v) at the lr the rule chose (any lr where the spec sweeps none)."""
        lr = chosen_lr(size, v)
        if lr is None and spec.sweep_size_for(size) is not None:
            return []
        return [r for r in rows if r["size"] == size and r["variant"] == v and r["status"] == "finished"
                and (lr is None or r["lr"] == lr)]

    out = []
    out.append(f"# Ladder results: {spec.name}\n")
    out.append(f"Written by `scripts/ladder.py report` from `runs.csv` and the run records in `runs/` (spec "
               f"`{os.path.relpath(args.spec)}`); the text between the keep markers is carried over from the previous "
               f"README, everything else is regenerated.\n")
    keep = ""
    readme = os.path.join(args.results, "README.md")
    if os.path.exists(readme):
        with open(readme) as f:
            old = f.read()
        if KEEP_BEGIN in old and KEEP_END in old:
            keep = old[old.index(KEEP_BEGIN) + len(KEEP_BEGIN):old.index(KEEP_END)]
        elif old.strip():
            raise LadderError(f"{readme} exists without the {KEEP_BEGIN} ... {KEEP_END} markers this report keeps "
                              f"text between: it is not overwritten (move it away, or add the markers around the text to keep)")
    out.append(KEEP_BEGIN + (keep if keep else "\n(Conclusions: written by hand, kept across reports.)\n") + KEEP_END + "\n")
    if not rows:
        out.append("No runs yet: `scripts/ladder.py run`, then `gather`.\n")
        write_text_atomic(readme, "\n".join(out) + "\n")
        print(f"wrote {readme} (no runs yet)")
        return 0
    out.append("## Validation loss, variant × size (mean ± std over seeds, at the chosen lr)\n")
    head = "| variant | " + " | ".join(sizes) + " |"
    out.append(head)
    out.append("|" + "---|" * (len(sizes) + 1))
    for v in variants:
        cells = []
        for s in sizes:
            losses = [r["val_loss"] for r in chosen_rows(s, v)]
            m, sd = mean_std(losses)
            if m is None:
                cells.append("–")
            else:
                cells.append(f"{m:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" (n={len(losses)})")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Perplexity (exp of the mean loss) and compute (FLOPs actually executed: tokens × the executed-matmul "
               "FLOPs per token of `dmatrain info`, the attention core counted over the keys each variant visits):\n")
    out.append("| size | non-embedding params | tokens | " + " | ".join(f"{v} ppl / FLOPs" for v in variants) + " |")
    out.append("|" + "---|" * (len(variants) + 3))
    for s in sizes:
        any_row = next((r for r in rows if r["size"] == s and r["status"] == "finished"), None)
        if any_row is None:
            continue
        cells = []
        for v in variants:
            rs = chosen_rows(s, v)
            if rs:
                cells.append(f"{math.exp(statistics.mean(r['val_loss'] for r in rs)):.3f} / {statistics.mean(r['flops'] for r in rs):.3g}")
            else:
                cells.append("–")
        out.append(f"| {s} | {any_row['non_embedding_params']:,} | {human(any_row['tokens'] or 0)} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"## Learning rate (rule `{spec.lr_rule}`, tolerance {spec.lr_tolerance} nats)\n")
    for s, c in choices.items():
        out.append(f"Sweep at {s}, seed {spec.seeds_for(s)[0]}:\n")
        out.append("| variant | " + " | ".join(fmt_lr(x) for x in spec.lrs) + " |")
        out.append("|" + "---|" * (len(spec.lrs) + 1))
        for v in variants:
            cells = []
            for lr in spec.lrs:
                x = results.get((s, v, lr, spec.seeds_for(s)[0]))
                cells.append("–" if x is None else ("diverged" if math.isinf(x) else
                             (f"**{x:.4f}**" if c["best"].get(v) == lr else f"{x:.4f}")))
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
        for line in c["lines"]:
            out.append(f"- {line}")
        out.append("")
    out.append("## Fit of loss against compute: L = a·C^(−α) + e\n")
    out.append("Per variant, over the sizes' mean loss and mean FLOPs at the chosen lr; least squares in L (a grid over e, "
               "then a linear fit of log(L − e) on log C).\n")
    fits = {}
    for v in variants:
        pts = [(statistics.mean(r["flops"] for r in chosen_rows(s, v)), statistics.mean(r["val_loss"] for r in chosen_rows(s, v)))
               for s in sizes if chosen_rows(s, v)]
        fit = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        fits[v] = (pts, fit)
        if fit is None:
            out.append(f"- {v}: fit not possible: {len(pts)} size(s) with results, 3 needed for three parameters")
        else:
            a, alpha, e, rms = fit
            exact = " (3 points, 3 parameters: an exact interpolation, not a test of the form)" if len(pts) == 3 else ""
            out.append(f"- {v}: a = {a:.4g}, α = {alpha:.4f}, e = {e:.4f}, rms residual {rms:.4f} nats over {len(pts)} sizes{exact}")
    out.append("")
    plots = make_plots(spec, args, rows, variants, sizes, chosen_rows, fits, choices)
    out.append("## Plots\n")
    for name, caption in plots:
        out.append(f"![{caption}]({name})\n\n{caption}\n")
    if not any(name == "loss_by_position.png" for name, _ in plots):
        out.append("There is no loss by position yet: no run has a `positions.csv` (`dmatrain eval RUN_DIR --positions "
                   f"FILE`, run by the launcher after each run at {', '.join(spec.positions_sizes) or 'the sizes in positions_sizes'}).\n")
    out.append("## Runs\n")
    out.append(f"{len(rows)} runs in `runs.csv` ({sum(r['status'] == 'finished' for r in rows)} finished, "
               f"{sum(r['status'] == 'diverged' for r in rows)} diverged); each row has the exact command, the commit and the "
               f"corpus manifest's sha256. Devices: {', '.join(sorted(set(r['device'] for r in rows if r['device']))) or 'none recorded'}.\n")
    text = "\n".join(out) + "\n"
    write_text_atomic(readme, text)
    print(f"wrote {readme} and {len(plots)} plot(s)")
    return 0


def make_plots(spec, args, rows, variants, sizes, chosen_rows, fits, choices):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LadderError("report needs matplotlib (Debian: apt-get install python3-matplotlib; run with /usr/bin/python3)")
    made = []
    colors = {v: f"C{i}" for i, v in enumerate(spec.variants)}

    # loss vs compute
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        pts, fit = fits[v]
        if not pts:
            continue
        xs, ys, es = [], [], []
        for s in sizes:
            rs = chosen_rows(s, v)
            if rs:
                xs.append(statistics.mean(r["flops"] for r in rs))
                m, sd = mean_std([r["val_loss"] for r in rs])
                ys.append(m)
                es.append(sd or 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colors[v], label=v)
        if fit:
            a, alpha, e, _ = fit
            lo, hi = math.log(min(xs)), math.log(max(xs))
            cs = [math.exp(lo + (hi - lo) * k / 50) for k in range(51)]
            ax.plot(cs, [a * c ** (-alpha) + e for c in cs], "--", color=colors[v], linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (executed matmuls)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss vs compute (dashed: L = a·C^−α + e)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.results, "loss_vs_compute.png"), dpi=110)
    plt.close(fig)
    made.append(("loss_vs_compute.png", "Validation loss against training FLOPs, mean ± std over seeds, one line per variant."))

    # validation curves: one panel per size, every run at the chosen lr
    n = len(sizes)
    if n:
        cols = min(3, n)
        rws = (n + cols - 1) // cols
        fig, axes = plt.subplots(rws, cols, figsize=(4.5 * cols, 3.4 * rws), squeeze=False)
        for i, s in enumerate(sizes):
            ax = axes[i // cols][i % cols]
            for v in variants:
                first = True
                for r in chosen_rows(s, v):
                    m = read_jsonl(os.path.join(record_dir(args.results, r["run_id"]), "metrics.jsonl"))
                    pts = [(x["tokens"], x["val_loss"]) for x in m if "val_loss" in x]
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[v], alpha=0.8, linewidth=1,
                                label=v if first else None)
                        first = False
            ax.set_title(s)
            ax.set_xlabel("tokens")
            ax.set_ylabel("val loss")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for j in range(n, rws * cols):
            axes[j // cols][j % cols].axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(args.results, "val_curves.png"), dpi=100)
        plt.close(fig)
        made.append(("val_curves.png", "Validation loss during training, every run at the chosen lr (one line per seed)."))

    # lr sweep
    if choices:
        fig, axes = plt.subplots(1, len(choices), figsize=(4.5 * len(choices), 3.4), squeeze=False)
        for ax, (s, c) in zip(axes[0], choices.items()):
            for v, losses in c["table"].items():
                pts = [(lr, x) for lr, x in sorted(losses.items()) if not math.isinf(x)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[v], label=v)
            ax.set_xscale("log")
            ax.set_title(f"lr sweep at {s}")
            ax.set_xlabel("peak lr")
            ax.set_ylabel("val loss")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.results, "lr_sweep.png"), dpi=100)
        plt.close(fig)
        made.append(("lr_sweep.png", "Learning-rate sweep: final validation loss against peak lr (complete sweeps only)."))

    # loss by position at the largest size that has positions
    for s in reversed(sizes):
        series = {}
        for v in variants:
            for r in chosen_rows(s, v):
                path = os.path.join(record_dir(args.results, r["run_id"]), "positions.csv")
                if os.path.exists(path):
                    with open(path, newline="") as f:
                        pr = list(csv.DictReader(f))
                    series.setdefault(v, []).append([float(x["loss"]) for x in sorted(pr, key=lambda x: int(x["position"]))])
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v, runs in series.items():
            T = min(len(x) for x in runs)
            mean = [statistics.mean(x[i] for x in runs) for i in range(T)]
            k = max(1, T // 128)  # a moving average over T/128 positions: single positions are noisy
            sm = [statistics.mean(mean[max(0, i - k + 1):i + 1]) for i in range(T)]
            ax.plot(range(T), sm, color=colors[v], label=f"{v} (n={len(runs)})")
        ax.set_xscale("symlog", linthresh=16)
        ax.set_xlabel("token position")
        ax.set_ylabel("validation loss (moving average)")
        ax.set_title(f"Loss by position at {s}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.results, "loss_by_position.png"), dpi=110)
        plt.close(fig)
        made.append(("loss_by_position.png", f"Validation loss by token position at {s} (mean over seeds, moving average)."))
        break
    else:
        print("note: no run has a positions.csv (dmatrain eval --positions): the loss-by-position plot is skipped")
    return made


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(prog="ladder.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q, binary=True):
        q.add_argument("--spec", default="configs/ladder/ladder.json", help="ladder spec (default %(default)s)")
        q.add_argument("--results", help="results directory (default: the spec's results_dir)")
        if binary:
            q.add_argument("--dmatrain", default="build/dmatrain", help="the dmatrain binary (default %(default)s)")
            q.add_argument("--runs", help="run directories (default: the spec's runs_dir)")
            q.add_argument("--data", help="corpus directory with train/, val/, manifest.json (default: the spec's corpus.dir)")
            q.add_argument("--gpus", type=int, default=1, help="GPUs per run: > 1 runs mpirun -np N, the per-rank batch divided by N")
            q.add_argument("--only", action="append", help="only runs whose id matches this glob (repeatable), e.g. 'd256-l2/*'")

    q = sub.add_parser("plan", help="print every run with its status, estimate and command")
    common(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q = sub.add_parser("run", help="launch the runs in order; skip finished, resume partial ones")
    common(q)
    q.add_argument("--parallel", type=int, default=1, help="independent runs at once, each on its own --gpus GPUs (CUDA_VISIBLE_DEVICES)")
    q.add_argument("--max-minutes", type=float, help="stop launching and slice runs to end within this many minutes")
    q.add_argument("--budget-s", type=float, help="the same budget in seconds")
    q.add_argument("--min-piece-s", type=float, default=60.0, help="with a budget: no launch with less time than this left (default %(default)s)")
    q.add_argument("--kill-after-s", type=float, default=30.0, help="SIGKILL a child this long after its SIGTERM (default %(default)s)")
    q.add_argument("--slice-steps", type=int, help="each launch advances a run by at most this many steps (--stop-at)")
    q.add_argument("--commit", help="the commit to record (default: git rev-parse HEAD, or $DMAT_COMMIT)")
    q.add_argument("--no-corpus-check", action="store_true", help="do not compare the corpus with the committed manifest")
    q = sub.add_parser("gather", help="records -> RESULTS/runs.csv")
    common(q, binary=False)
    q = sub.add_parser("report", help="RESULTS/README.md and plots from runs.csv and the records")
    common(q, binary=False)
    q = sub.add_parser("check-corpus", help="compare a corpus manifest's shards with a committed copy, or record one")
    q.add_argument("manifest")
    q.add_argument("--expect", help="the committed manifest to compare with")
    q.add_argument("--record", help="write MANIFEST to this new file (refuses an existing one)")
    args = p.parse_args(argv)
    if getattr(args, "gpus", 1) < 1 or getattr(args, "parallel", 1) < 1:
        p.error("--gpus and --parallel must be >= 1")
    if getattr(args, "slice_steps", None) is not None and args.slice_steps < 1:
        p.error("--slice-steps must be >= 1")
    try:
        return {"plan": cmd_plan, "run": cmd_run, "gather": cmd_gather, "report": cmd_report,
                "check-corpus": cmd_check_corpus}[args.cmd](args)
    except LadderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
