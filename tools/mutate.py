#!/usr/bin/env python
"""Hand-made mutation pass over local training, the reduction, the strategy base and two methods.

Each mutant replaces one exact snippet of one file (it must occur exactly once) with a wrong
variant (a flipped comparison, a dropped mask, mean for sum, an off-by-one slice, a removed weight,
a changed default), runs only the tests that cover that file (TESTS below; fast unit tests first,
then golden cases at one rank), and restores the file. A mutant is killed when a test command fails
(or runs past --timeout); it survives when all pass. EQUIVALENT lists survivors shown to compute the
same numbers, with the reason.

Mutate ONLY a worktree of your own, never the tree others run code in:

    git worktree add --detach /work/mut HEAD          # or: git -C /work/mut checkout --detach <commit>
    OMP_NUM_THREADS=1 python tools/mutate.py --worktree /work/mut            # the whole pass, a table
    python tools/mutate.py --list                                            # the mutants, nothing run
    OMP_NUM_THREADS=1 python tools/mutate.py --worktree /work/mut --only L04,R02 -v   # some, with test output
    OMP_NUM_THREADS=1 python tools/mutate.py --worktree /work/mut --baseline  # the covering tests, unmutated

The tests run with PYTHONPATH=<worktree> and the interpreter running this script (the project's venv).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOCAL, OPTIM, PLAN, SCORING = "fedhpc/train/local.py", "fedhpc/train/optim.py", "fedhpc/train/plan.py", "fedhpc/train/scoring.py"
REDUCE, BASE = "fedhpc/runtime/reduce.py", "fedhpc/strategies/base.py"
FEDSA, HILORA, TIERS = "fedhpc/strategies/fedsa_lora.py", "fedhpc/strategies/hilora.py", "fedhpc/strategies/hilora_tiers.py"


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str
    new: str
    what: str


M = Mutant
MUTANTS = [
    # --- fedhpc/train/local.py ---------------------------------------------------------------------------
    M("L01", LOCAL, "epochs = math.ceil(cfg.local_steps * cfg.batch_size / max(n, 1))",
      "epochs = cfg.local_steps * cfg.batch_size // max(n, 1)", "local_steps: floor instead of ceil of epochs"),
    M("L02", LOCAL, "batches += [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]",
      "batches += [order[i:i + cfg.batch_size - 1] for i in range(0, n, cfg.batch_size)]", "off-by-one batch slice"),
    M("L03", LOCAL, "if len(chunks) > 1 and len(chunks[-1]) == 1:", "if len(chunks) > 1 and len(chunks[-1]) == 0:",
      "split_passes leaves a lone trailing client"),
    M("L04", LOCAL, "            grads[key].mul_(keep)\n", "            pass\n", "drop the movable mask on gradients"),
    M("L05", LOCAL, "lr_scale=hooks.lr_scale, movable=movable)", "lr_scale=hooks.lr_scale)",
      "drop the movable mask on the optimizer update"),
    M("L06", LOCAL, "per_client = (per_row * mask_t).sum(1) / mask_t.sum(1).clamp(min=1)", "per_client = per_row.mean(1)",
      "padded rows counted in the loss (mean over the padded batch)"),
    M("L07", LOCAL, "loss_sum += per_client.detach().double() * active_t", "loss_sum += per_client.detach().double()",
      "loss summed over steps a client sat out"),
    M("L08", LOCAL, "return loss_sum / counts.clamp(min=1)", "return loss_sum / steps",
      "per-client loss divided by the longest client's steps"),
    M("L09", LOCAL, "            mask_to_ranks(grads, ranks, inplace=True)\n", "            pass\n",
      "padded ranks get gradients"),
    M("L10", LOCAL, "if cfg.max_grad_norm > 0:", "if cfg.max_grad_norm < 0:", "clipping never applied (flipped comparison)"),
    M("L11", LOCAL, "total = per_client if extra is None else per_client + extra", "total = per_client",
      "the hooks' extra loss dropped"),
    M("L12", LOCAL, "        hooks.grads(grads, adapters)\n", "", "the hooks' gradient transform dropped"),
    M("L13", LOCAL, "client_keys(seed, ids, round_index, step)", "client_keys(seed, ids, round_index, 0)",
      "the same dropout mask every step"),
    M("L14", LOCAL, "mask[c, :len(rows)] = 1.0", "mask[c, :] = 1.0", "padding rows unmasked"),
    M("L15", LOCAL, "plans = [p[:int(n)] for p, n in zip(plans, limit)]",
      "plans = [p[:int(n) + 1] for p, n in zip(plans, limit)]", "a late client takes one step too many"),
    M("L16", LOCAL, "index[c, len(rows):] = rows[0]", "index[c, len(rows):] = rows[-1]",
      "another row pads a short batch"),
    # --- fedhpc/train/optim.py, plan.py, scoring.py ------------------------------------------------------------
    M("O01", OPTIM, "new_m = torch._foreach_lerp(m, g, 1 - cfg.betas[0])", "new_m = torch._foreach_lerp(m, g, cfg.betas[0])",
      "AdamW first moment with beta1 and 1-beta1 swapped"),
    M("O02", OPTIM, "[bc2_sqrt.to(x.dtype).view(s) for x, s in zip(v, shapes)]", "[1.0 + 0 * bc2_sqrt.to(x.dtype).view(s) for x, s in zip(v, shapes)]",
      "no second-moment bias correction"),
    M("O03", OPTIM, "torch._foreach_mul(p, lr * cfg.weight_decay)", "torch._foreach_mul(p, cfg.weight_decay)",
      "decoupled weight decay not scaled by lr"),
    M("O04", OPTIM, "update = [u * movable[k] if k in movable else u for k, u in zip(keys, update)]",
      "update = [u for k, u in zip(keys, update)]", "the optimizer ignores movable (weight decay moves frozen entries)"),
    M("O05", OPTIM, "            _assign_all(m, new_m, act, shapes, everyone)\n",
      "            _assign_all(m, new_m, torch.ones_like(act), shapes, True)\n", "inactive clients' first moments move"),
    M("O06", OPTIM, 'state["step"] += act.to(torch.int64)', 'state["step"] += 1', "inactive clients' step count grows"),
    M("O07", OPTIM, "coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)", "coef = max_norm / (norms + 1e-6)",
      "clipping scales small gradients up"),
    M("O08", OPTIM, "update = torch._foreach_add(g, torch._foreach_mul(p, cfg.weight_decay)) if cfg.weight_decay else g",
      "update = g", "SGD ignores weight decay"),
    M("O09", OPTIM, "new_buf = torch._foreach_add(torch._foreach_mul(buf, cfg.momentum), update)",
      "new_buf = torch._foreach_add(torch._foreach_mul(buf, cfg.momentum), torch._foreach_mul(update, 1 - cfg.momentum))",
      "SGD momentum with dampening"),
    M("O10", OPTIM, "    lr: float = 1e-3\n", "    lr: float = 1e-2\n", "default lr changed"),
    M("P01", PLAN, "    lr_scale: float = 1.0\n", "    lr_scale: float = 0.5\n", "default lr_scale changed"),
    M("S01", SCORING, "scores[key] += g.double().square() if entries else g.double().flatten(1).square().sum(1)",
      "scores[key] += g.double().square() if entries else g.double().flatten(1).abs().sum(1)",
      "Fisher score with |g| for g²"),
    M("S02", SCORING, "grads = torch.autograd.grad((picked * has).sum(), [live[k] for k in keys])",
      "grads = torch.autograd.grad(picked.sum(), [live[k] for k in keys])",
      "clients past their last sample keep scoring"),
    # --- fedhpc/runtime/reduce.py ------------------------------------------------------------------------------
    M("R01", REDUCE, "            rows[w == 0] = 0.0  # a client", "            pass  # a client",
      "a weight-0 client's NaN reaches the sums"),
    M("R02", REDUCE, "                w = w * scale\n", "                pass\n", "a late client's work share ignored"),
    M("R03", REDUCE, "means = part[:, :-1] / weights.clamp(min=1e-300).unsqueeze(1)", "means = part[:, :-1]",
      "sums instead of means"),
    M("R04", REDUCE, "order = torch.argsort(meta[:, 0])", "order = torch.arange(len(meta))",
      "gathered rows in rank order, not client order"),
    M("R05", REDUCE, "keep = weights > 0", "keep = weights >= 0", "gathered rows of weight-0 clients kept"),
    M("R06", REDUCE, "reduced.blocks[name] = Means(_split(means, block.keys, torch.float32), weights)",
      "reduced.blocks[name] = Means(_split(means, block.keys, torch.float32), (weights > 0).double())",
      "per-group weight totals reported as presence only"),
    M("R07", REDUCE, "sent += flat.numel() * flat.element_size()", "sent += flat.numel() * 4",
      "MPI bytes of the mean blocks counted as float32"),
    M("R08", REDUCE, "weights = [b.weight_of(clients, self.num_examples) * (1.0 if scale is None else scale)",
      "weights = [b.weight_of(clients, self.num_examples) * 1.0", "gathered weights ignore a late client's share"),
    # --- fedhpc/strategies/base.py -----------------------------------------------------------------------------
    M("B01", BASE, "    present = block.weights > 0\n", "    present = block.weights >= 0\n",
      "an absent group's state replaced by a zero mean"),
    M("B02", BASE, "                out[key] = server[key][rows].clone()",
      "                out[key] = server[key][:1].expand(len(clients), *server[key].shape[1:]).clone()",
      "receive ignores the client's group row"),
    M("B03", BASE, 'return {k: (server[k][:1] if k in server else init[k]) for k in self.keys}',
      "return {k: init[k] for k in self.keys}", "global model = the initial adapters"),
    M("B04", BASE, "return {k: trained[k] for k in state if k in trained}, trained",
      "return {k: state[k] for k in state}, trained", "a client keeps its untrained state"),
    M("B05", BASE, "return {k: init[k].clone() for k in self.keys if k not in self.private()}",
      "return {k: init[k].clone() for k in self.keys}", "the server holds the private keys too"),
    M("B06", BASE, '    keep_optimizer_state: bool = False\n', '    keep_optimizer_state: bool = True\n',
      "default keep_optimizer_state changed"),
    M("B07", BASE, "            if isinstance(block, Means):\n                new.update(replace_present(server, block))",
      "            if isinstance(block, Means) and len(new) < 0:\n                new.update(replace_present(server, block))",
      "aggregate_train keeps the old server state"),
    M("B08", BASE, 'shared = {k: s for k, s in self.shapes.items() if k not in self.private()}\n        return RoundPlan(sampled, Exchange({"shared": Block(shared)} if shared else {}, down=shared))',
      'shared = {k: s for k, s in self.shapes.items() if k not in self.private()}\n        return RoundPlan(sampled, Exchange({"shared": Block(shared, weights=np.ones(self.population.size))} if shared else {}, down=shared))',
      "uploads weighted equally instead of by samples"),
    # --- fedhpc/strategies/fedsa_lora.py -------------------------------------------------------------------------
    M("F01", FEDSA, "return [k for k in self.keys if not (is_lora_a(k) or (self.cfg.share_head and is_head(k)))]",
      "return [k for k in self.keys if not is_lora_a(k)]", "share_head ignored"),
    M("F02", FEDSA, "return [k for k in self.keys if not (is_lora_a(k) or (self.cfg.share_head and is_head(k)))]",
      "return [k for k in self.keys if not (k.endswith('.lora_B') or (self.cfg.share_head and is_head(k)))]",
      "B shared instead of A"),
    M("F03", FEDSA, "    share_head: bool = False\n", "    share_head: bool = True\n", "default share_head changed"),
    M("F04", FEDSA, "        return None  # B and the head", "        return super().global_model(server, init)  # B and the head",
      "a global model made of A and initial B"),
    # --- fedhpc/strategies/hilora.py and hilora_tiers.py -----------------------------------------------------------
    M("H01", TIERS, "                    mask[tier_slice(self.active, self.r)] = True", "                    mask[:] = True",
      "every tier movable"),
    M("H02", TIERS, "above = B[..., tier_slice(frozen, self.r)].detach()", "above = B[..., tier_slice(frozen, self.r)]",
      "penalty gradient also reaches the frozen tier"),
    M("H03", TIERS, "norm += float(torch.trace((B0.mT @ B0) @ (A0 @ A0.mT)))",
      "norm += float(torch.trace((B1.mT @ B1) @ (A1 @ A1.mT)))", "relative change normalised by the new root"),
    M("H04", TIERS, "return (S[..., :r, None] * Vh[..., :r, :]).float(), U[..., :r].float()",
      "return Vh[..., :r, :].float(), U[..., :r].float()", "truncated SVD drops the singular values"),
    M("H05", TIERS, "return slice(tier * r, (tier + 1) * r)", "return slice(tier * r, (tier + 1) * r - 1)",
      "off-by-one tier slice"),
    M("H06", HILORA, "        if change <= self.cfg.root_tau:\n", "        if change >= self.cfg.root_tau:\n",
      "root_tau comparison flipped"),
    M("H07", HILORA, 'int(server["stage_round"][0]) + 1 >= self.cfg.root_rounds)',
      'int(server["stage_round"][0]) + 1 > self.cfg.root_rounds)', "one root round too many"),
    M("H08", HILORA, "participants = seen if self._clustering_round(server) else sampled", "participants = sampled",
      "the clustering round takes only the sampled clients"),
    M("H09", HILORA, "train_head=active != LEAF or self.cfg.leaf_trains_head", "train_head=True",
      "leaf_trains_head ignored"),
    M("H10", HILORA, "lr_scale=self.cfg.leaf_lr_scale if active == LEAF else 1.0)", "lr_scale=1.0)",
      "leaf_lr_scale ignored"),
    M("H11", HILORA, 'return {**out, **{h: server[f"root.{h}"] for h in self.heads}}',
      "return {**out, **{h: server[h][:1] for h in self.heads}}", "global model takes the active head"),
    M("H12", HILORA, "    ema_decay: float = 0.9\n", "    ema_decay: float = 0.5\n", "default ema_decay changed"),
    M("H13", HILORA, "    root_rounds: int = 15\n", "    root_rounds: int = 14\n", "default root_rounds changed"),
    M("H14", HILORA, "private = state[\"leaf_started\"] if self._stage(server) == LEAF else torch.zeros_like(state[\"leaf_started\"])",
      "private = torch.zeros_like(state[\"leaf_started\"])", "a leaf client's private head replaced by the cluster's"),
]

PY = "PY"  # placeholder for the interpreter
GOLDEN = [PY, "tests/mpi/golden_runs.py", "--compare", "tests/golden", "--out", "{tmp}", "--only"]


def pytest(*args: str) -> list[str]:
    return [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", *args]


DEFAULTS = "tests/test_strategy_options.py::test_defaults_are_the_documented_ones"
TESTS = {
    LOCAL: [pytest("tests/test_train_paths.py", "tests/test_local_train.py",
                   "tests/test_hetero_ranks.py::test_padded_rows_stay_exactly_zero_through_training",
                   "tests/test_faults.py::test_partial_work_equals_a_shorter_run", "-k", "not clients_per_pass"),
            GOLDEN + ["fedit_dropout"]],
    OPTIM: [pytest("tests/test_local_train.py", "tests/test_train_paths.py", DEFAULTS, "-k", "not clients_per_pass")],
    PLAN: [pytest("tests/test_train_paths.py", DEFAULTS, "-k", "tier or dropout or defaults")],
    SCORING: [pytest("tests/test_scoring.py")],
    REDUCE: [pytest("tests/test_reduce.py", "tests/test_strategies.py",
                    "tests/test_faults.py::test_dropped_clients_count_in_nothing_and_partial_work_counts_by_steps_done"),
             GOLDEN + ["hilora_gather_factor_mean"]],
    BASE: [pytest("tests/test_strategies.py", "tests/test_strategy_options.py", "tests/test_contract.py",
                  "-k", "not end_to_end and not own_optimizer and not hilora and not tier and not root"),
           GOLDEN + ["fedsa_lora,fedit_private_head"]],
    FEDSA: [pytest("tests/test_strategies.py", "tests/test_strategy_options.py", "-k", "fedsa or defaults"),
            GOLDEN + ["fedsa_lora"]],
    HILORA: [pytest("tests/test_strategy_options.py", "tests/test_hilora.py", "-k",
                    "not rank_count and not three_ranks and not fedsa and not fedit and not hetlora and not sample"),
             GOLDEN + ["hilora"]],
}
TESTS[TIERS] = [pytest("tests/test_train_paths.py", "-k", "tier"), *TESTS[HILORA]]

EQUIVALENT = {
    "H02": "the frozen tier's gradient from the penalty is masked (movable) before clipping and before the step, "
           "so detaching it or not changes no number",
    "L07": "a client that sat a step out has an all-zero row mask, so its per-client loss that step is exactly "
           "0 (0 / clamp(0, min=1)), or NaN either way if its padded logits are not finite (NaN * 0 = NaN): "
           "multiplying by `active` changes no number",
    "L16": "the padding rows are masked out of the loss (mask), and the backbone normalises per row (LayerNorm), "
           "so which row pads a short batch changes no number",
}


def apply(worktree: Path, mutant: Mutant) -> str:
    """Mutate the file in the worktree; returns the original text."""
    path = worktree / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise LookupError(f"the snippet occurs {count} times in {mutant.path} (must be once): {mutant.old!r}")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text


def line_of(root: Path, mutant: Mutant) -> int:
    text = (root / mutant.path).read_text()
    at = text.find(mutant.old)
    return text.count("\n", 0, at) + 1 + (len(mutant.old) - len(mutant.old.lstrip("\n"))) if at >= 0 else 0


def run_tests(worktree: Path, commands: list[list[str]], timeout: float, verbose: bool) -> tuple[str, float, str]:
    """('killed' | 'killed (timeout)' | 'survived', seconds, which command killed it)."""
    env = {**os.environ, "PYTHONPATH": str(worktree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    for command in commands:
        with tempfile.TemporaryDirectory(prefix="fedhpc-mut-") as tmp:
            argv = [sys.executable if a == PY else a.replace("{tmp}", tmp) for a in command]
            try:
                done = subprocess.run(argv, cwd=worktree, env=env, capture_output=True, text=True,
                                      timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                return "killed (timeout)", time.perf_counter() - t0, " ".join(command[1:3])
        if verbose:
            print((done.stdout + done.stderr)[-3000:])
        if done.returncode != 0:
            return "killed", time.perf_counter() - t0, _name(command)
    return "survived", time.perf_counter() - t0, ""


def _name(command: list[str]) -> str:
    if "golden_runs.py" in " ".join(command):
        return "golden " + command[-1]
    return "pytest " + " ".join(a.split("/")[-1] for a in command if a.startswith("tests/"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worktree", type=Path, default=Path("/work/mut"),
                        help="a git worktree of your own to mutate (default /work/mut)")
    parser.add_argument("--only", default="", help="comma-separated mutant ids")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests; run nothing")
    parser.add_argument("--baseline", action="store_true", help="run every covering test command unmutated")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (all its commands)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the tail of each test run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only.split(",")]
    root = Path(__file__).resolve().parents[1]
    if args.list:
        for m in chosen:
            print(f"{m.id}  {m.path}:{line_of(root, m)}  {m.what}")
            print(f"      - {m.old.strip()}\n      + {m.new.strip()}")
        print(f"{len(chosen)} mutants; tests per file:")
        for path, commands in TESTS.items():
            print(f"  {path}: " + " ; ".join(" ".join(c[1:]) for c in commands))
        return 0
    worktree = args.worktree.resolve()
    if worktree == root or not (worktree / ".git").exists():
        raise SystemExit(f"--worktree {worktree}: must be a git worktree of your own, not {root} "
                         "(git worktree add --detach /work/mut HEAD)")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=worktree, capture_output=True,
                           text=True).stdout
    if dirty.strip():
        raise SystemExit(f"{worktree} has modified files; restore them first:\n{dirty}")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=worktree, capture_output=True, text=True).stdout
    print(f"worktree {worktree} at {head.strip()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}", flush=True)
    if args.baseline:
        bad = 0
        for path, commands in TESTS.items():
            status, seconds, which = run_tests(worktree, commands, args.timeout * 2, args.verbose)
            ok = status == "survived"
            bad += not ok
            print(f"baseline {path}: {'pass' if ok else 'FAIL ' + which} ({seconds:.0f} s)", flush=True)
        return 1 if bad else 0
    rows, started = [], time.perf_counter()
    print(f"{'id':4}  {'where':38}  {'result':17}  {'s':>4}  {'by':40}  description", flush=True)
    for m in chosen:
        where = f"{m.path.removeprefix('fedhpc/')}:{line_of(worktree, m)}"
        try:
            original = apply(worktree, m)
        except LookupError as err:  # the code moved on: update the mutant
            rows.append((m, "stale"))
            print(f"{m.id:4}  {where:38}  {'stale':17}  {0:4.0f}  {'':40}  {err}", flush=True)
            continue
        try:
            status, seconds, which = run_tests(worktree, TESTS[m.path], args.timeout, args.verbose)
        finally:
            (worktree / m.path).write_text(original)
        if status == "survived" and m.id in EQUIVALENT:
            status = "equivalent"
        rows.append((m, status))
        print(f"{m.id:4}  {where:38}  {status:17}  {seconds:4.0f}  {which[:40]:40}  {m.what}", flush=True)
        if status == "equivalent":
            print(f"      why: {EQUIVALENT[m.id]}", flush=True)
    killed = sum(s.startswith("killed") for _, s in rows)
    equivalent = sum(s == "equivalent" for _, s in rows)
    survived = [m.id for m, s in rows if s == "survived"]
    stale = [m.id for m, s in rows if s == "stale"]
    print(f"\n{len(rows)} mutants: {killed} killed, {equivalent} equivalent, {len(survived)} survived"
          + (f" ({', '.join(survived)})" if survived else "") + (f", {len(stale)} stale ({', '.join(stale)})" if stale else "")
          + f"; {time.perf_counter() - started:.0f} s")
    return 1 if survived or stale else 0


if __name__ == "__main__":
    sys.exit(main())
