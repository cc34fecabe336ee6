#!/usr/bin/env python3
"""bench/hf_logits_check.py - our forward against transformers' DeepseekV3, through `moe convert`.

For each of a few tiny configurations:
  1. build a random DeepseekV3ForCausalLM in transformers (float32, eager attention, rope_interleave=True
     as in DeepSeek's checkpoints; weights drawn at unit scale, random norm gains and routing biases,
     so that attention, RoPE and routing all move the loss), save it with save_pretrained (sharded
     safetensors + index);
  2. `moe convert --from-hf` it to an HDF5 checkpoint;
  3. write a token shard (SPEC 3) and compare transformers' mean cross-entropy over the same sequences
     with `moe eval` (relative error < 1e-4); as a control, the loss with the other RoPE layout
     (rope_interleave=False) must differ by more than that, so the check would see a RoPE mistake;
     for the YaRN variant (rope_type yarn, an original context of 16 < seq_len, mscale 0.707 and
     mscale_all_dim 1, so that both the cos/sin multiplier and the softmax scale's mscale^2 differ from
     1) the losses without YaRN, without the mscale^2 and with attention_factor 1 must differ too, and
     the same files with DeepSeek's old spelling (rope_scaling {"type": "yarn"}, rope_theta outside)
     must convert to a model with the same loss;
  4. `moe convert --to-hf` back (f32 and bf16, sharded) and compare every tensor with the saved ones
     (f32 bit-exact, bf16 = round-to-nearest-even of the f32 value; the routing bias stays f32), and
     load the f32 export with from_pretrained (no missing or unexpected keys, same loss).

Needs torch, transformers and safetensors (not part of CI):
    python3 bench/hf_logits_check.py --moe build/moe
`--convert CMD` runs the conversions with another command (default: MOE convert).
Exit status 0 when every check passes.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

TOL = 1e-4

VARIANTS = {
    # q_lora, group-limited sigmoid routing (2 groups, top-1 group), one dense layer, shared expert
    "qlora-groups": dict(q_lora_rank=32, n_group=2, topk_group=1, first_k_dense_replace=1,
                         n_shared_experts=1, num_experts_per_tok=2, norm_topk_prob=True),
    # plain q_proj, no groups, every layer MoE, two shared experts, no renormalisation
    "qproj-flat": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                       n_shared_experts=2, num_experts_per_tok=3, norm_topk_prob=False),
    # qlora-groups with YaRN: factor 4 over an original context of 16 (max_position_embeddings 64)
    "qlora-yarn": dict(q_lora_rank=32, n_group=2, topk_group=1, first_k_dense_replace=1,
                       n_shared_experts=1, num_experts_per_tok=2, norm_topk_prob=True,
                       max_position_embeddings=64,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 16, "beta_fast": 32,
                                        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}),
}


def make_config(v):
    kw = dict(max_position_embeddings=512,
              rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    kw.update(v)
    return DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        routed_scaling_factor=1.7, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=24, rms_norm_eps=1e-5, rope_interleave=True,
        tie_word_embeddings=False, num_mtp_layers=0, bos_token_id=0, eos_token_id=1,
        attn_implementation="eager", **kw)


def is_yarn(v):
    return v.get("rope_parameters", {}).get("rope_type") == "yarn"


@torch.no_grad()
def yarn_controls(model, v, tokens, T, B):
    """Losses of the model with each part of YaRN undone: the check must see every one of them."""
    out = []
    plain = dict(v, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    other = DeepseekV3ForCausalLM(make_config(plain)).float().eval()
    other.load_state_dict(model.state_dict())
    out.append(("no YaRN", hf_loss(other, tokens, T, B)[0]))
    attns = [layer.self_attn for layer in model.model.layers]
    scales = [a.scaling for a in attns]
    for a in attns:
        a.scaling = a.qk_head_dim ** -0.5
    out.append(("no mscale^2", hf_loss(model, tokens, T, B)[0]))
    for a, s in zip(attns, scales):
        a.scaling = s
    rope = model.model.rotary_emb
    factor = rope.attention_scaling
    rope.attention_scaling = 1.0
    out.append(("attention_factor 1 (not %.4f)" % factor, hf_loss(model, tokens, T, B)[0]))
    rope.attention_scaling = factor
    return out


def old_spelling(hf_dir, out_dir):
    """The same files with DeepSeek's config spelling: rope_scaling {"type": "yarn"}, rope_theta apart."""
    shutil.copytree(hf_dir, out_dir)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    cfg["rope_scaling"] = rp
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


