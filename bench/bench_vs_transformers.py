#!/usr/bin/env python3
"""bench/bench_vs_transformers.py - CPU training-step throughput: moe (bench_train) vs transformers.

Same model config, batch and sequence length as bench_train's defaults (see bench/RESULTS.md), float32,
`--threads` threads on both sides (OMP_NUM_THREADS for moe, torch.set_num_threads for torch).

What each side times, per step:
  moe          bench_train: model_zero_grad + model_forward (loss incl. aux seq-balance loss 1e-4)
               + model_backward; no optimizer.
  transformers DeepseekV3ForCausalLM (train mode, attn_implementation="eager"):
               model.zero_grad(set_to_none=True) + model(input_ids, labels=labels).loss + loss.backward();
               no optimizer (HF has no aux loss for DeepseekV3). Variants: the experts implementation
               "eager" (a Python loop over the hit experts) and "grouped_mm" (transformers' default when
               available), optionally under torch.compile.

Each measurement runs in a fresh process (peak memory = that process's ru_maxrss); the variants are
alternated `--rounds` times and the ratio of medians is reported.

    setsid sh -c 'echo -20 > /proc/$$/autogroup; exec /root/hfenv/bin/python3 \
        bench/bench_vs_transformers.py --bench-train build/bench_train'
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

B, T = 4, 256
CFG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
           num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
           q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
           n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
           norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=T, rms_norm_eps=1e-6,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=True,
           tie_word_embeddings=False, num_mtp_layers=0, bos_token_id=0, eos_token_id=1,
           attention_dropout=0.0)


def worker(args):
    import torch
    torch.set_num_threads(args.threads)
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(1234)
    cfg = DeepseekV3Config(attn_implementation="eager", experts_implementation=args.experts, **CFG)
    model = DeepseekV3ForCausalLM(cfg).float().train()
    try:
        model.set_experts_implementation(args.experts)
    except Exception:
        pass
    impl = model.config._experts_implementation
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    labels = torch.randint(0, CFG["vocab_size"], (B, T), generator=g)
    fwd = model
    if args.compile:
        fwd = torch.compile(model)

    def step():
        model.zero_grad(set_to_none=True)
        loss = fwd(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # torch + model, before any step
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    times = []
    for i in range(args.warmup + args.steps):
        s = time.perf_counter()
        loss = step()
        e = time.perf_counter()
        if i == args.warmup - 1 or (args.warmup == 0 and i == 0):
            cpu0 = time.process_time()
        if i >= args.warmup:
            times.append(e - s)
        if i == args.warmup - 1:
            warm_s = e - t0
    cpu = (time.process_time() - cpu0) / args.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(dict(impl=impl, compile=args.compile, params=nparams, loss=float(loss),
                          times=times, warmup_s=warm_s, cpu_s=cpu, rss_mib=rss, rss0_mib=rss0)))


def run_moe(args):
    # `moe train` sets OPENBLAS_CORETYPE itself on CPUs OpenBLAS 0.3.21 does not know; bench_train does not
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("OPENBLAS_CORETYPE", "SkylakeX")
    out = subprocess.run([args.bench_train, "--steps", str(args.steps), "--warmup", str(args.warmup),
                          "--threads", str(args.threads), "--no-sgemm"], env=env, capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"step time\s+mean ([\d.]+) ms .* best ([\d.]+) ms", out)
    r = re.search(r"peak RSS\s+([\d.]+) MiB", out)
    c = re.search(r"cpu time\s+([\d.]+) ms/step", out)
    p = re.search(r"params\s+total ([\d.]+)M", out)
    return dict(mean=float(m.group(1)) / 1e3, best=float(m.group(2)) / 1e3, rss=float(r.group(1)),
                cpu=float(c.group(1)) / 1e3, info=f"params {p.group(1)}M")


def run_torch(args, experts, compile_):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--experts", experts, "--threads",
           str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if compile_:
        cmd.append("--compile")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.timeout} s")
    if p.returncode != 0:
        return dict(error=(p.stderr.strip().splitlines() or ["?"])[-1][:200])
    d = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(mean=statistics.mean(d["times"]), best=min(d["times"]), rss=d["rss_mib"], cpu=d["cpu_s"],
                info=f"impl {d['impl']}, params {d['params'] / 1e6:.2f}M, warm-up {d['warmup_s']:.1f} s, "
                     f"loss {d['loss']:.3f}, RSS before the first step {d['rss0_mib']:.0f} MiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-train", default="build/bench_train")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="moe,hf-eager,hf-grouped_mm",
                    help="comma list of moe, hf-EXPERTS[+compile] with EXPERTS one of transformers' experts "
                         "implementations (eager, grouped_mm, batched_mm)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per torch measurement")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--experts", default="eager", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    N = B * T
    variants = args.variants.split(",")
    res = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            if v == "moe":
                m = run_moe(args)
            else:
                experts, _, comp = v[3:].partition("+")
                m = run_torch(args, experts, comp == "compile")
            res[v].append(m)
            if "error" in m:
                print(f"round {r + 1} {v:20s} FAILED: {m['error']}", flush=True)
            else:
                print(f"round {r + 1} {v:20s} mean {m['mean'] * 1e3:8.1f} ms  best {m['best'] * 1e3:8.1f} ms  "
                      f"tok/s(best) {N / m['best']:7.0f}  cpu {m['cpu'] * 1e3:7.1f} ms/step  "
                      f"peak RSS {m['rss']:7.1f} MiB  ({m['info']})", flush=True)

    print(f"\nsummary: medians over {args.rounds} rounds, {B} x {T} = {N} tokens/step, {args.threads} threads")
    print("| | step mean (ms) | step best (ms) | tokens/s (mean step) | tokens/s (best step) | "
          "CPU time/step (ms) | peak RSS (MiB) | moe speed-up (mean step) |")
    print("|---|---|---|---|---|---|---|---|")
    med = {}
    for v in variants:
        ok = [m for m in res[v] if "error" not in m]
        if not ok:
            print(f"| {v} | failed: {res[v][0]['error']} | | | | | | |")
            continue
        med[v] = {k: statistics.median(m[k] for m in ok) for k in ("mean", "best", "cpu", "rss")}
    for v, d in med.items():
        ratio = f"{d['mean'] / med['moe']['mean']:.1f}x" if "moe" in med and v != "moe" else ""
        print(f"| {v} | {d['mean'] * 1e3:.1f} | {d['best'] * 1e3:.1f} | {N / d['mean']:.0f} | {N / d['best']:.0f} "
              f"| {d['cpu'] * 1e3:.0f} | {d['rss']:.0f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
