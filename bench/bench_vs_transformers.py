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

--generate: greedy generation throughput, moe (the MLA latent cache, absorbed attention; rl/generate.c)
vs transformers' DeepseekV3ForCausalLM.generate, on the same random weights:
  1. build a random DeepseekV3 in transformers with the config above (max_position_embeddings raised to
     --gen-max-pos), weights at unit scale (1/sqrt(fan_in); lm_head, q and kv_a projections x2; norm gains
     1 +- 0.2; a random routing bias) so that logits and routing have few float near-ties, save_pretrained
     it and `moe convert --from-hf` it (--moe);
  2. G prompts of P random ids (--gen-batch, --gen-prompt-len), for each prompt set of --gen-prompts:
     `distinct` (G different prompts) and `same` (one prompt repeated G times, which is all `moe generate`
     itself can take; greedy then keeps the G rows identical, so every row routes to the same experts);
  3. for each N of --gen-new (largest N also gives the token check), per round and variant, one fresh
     process that loads the model, runs one untimed warm-up generation (2 new tokens), then times
     generate(1 new token) (--gen-reps1 times, median: prefill + the first token) and generate(N); the
     decode time is t(N) - t(1) (N - 1 single-token steps of G rows) and
         decode tokens/s = G * (N - 1) / (t(N) - t(1)),
     which leaves out process start, imports, model load and the prefill on both sides. For transformers
     the per-round line also shows "in-call": the same rate from timestamps a LogitsProcessor takes inside
     generate(N) (first to last generated token), a check of the subtraction.
  The model is built (and converted) in a process of its own, so that the measuring processes, children
  of a main process without torch, report their own ru_maxrss (it survives fork + exec on Linux).
Variants (--gen-variants):
  moe        a small C driver (embedded below, compiled against MOE_BUILD/libmoecore.a with the flags and
             link line CMake used for MOE_BUILD/moe) calling generate() of rl/generate.h: temperature 0,
             eos -1 (never stops early), the latent cache; timed with CLOCK_MONOTONIC around generate().
             MOE_BUILD must be built from the current tree (the driver uses its headers; a warning is
             printed when a source is newer than libmoecore.a).
  moe-cli    `moe generate --prompt-ids ... --num-samples G --temperature 0 --eos -1` (only the `same`
             prompt set): one process per N and --gen-reps1 with N = 1 (t(1) = their minimum: a cold
             process's first generate() is sometimes much slower); t = generate()'s time as the command
             prints it (new tokens / its tokens/s). A cross-check of the driver, noisier than it.
  hf-EXPERTS[@ATTN]
             transformers, experts_implementation EXPERTS (eager: the Python loop over the hit experts;
             grouped_mm: the default; batched_mm), attn_implementation ATTN (default --gen-hf-attn: sdpa),
             model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=N, use_cache=True)
             with generation_config.eos_token_id = None (no early stop without min_new_tokens, which would
             mask the eos logit and change the greedy choice); torch.inference_mode; a DynamicCache passed
             in, whose per-layer tensors give the cache bytes per token (transformers >= 5 caches
             DeepseekV3's latent, RMSNorm(c_kv) and the roped k_pe, like moe, and expands it through
             kv_b_proj for every cached position at every step; 4.x cached the expanded per-head K and V).
All sides are float32 with --threads threads (OMP_NUM_THREADS for moe, torch.set_num_threads for torch).
The greedy tokens of every variant are compared with those of `moe` (fraction of identical tokens, and the
first position where a row differs: once a row differs, the rest of it usually does too).

    setsid sh -c 'echo -20 > /proc/$$/autogroup; exec /root/hfenv/bin/python3 \
        bench/bench_vs_transformers.py --generate --moe build/moe'
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


# ----------------------------------------------------------------------------------------------------------
# --generate: greedy generation throughput