@torch.no_grad()
def randomise(model, gen):
    """Unit-scale weights (1/sqrt(fan_in)), norm gains around 1, a non-zero routing bias."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            # sharper attention and logits: position (RoPE) and token matter more to the loss
            sharp = ("lm_head", "q_proj", "q_b_proj", "kv_a_proj_with_mqa")
            scale = 2.0 if any(s in name for s in sharp) else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def write_shard(path, tokens):
    with open(path, "wb") as f:
        f.write(b"MOESHARD" + struct.pack("<IIQ", 1, 2, len(tokens)) + bytes(40))
        f.write(struct.pack("<%dH" % len(tokens), *tokens))


@torch.no_grad()
def hf_loss(model, tokens, T, B):
    """Mean cross-entropy the way `moe eval` reads a shard: sequence i = tokens[i*T : i*T+T+1]."""
    n_seq = (len(tokens) - 1) // T
    total, count = 0.0, 0
    for i0 in range(0, n_seq, B):
        rows = [tokens[i * T:i * T + T + 1] for i in range(i0, min(n_seq, i0 + B))]
        x = torch.tensor(rows, dtype=torch.long)
        logits = model(input_ids=x[:, :-1]).logits.double()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               x[:, 1:].reshape(-1), reduction="sum")
        total += ce.item()
        count += x[:, 1:].numel()
    return total / count, count


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit("FAILED: %s\n%s%s" % (" ".join(cmd), r.stdout, r.stderr))
    return r.stdout


def hf_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def compare_export(ref, d, bf16):
    got = hf_tensors(d)
    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    if missing or extra:
        return "missing %s, unexpected %s" % (missing[:3], extra[:3])
    for k, a in ref.items():
        b = got[k]
        if list(a.shape) != list(b.shape):
            return "%s: shape %s vs %s" % (k, list(b.shape), list(a.shape))
        keep_f32 = k.endswith("e_score_correction_bias")
        want = a.float() if (not bf16 or keep_f32) else a.float().to(torch.bfloat16)
        if b.dtype != want.dtype or not torch.equal(b, want):
            return "%s: values (%s vs %s) differ" % (k, b.dtype, want.dtype)
    return None


def check_yarn(name, v, model, tokens, T, B, ref, ours, hf_dir, d, shard, args, convert):
    """The controls (each part of YaRN matters) and DeepSeek's old config spelling."""
    ok = True
    for label, wrong in yarn_controls(model, v, tokens, T, B):
        rel_wrong = abs(wrong - ref) / ref
        ok &= rel_wrong > TOL
        print("%-13s control, %s: loss %.6f, rel %.1e  %s"
              % (name, label, wrong, rel_wrong, "ok" if rel_wrong > TOL else "FAIL (not seen)"))
    old_dir, old_ckpt = os.path.join(d, "hf-old"), os.path.join(d, "model-old.h5")
    old_spelling(hf_dir, old_dir)
    run(convert + ["--from-hf", old_dir, "--out", old_ckpt])
    out = run([args.moe, "eval", "--checkpoint", old_ckpt, "--data", shard,
               "--set", "train.seq_len=%d" % T, "--set", "train.micro_batch=%d" % B])
    old = json.loads(out.strip().splitlines()[-1])["loss"]
    good = old == ours
    ok &= good
    print("%-13s rope_scaling {\"type\": \"yarn\"} spelling: moe eval %.6f (%s)  %s"
          % (name, old, "identical" if good else "differs", "ok" if good else "FAIL"))
    return ok