GEN_DRIVER_C = r"""
/* gen_driver CKPT PROMPTS N1,N2,... WARMUP REPS1: generate() of rl/generate.h, timed; JSON on stdout */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include "launch/startup.h"
#include "model/decode.h"
#include "model/model.h"
#include "rl/generate.h"
#include "train/checkpoint.h"
#include "train/config.h"

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	startup_fix_blas_kernels(argv);  /* as `moe` does: OpenBLAS's right kernels on CPUs it does not know */
	if (argc != 6) {
		fprintf(stderr, "usage: gen_driver CKPT PROMPTS N1,N2,... WARMUP REPS1\n");
		return 2;
	}
	char err[1024];
	double t0 = now();
	struct run_config rc;
	config_defaults(&rc);
	if (checkpoint_read_header(argv[1], &rc, NULL, err, sizeof(err))) {
		fprintf(stderr, "gen_driver: %s\n", err);
		return 1;
	}
	struct moe_model *m = model_create(&rc.model, 0, rc.model.n_routed_experts, err, sizeof(err));
	if (!m || checkpoint_load_model(argv[1], m, err, sizeof(err))) {
		fprintf(stderr, "gen_driver: %s\n", err);
		return 1;
	}
	double load_s = now() - t0;
	FILE *f = fopen(argv[2], "r");
	int G, P;
	if (!f || fscanf(f, "%d %d", &G, &P) != 2 || G < 1 || P < 1) {
		fprintf(stderr, "gen_driver: bad prompts file %s\n", argv[2]);
		return 1;
	}
	int *ids = malloc(sizeof(int) * (size_t)G * P), *lens = malloc(sizeof(int) * (size_t)G * 2);
	const int **prompts = malloc(sizeof(*prompts) * (size_t)G);
	for (int i = 0; i < G * P; i++)
		if (fscanf(f, "%d", &ids[i]) != 1) {
			fprintf(stderr, "gen_driver: bad prompts file %s\n", argv[2]);
			return 1;
		}
	fclose(f);
	for (int g = 0; g < G; g++) {
		prompts[g] = ids + (size_t)g * P;
		lens[G + g] = P;
	}
	int Ns[16], nN = 0, warm = atoi(argv[4]), reps1 = atoi(argv[5]), maxN = 1;
	for (char *p = argv[3]; *p && nN < 16;) {
		char *end;
		Ns[nN] = (int)strtol(p, &end, 10);
		if (Ns[nN] > maxN)
			maxN = Ns[nN];
		nN++;
		p = *end ? end + 1 : end;
	}
	int *out = malloc(sizeof(int) * (size_t)G * maxN);
	struct sample_params sp = sample_params_default();
	sp.temperature = 0.0f;
	sp.eos_id = -1;
	if (warm > 0) {
		sp.max_new_tokens = warm;
		if (generate(m, prompts, lens + G, G, &sp, out, lens, NULL))
			return 1;
	}
	double t1[64];
	if (reps1 < 1 || reps1 > 64)
		reps1 = 1;
	for (int r = 0; r < reps1; r++) {
		sp.max_new_tokens = 1;
		double s = now();
		if (generate(m, prompts, lens + G, G, &sp, out, lens, NULL))
			return 1;
		t1[r] = now() - s;
	}
	qsort(t1, (size_t)reps1, sizeof(double), cmp_d);
	printf("{\"load_s\": %.6f, \"t1\": %.6f, \"t1_all\": [", load_s, t1[reps1 / 2]);
	for (int r = 0; r < reps1; r++)
		printf("%s%.6f", r ? ", " : "", t1[r]);
	printf("], \"cache_bytes_per_token\": %zu, \"runs\": {", latent_cache_bytes_per_token(&rc.model));
	for (int k = 0; k < nN; k++) {
		sp.max_new_tokens = Ns[k];
		double s = now();
		if (generate(m, prompts, lens + G, G, &sp, out, lens, NULL))
			return 1;
		double t = now() - s;
		printf("%s\"%d\": {\"t\": %.6f, \"tokens\": [", k ? ", " : "", Ns[k], t);
		for (int g = 0; g < G; g++) {
			printf("%s[", g ? ", " : "");
			for (int i = 0; i < lens[g]; i++)
				printf("%s%d", i ? ", " : "", out[(size_t)g * Ns[k] + i]);
			printf("]");
		}
		printf("]}");
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	printf("}, \"rss_mib\": %.1f}\n", ru.ru_maxrss / 1024.0);
	model_free(m);
	return 0;
}
"""


def gen_randomise(model, seed):
    """Unit-scale weights (bench/hf_logits_check.py's randomise): sharp logits and routing, few float
    near-ties."""
    import torch
    from hf_logits_check import randomise  # bench/ is the script's directory, first on sys.path
    randomise(model, torch.Generator().manual_seed(seed))


def gen_build_model(args, work):
    """The random model in transformers (saved) and converted; prints JSON (run in its own process, so
    that the measuring processes, children of the main one, do not inherit torch's RSS in ru_maxrss)."""
    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(args.seed)
    cfg = DeepseekV3Config(**dict(CFG, max_position_embeddings=args.gen_max_pos))
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    gen_randomise(model, args.seed)
    hf_dir = os.path.join(work, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    nparams = sum(p.numel() for p in model.parameters())
    ckpt = os.path.join(work, "model.h5")
    r = subprocess.run([args.moe, "convert", "--from-hf", hf_dir, "--out", ckpt], capture_output=True, text=True)
    if r.returncode:
        sys.exit("moe convert failed:\n" + r.stdout + r.stderr)
    print(json.dumps(dict(hf_dir=hf_dir, ckpt=ckpt, params=nparams, torch=torch.__version__,
                          transformers=transformers.__version__)))


def gen_build_driver(args, work):
    """Compiles GEN_DRIVER_C against MOE_BUILD/libmoecore.a; returns its path or raises RuntimeError."""
    import shlex
    bdir = os.path.abspath(args.moe_build)
    flags = {}
    with open(os.path.join(bdir, "CMakeFiles/moe.dir/flags.make")) as f:
        for line in f:
            k, eq, v = line.partition("=")
            if eq and not line.startswith("#"):
                flags[k.strip()] = v.strip()
    with open(os.path.join(bdir, "CMakeFiles/moe.dir/link.txt")) as f:
        link = shlex.split(f.read().strip())
    # the driver is compiled against the tree's headers: they must be those libmoecore.a was built from
    lib = os.path.join(bdir, "libmoecore.a")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    newer = [os.path.join(d, h) for d in ("model", "rl", "train", "launch", "data", "optim")
             if os.path.isdir(os.path.join(root, d)) for h in os.listdir(os.path.join(root, d))
             if (h.endswith(".h") or h.endswith(".c")) and
             os.path.getmtime(os.path.join(root, d, h)) > os.path.getmtime(lib)]
    if newer:
        print(f"warning: {', '.join(sorted(newer)[:6])} newer than {lib}: rebuild it (cmake --build "
              f"{bdir} --target moe) so that moe, the driver and the headers agree", flush=True)
    src = os.path.join(work, "gen_driver.c")
    obj = os.path.join(work, "gen_driver.o")
    exe = os.path.join(work, "gen_driver")
    with open(src, "w") as f:
        f.write(GEN_DRIVER_C)
    cc = link[0]
    comp = [cc] + shlex.split(flags.get("C_FLAGS", "")) + shlex.split(flags.get("C_INCLUDES", "")) + \
        shlex.split(flags.get("C_DEFINES", "")) + ["-c", src, "-o", obj]
    lk = []
    for i, a in enumerate(link):
        if a.endswith("moe.c.o"):
            a = obj
        elif i > 0 and link[i - 1] == "-o":
            a = exe
        lk.append(a)
    for cmd in (comp, lk):
        r = subprocess.run(cmd, cwd=bdir, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError("building the driver failed: %s\n%s" % (" ".join(cmd), r.stderr[-2000:]))
    return exe


def gen_worker(args):
    """transformers side of --generate: one process, prints one JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList
    t0 = time.perf_counter()
    model = DeepseekV3ForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32,
                                                  attn_implementation=args.gen_hf_attn,
                                                  experts_implementation=args.experts).eval()
    try:
        model.set_experts_implementation(args.experts)
    except Exception:
        pass
    load_s = time.perf_counter() - t0
    gc = model.generation_config
    gc.eos_token_id = None
    gc.pad_token_id = 0
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(gc, k, None)
    with open(args.prompts) as f:
        G, P = map(int, f.readline().split())
        ids = torch.tensor([int(x) for x in f.read().split()], dtype=torch.long).view(G, P)
    mask = torch.ones_like(ids)

    class Stamp(LogitsProcessor):
        """Timestamps each call: one per generated token, after the forward that produced its logits."""
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    def gen(n, cache=None, stamp=None):
        kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=n, use_cache=True)
        if cache is not None:
            kw["past_key_values"] = cache
        if stamp is not None:
            kw["logits_processor"] = LogitsProcessorList([stamp])
        s = time.perf_counter()
        out = model.generate(ids, **kw)
        t = time.perf_counter() - s
        assert out.shape == (G, P + n), out.shape
        return t, out[:, P:].tolist()

    with torch.inference_mode():
        if args.gen_warmup > 0:
            gen(args.gen_warmup)
        t1s = sorted(gen(1)[0] for _ in range(args.gen_reps1))
        runs = {}
        cache_info = None
        for n in args.gen_new_list:
            cache = DynamicCache(config=model.config)
            stamp = Stamp()
            t, toks = gen(n, cache, stamp)
            runs[str(n)] = dict(t=t, tokens=toks, inner=stamp.t[-1] - stamp.t[0] if len(stamp.t) > 1 else 0.0)
            if cache_info is None:
                nbytes, shapes = 0, []
                for layer in cache.layers:
                    for x in (layer.keys, layer.values):
                        nbytes += x.numel() * x.element_size()
                    shapes.append([list(layer.keys.shape), list(layer.values.shape), str(layer.keys.dtype)])
                seq = cache.get_seq_length()
                cache_info = dict(bytes_per_token=nbytes / (G * seq), seq=seq, layer_shapes=shapes[0],
                                  cls=type(cache).__name__ + "/" + type(cache.layers[0]).__name__)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(dict(load_s=load_s, t1=t1s[len(t1s) // 2], t1_all=t1s, runs=runs, cache=cache_info,
                          impl=model.config._experts_implementation,
                          attn=model.config._attn_implementation, rss_mib=rss)))


def gen_failure(p):
    """The last line of a failed process's stderr, or its exit status / signal."""
    import signal
    last = (p.stderr.strip().splitlines() or [""])[-1][:300]
    rc = p.returncode
    why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    return f"{last} ({why})" if last else why


def gen_run_hf(args, experts, attn, hf_dir, prompts):
    cmd = [sys.executable, os.path.abspath(__file__), "--gen-worker", "--experts", experts, "--threads",
           str(args.threads), "--hf-dir", hf_dir, "--prompts", prompts, "--gen-new", args.gen_new,
           "--gen-warmup", str(args.gen_warmup), "--gen-reps1", str(args.gen_reps1),
           "--gen-hf-attn", attn]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.timeout} s")
    if p.returncode != 0:
        return dict(error=gen_failure(p))
    return json.loads(p.stdout.strip().splitlines()[-1])


def gen_run_driver(args, driver, ckpt, prompts):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    try:
        p = subprocess.run([driver, ckpt, prompts, args.gen_new, str(args.gen_warmup), str(args.gen_reps1)],
                           env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.timeout} s")
    if p.returncode != 0:
        return dict(error=gen_failure(p))
    return json.loads(p.stdout.strip().splitlines()[-1])


def gen_run_cli(args, ckpt, prompt, G):
    """`moe generate` with one prompt repeated G times: a process for N = 1 and one per N."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))

    def one(n):
        cmd = [args.moe, "generate", "--checkpoint", ckpt, "--prompt-ids", ",".join(map(str, prompt)),
               "--num-samples", str(G), "--max-new-tokens", str(n), "--temperature", "0", "--eos", "-1"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if p.returncode:
            raise RuntimeError(gen_failure(p))
        m = re.search(r"(\d+) new tokens in ([\d.]+) s \(([\d.]+) tokens/s\)", p.stderr)
        if not m:
            raise RuntimeError("no timing in: " + p.stderr.strip()[-300:])
        # seconds are printed to 10 ms; tokens / (tokens/s, printed to 0.1) is more precise
        t = int(m.group(1)) / float(m.group(3)) if float(m.group(3)) > 0 else float(m.group(2))
        rows = [list(map(int, l.split())) for l in p.stdout.splitlines() if l and not l.startswith("===")]
        cb = re.search(r"latent cache (\d+) bytes per token", p.stderr)
        return t, rows, int(cb.group(1)) if cb else None

    try:
        t1s = sorted(one(1)[0] for _ in range(args.gen_reps1))
        runs, cb = {}, None
        for n in args.gen_new_list:
            t, rows, cb = one(n)
            runs[str(n)] = dict(t=t, tokens=rows)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return dict(error=str(e))
    # t(1) of a cold process is bimodal here (about 20 or 60-95 ms: the first generate() of a process
    # sometimes waits much longer, whatever N); the minimum is the cold cost every process pays at least
    return dict(t1=t1s[0], t1_all=t1s, runs=runs, cache_bytes_per_token=cb, load_s=None, rss_mib=None)


def gen_rate(m, n, G):
    """decode tokens/s: G (N - 1) / (t(N) - t(1)); nan when t(N) <= t(1) (noise)."""
    dec = m["runs"][str(n)]["t"] - m["t1"]
    return G * (n - 1) / dec if dec > 0 else float("nan")


def gen_compare(a, b):
    """(fraction of identical tokens, rows identical, first differing position of each differing row)."""
    same = total = rows_same = 0
    first = []
    for ra, rb in zip(a, b):
        n = max(len(ra), len(rb))
        eq = [i < len(ra) and i < len(rb) and ra[i] == rb[i] for i in range(n)]
        same += sum(eq)
        total += n
        if all(eq):
            rows_same += 1
        else:
            first.append(eq.index(False))
    return same / max(total, 1), rows_same, first


def gen_main(args):
    import platform
    import random
    import tempfile
    args.gen_new_list = [int(x) for x in args.gen_new.split(",")]
    G, P = args.gen_batch, args.gen_prompt_len
    work = args.work or tempfile.mkdtemp(prefix="gen-vs-hf-")
    os.makedirs(work, exist_ok=True)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--gen-build", "--work", work, "--moe", args.moe,
                        "--seed", str(args.seed), "--gen-max-pos", str(args.gen_max_pos)],
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit("building the model failed:\n" + p.stderr[-3000:])
    b = json.loads(p.stdout.strip().splitlines()[-1])
    hf_dir, ckpt, nparams = b["hf_dir"], b["ckpt"], b["params"]
    cpu = "?"
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = re.search(r"Model name:\s*(.*)", cpu).group(1).strip()
    except Exception:
        pass
    print(f"torch {b['torch']}, transformers {b['transformers']}, Python {platform.python_version()}; "
          f"CPU {cpu}; {args.threads} threads; work dir {work}; {nparams / 1e6:.2f}M parameters", flush=True)

    rnd = random.Random(args.seed)
    distinct = [[rnd.randrange(2, CFG["vocab_size"]) for _ in range(P)] for _ in range(G)]
    sets = {"distinct": distinct, "same": [distinct[0]] * G}
    prompt_sets = args.gen_prompts.split(",")
    pfiles = {}
    for name in prompt_sets:
        pfiles[name] = os.path.join(work, f"prompts-{name}.txt")
        with open(pfiles[name], "w") as f:
            f.write(f"{G} {P}\n" + "\n".join(" ".join(map(str, r)) for r in sets[name]) + "\n")

    variants = args.gen_variants.split(",")
    driver = None
    if "moe" in variants:
        try:
            driver = gen_build_driver(args, work)
        except (RuntimeError, OSError) as e:
            print(f"moe driver: {e}", flush=True)
    res = {(ps, v): [] for ps in prompt_sets for v in variants}
    for r in range(args.rounds):
        for ps in prompt_sets:
            for v in variants:
                if v == "moe-cli" and ps != "same":
                    continue
                if v == "moe":
                    m = gen_run_driver(args, driver, ckpt, pfiles[ps]) if driver else dict(error="no driver")
                elif v == "moe-cli":
                    m = gen_run_cli(args, ckpt, sets[ps][0], G)
                else:
                    experts, _, attn = v[3:].partition("@")
                    m = gen_run_hf(args, experts, attn or args.gen_hf_attn, hf_dir, pfiles[ps])
                res[(ps, v)].append(m)
                if "error" in m:
                    print(f"round {r + 1} {ps:8s} {v:14s} FAILED: {m['error']}", flush=True)
                    continue
                line = f"round {r + 1} {ps:8s} {v:14s} t(1) {m['t1'] * 1e3:7.1f} ms"
                for n in args.gen_new_list:
                    d = m["runs"][str(n)]
                    line += f" | N={n}: t {d['t']:6.2f} s, decode {gen_rate(m, n, G):7.1f} tok/s"
                    if d.get("inner"):
                        line += f" (in-call {G * (n - 1) / d['inner']:7.1f})"
                if m.get("load_s") is not None:
                    line += f" | load {m['load_s']:.2f} s"
                if m.get("rss_mib"):
                    line += f", RSS {m['rss_mib']:.0f} MiB"
                print(line, flush=True)

    nmax = str(max(args.gen_new_list))
    print(f"\nsummary: medians over {args.rounds} rounds; G = {G} prompts x {P} tokens; greedy; "
          f"{args.threads} threads; decode tokens/s = G (N - 1) / (t(N) - t(1))")
    for ps in prompt_sets:
        ok = {v: [m for m in res[(ps, v)] if "error" not in m] for v in variants}
        ref = ok.get("moe") or ok.get("moe-cli")
        ref_toks = ref[0]["runs"][nmax]["tokens"] if ref else None
        print(f"\nprompts: {ps}")
        hdr = "| | t(1) prefill + 1 token (ms) |"
        for n in args.gen_new_list:
            hdr += f" N={n}: decode tokens/s | N={n}: moe / this |"
        hdr += f" identical tokens vs moe (N={nmax}) | cache bytes/token | peak RSS (MiB) |"
        print(hdr)
        print("|---" * (hdr.count("|") - 1) + "|")
        med_rate = {}
        for v in variants:
            if not ok[v]:
                if res[(ps, v)]:
                    print(f"| {v} | failed: {res[(ps, v)][0]['error']} |")
                continue
            rates = {}
            for n in args.gen_new_list:
                rs = [gen_rate(m, n, G) for m in ok[v]]
                rs = [x for x in rs if x == x]
                rates[n] = statistics.median(rs) if rs else float("nan")
            med_rate[v] = rates
        base = med_rate.get("moe") or med_rate.get("moe-cli")
        notes = []
        for v in variants:
            if v not in med_rate:
                continue
            row = f"| {v} | {statistics.median(m['t1'] for m in ok[v]) * 1e3:.1f} |"
            for n in args.gen_new_list:
                ratio = f"{base[n] / med_rate[v][n]:.2f}x" if base and v not in ("moe",) else ""
                row += f" {med_rate[v][n]:.1f} | {ratio} |"
            m0 = ok[v][0]
            if ref_toks is not None:
                frac, rows_same, first = gen_compare(ref_toks, m0["runs"][nmax]["tokens"])
                row += f" {frac * 100:.1f}% ({rows_same}/{G} rows" + \
                    (f"; first differences at {sorted(first)}" if first else "") + ") |"
            else:
                row += " |"
            if "cache" in m0 and m0["cache"]:
                c = m0["cache"]
                notes.append(f"{v} cache: {c['cls']}, layer 0 keys {c['layer_shapes'][0]} values "
                             f"{c['layer_shapes'][1]} {c['layer_shapes'][2]} after {c['seq']} positions")
                row += f" {c['bytes_per_token']:.0f} |"
            else:
                row += f" {m0.get('cache_bytes_per_token')} (latent cache) |"
            rss = [m["rss_mib"] for m in ok[v] if m.get("rss_mib")]
            row += f" {statistics.median(rss):.0f} |" if rss else " |"
            print(row)
        for n in notes:
            print(n)
        full = CFG["num_hidden_layers"] * CFG["num_attention_heads"] * \
            (CFG["qk_nope_head_dim"] + CFG["qk_rope_head_dim"] + CFG["v_head_dim"]) * 4
        print(f"(a cache of full per-head K and V, fp32, would take {full} bytes per token)")
        # transformers variants among themselves
        hfs = [v for v in variants if v.startswith("hf-") and ok[v]]
        for a, b in zip(hfs, hfs[1:]):
            frac, rows_same, _ = gen_compare(ok[a][0]["runs"][nmax]["tokens"], ok[b][0]["runs"][nmax]["tokens"])
            print(f"{a} vs {b}: {frac * 100:.1f}% identical tokens ({rows_same}/{G} rows)")
    return 0


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
    g = ap.add_argument_group("--generate (see the docstring)")
    g.add_argument("--generate", action="store_true", help="generation throughput instead of training steps")
    g.add_argument("--moe", default="build/moe", help="the moe binary (convert, moe-cli)")
    g.add_argument("--moe-build", default=None, help="build dir with libmoecore.a (default: --moe's directory)")
    g.add_argument("--gen-variants", default="moe,moe-cli,hf-eager,hf-grouped_mm",
                   help="comma list of moe, moe-cli, hf-EXPERTS[@ATTN] (EXPERTS: eager, grouped_mm, "
                        "batched_mm; ATTN: sdpa, eager; default --gen-hf-attn)")
    g.add_argument("--gen-prompts", default="distinct,same", help="prompt sets: distinct, same")
    g.add_argument("--gen-batch", type=int, default=8, help="G prompts")
    g.add_argument("--gen-prompt-len", type=int, default=16, help="P tokens per prompt")
    g.add_argument("--gen-new", default="64,256", help="N new tokens, comma list")
    g.add_argument("--gen-warmup", type=int, default=2, help="new tokens of the untimed warm-up generation")
    g.add_argument("--gen-reps1", type=int, default=3, help="repetitions of t(1) (median)")
    g.add_argument("--gen-hf-attn", default="sdpa", help="transformers attn_implementation (sdpa, eager)")
    g.add_argument("--gen-max-pos", type=int, default=4096, help="max_position_embeddings of the model")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--gen-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gen-build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.gen_build:
        return gen_build_model(args, args.work)
    if args.gen_worker:
        args.gen_new_list = [int(x) for x in args.gen_new.split(",")]
        return gen_worker(args)
    if args.generate:
        if args.moe_build is None:
            args.moe_build = os.path.dirname(os.path.abspath(args.moe))
        return gen_main(args)

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