def check_variant(name, v, args, work, convert):
    ok = True
    d = os.path.join(work, name)
    os.makedirs(d)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(make_config(v)).float().eval()
    randomise(model, gen)
    hf_dir = os.path.join(d, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="150KB")
    shards = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]

    ckpt = os.path.join(d, "model.h5")
    run(convert + ["--from-hf", hf_dir, "--out", ckpt])

    T, B = args.seq_len, 4
    tokens = torch.randint(0, 256, (args.seqs * T + 1,), generator=gen).tolist()
    shard = os.path.join(d, "tokens.bin")
    write_shard(shard, tokens)
    out = run([args.moe, "eval", "--checkpoint", ckpt, "--data", shard,
               "--set", "train.seq_len=%d" % T, "--set", "train.micro_batch=%d" % B])
    ours = json.loads(out.strip().splitlines()[-1])
    ref, count = hf_loss(model, tokens, T, B)
    rel = abs(ours["loss"] - ref) / ref
    model.config.rope_interleave = False
    wrong, _ = hf_loss(model, tokens, T, B)
    model.config.rope_interleave = True
    rel_wrong = abs(wrong - ref) / ref
    good = rel < TOL and ours["tokens"] == count and rel_wrong > TOL
    ok &= good
    print("%-13s %d safetensors files; loss: transformers %.6f  moe eval %.6f  rel err %.2e "
          "(%d tokens)  [other RoPE layout: %.6f, rel %.1e]  %s"
          % (name, len(shards), ref, ours["loss"], rel, count, wrong, rel_wrong,
             "ok" if good else "FAIL"))
    if is_yarn(v):
        ok &= check_yarn(name, v, model, tokens, T, B, ref, ours["loss"], hf_dir, d, shard, args,
                         convert)

    ref_tensors = hf_tensors(hf_dir)
    for dtype in ("f32", "bf16"):
        back = os.path.join(d, "back-" + dtype)
        run(convert + ["--to-hf", ckpt, "--out", back, "--dtype", dtype, "--shard-size", "100KB"])
        why = compare_export(ref_tensors, back, dtype == "bf16")
        n = len([f for f in os.listdir(back) if f.endswith(".safetensors")])
        print("%-13s --to-hf %-4s: %d files, %d tensors: %s"
              % (name, dtype, n, len(ref_tensors), why or "identical" if dtype == "f32"
                 else why or "bf16 rounding of every weight, bias f32"))
        ok &= why is None

    back = os.path.join(d, "back-f32")
    again, info = DeepseekV3ForCausalLM.from_pretrained(back, output_loading_info=True,
                                                        attn_implementation="eager")
    again = again.float().eval()
    bad_keys = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    loss_again, _ = hf_loss(again, tokens, T, B)
    rp = again.config.rope_parameters
    want_rp = v.get("rope_parameters", {"rope_type": "default", "rope_theta": 5000.0})
    same_rope = all(rp.get(k) == want_rp[k] for k in want_rp)
    good = (not bad_keys and loss_again == ref and again.config.rope_interleave and same_rope)
    ok &= good
    print("%-13s from_pretrained(--to-hf f32): %s, rope %s, loss %.6f (%s)  %s"
          % (name, "keys match" if not bad_keys else {k: info[k] for k in bad_keys},
             "as saved" if same_rope else "DIFFERS: %s" % rp, loss_again,
             "identical" if loss_again == ref else "differs", "ok" if good else "FAIL"))
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moe", default="build/moe", help="the moe binary (for eval, and convert)")
    ap.add_argument("--convert", default=None,
                    help="command for conversions (default: MOE convert)")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    convert = shlex.split(args.convert) if args.convert else [args.moe, "convert"]
    import transformers
    print("torch %s, transformers %s" % (torch.__version__, transformers.__version__))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = args.work or tempfile.mkdtemp(prefix="hf-logits-")
    ok = True
    for name, v in VARIANTS.items():
        ok &= check_variant(name, v, args, work, convert)
    print("hf_logits_check: %s (work dir %s)" % ("PASS" if ok else "FAIL", work))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
