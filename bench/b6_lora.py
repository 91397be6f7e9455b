"""B6: LoRA+ calibration (`--lora`) against a full fine-tune (CPU memory) and against transformers + peft (GPU).

    python bench/b6_lora.py [--lengths 256,512,1024] [--rank 16] [--shape smollm2|small]  # CPU: one step's memory
    python bench/b6_lora.py --gpu [--length 16384] [--steps 6] [--warmup 2]  # GPU: vs transformers + peft

CPU part. One training step (forward, chunked loss, backward, clipping, AdamW) as
`pizoo.train.calibrate` runs it, on a random Llama (SmolLM2-135M's shape, or --shape small; pizoo.synthetic;
memory does not depend on the values), float32, batch 1, at three sequence lengths, in two
configurations, each (configuration, length) in a fresh child process so its peak RSS (from the OS)
is its own:

- full: every parameter trains (float32 weights, gradients, AdamW's two moments);
- LoRA+: `--lora RANK` on q,k,v,o with embeddings and norms trainable (pizoo.lora), frozen base
  without gradients or optimizer state.

The child also reports the resident memory after building the model, so the tables show what the
step adds, and the planner's estimate (pizoo.plan.estimate_memory) of the same step beside it.

GPU part (needs CUDA; a 1.1B synthetic Llama at 16k, bf16 autocast, SDPA, activation
checkpointing, rank 16 on q,k,v,o, embeddings and norms trainable in both):
- pizoo: `_build_training_model` with the LoRA settings (frozen base in bf16, trainable float32);
- transformers + peft: `LlamaForCausalLM` (sdpa, gradient checkpointing) loaded in bf16 with
  `get_peft_model(LoraConfig(r, alpha, target_modules, modules_to_save=[embed_tokens, norms]))`,
  the trainable parameters upcast to float32, the same autocast, AdamW and clipping.
Reported: tokens/s (median step after warmup) and peak GPU memory; target >= 1.3x tokens/s at no
more memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULT_PREFIX, WORK_DIR, Run, machine_info, ratio, reproduce_command, run_measured,
                    synthetic_1b_checkpoint, table, target, versions, write_result)

CONFIGS = ("full", "LoRA+")
TARGET_SPEEDUP = 1.3
# --shape: SmolLM2-135M's published shape, or a 31M-parameter Llama for a loaded 2-core machine.
SHAPES = {"smollm2": dict(hidden_size=576, num_layers=30, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                          vocab_size=49152),
          "small": dict(hidden_size=512, num_layers=8, intermediate_size=1376, num_heads=8, num_kv_heads=4,
                        vocab_size=16384)}
SHAPE_NAMES = {"smollm2": "SmolLM2-135M's shape", "small": "a 31M-parameter Llama shape (hidden 512, 8 layers, "
               "vocab 16384)"}


def shaped_checkpoint(shape: str, work: Path = WORK_DIR) -> Path:
    """A random Llama of shape SHAPES[shape] in float32 (written once)."""
    from pizoo.synthetic import write_synthetic_llama

    out = work / f"synthetic-{shape}-shape"
    if not (out / "config.json").is_file():
        import torch

        print(f"writing a random checkpoint with {SHAPE_NAMES[shape]} to {out}", flush=True)
        write_synthetic_llama(out, max_position_embeddings=2048, dtype=torch.float32, overwrite=True, **SHAPES[shape])
    return out


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _wrapper(model_dir: Path, seq_len: int, lora, device: str, checkpointing: bool):
    """The model `calibrate` trains (CausalLMLoss around LlamaModel), base weights loaded."""
    import torch

    from pizoo.checkpoint import open_checkpoint
    from pizoo.train import DEFAULT_LOSS_CHUNK, _build_training_model, _Dist, _load_base_weights

    ckpt = open_checkpoint(model_dir)
    cfg = ckpt.config
    wrapper = _build_training_model(cfg, cfg.rope, max(seq_len, cfg.original_context), torch.device(device), _Dist(),
                                    0, checkpointing, DEFAULT_LOSS_CHUNK, lora)
    _load_base_weights(wrapper, ckpt)
    return wrapper, cfg


def cpu_child(model_dir: Path, seq_len: int, config: str, rank: int) -> None:
    import torch

    from pizoo.lora import lora_settings
    from pizoo.plan import Hardware, estimate_memory

    lora = lora_settings(rank) if config == "LoRA+" else None
    wrapper, cfg = _wrapper(model_dir, seq_len, lora, "cpu", False)
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-5, betas=(0.9, 0.95))
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    loaded = rss_now_mib()
    start = time.perf_counter()
    loss = wrapper(ids[:, :-1], torch.arange(seq_len)[None], ids[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    seconds = time.perf_counter() - start
    est = estimate_memory(cfg, Hardware("cpu", "CPU", 1, 1 << 40, 1e9, 0.3, "bench"), train_len=seq_len,
                          activation_checkpointing=False, lora=lora)
    planned = (est.weights + est.gradients + est.optimizer + est.activations + est.logits_chunked) / 2**20
    print(RESULT_PREFIX + json.dumps({"loaded_rss_mib": loaded, "step_s": seconds, "loss": float(loss),
                                      "trainable": sum(p.numel() for p in trainable),
                                      "planned_step_mib": round(planned - est.weights / 2**20, 1)}), flush=True)


def cpu_main(args) -> None:
    work = WORK_DIR / "b6"
    work.mkdir(parents=True, exist_ok=True)
    machine, vers = machine_info(), versions()
    model_dir = shaped_checkpoint(args.shape)
    lengths = [int(x) for x in args.lengths.split(",")]
    runs: list[Run] = []
    for T in lengths:
        order = CONFIGS if lengths.index(T) % 2 == 0 else CONFIGS[::-1]  # neither always runs first
        for config in order:
            cmd = [sys.executable, __file__, "--child", config, "--model-dir", str(model_dir), "--seq-len", str(T),
                   "--rank", str(args.rank)]
            run = run_measured(cmd, label=f"{config} @ {T}", log_path=work / f"{config.strip('+')}-{T}.log",
                               env={"OMP_NUM_THREADS": str(args.threads)})
            run.reported.update({"config": config, "seq_len": T})
            runs.append(run)
            print(f"  {config:<6} T={T:<6} peak RSS {run.peak_rss_mib:8.1f} MiB (after load "
                  f"{run.reported['loaded_rss_mib']:.1f})  step {run.reported['step_s']:.1f} s", flush=True)

    def get(config: str, T: int, key: str) -> float:
        r = next(r for r in runs if r.reported["config"] == config and r.reported["seq_len"] == T)
        return r.peak_rss_mib if key == "peak_rss_mib" else r.reported[key]

    peak = {c: {T: get(c, T, "peak_rss_mib") for T in lengths} for c in CONFIGS}
    added = {c: {T: round(peak[c][T] - get(c, T, "loaded_rss_mib"), 1) for T in lengths} for c in CONFIGS}
    planned = {c: {T: get(c, T, "planned_step_mib") for T in lengths} for c in CONFIGS}
    trainable = {c: get(c, lengths[0], "trainable") for c in CONFIGS}
    ratios = {f"step memory at {T}, LoRA+ / full": ratio(added["LoRA+"][T], added["full"][T]) for T in lengths}
    ratios |= {f"peak RSS at {T}, LoRA+ / full": ratio(peak["LoRA+"][T], peak["full"][T]) for T in lengths}
    cols = ["configuration"] + [f"T={T}" for T in lengths]
    write_result(
        "b6_lora_memory", title="B6: LoRA+ vs full fine-tuning, memory of one CPU training step",
        command=reproduce_command(), machine=machine, versions_=vers,
        settings={"model": f"random Llama with {SHAPE_NAMES[args.shape]} (pizoo.synthetic), float32, CPU", "batch": 1,
                  "step": "forward, chunked loss, backward, clip, AdamW", "lengths": args.lengths,
                  "LoRA+": f"rank {args.rank}, alpha {2 * args.rank}, q,k,v,o + embeddings and norms trainable",
                  "threads": args.threads},
        runs=runs, medians_={"peak_rss_mib": peak, "step_added_mib": added, "planned_step_mib": planned},
        ratios=ratios, targets=[],
        tables=[table(cols, [[c] + [peak[c][T] for T in lengths] for c in CONFIGS], "Peak RSS of the process, MiB"),
                table(cols, [[c] + [added[c][T] for T in lengths] for c in CONFIGS],
                      "Added by the step (peak minus resident memory after loading the model), MiB"),
                table(cols, [[c] + [planned[c][T] for T in lengths] for c in CONFIGS],
                      "The planner's estimate of what the step adds (gradients, AdamW, activations, loss chunk), MiB"),
                table(["configuration", "trainable parameters"], [[c, f"{trainable[c]:,}"] for c in CONFIGS])],
        notes=["One run per cell on a shared 2-core machine; peak RSS is stable from run to run, step times are not "
               "reported as results.",
               "The embeddings are trainable in LoRA+ (LongLoRA's setting), so they still get gradients and AdamW "
               "state; in small models they are a large share of the parameters, so a larger model saves more.",
               "The GPU comparison with transformers + peft (`python bench/b6_lora.py --gpu`) needs CUDA and has "
               "not run: no GPU was available in this session."])
    print("wrote bench/results/b6_lora_memory.json and bench/RESULTS.md")


# --- GPU: pizoo LoRA+ vs transformers + peft --------------------------------------------------

def gpu_child(model_dir: Path, seq_len: int, impl: str, rank: int, steps: int, warmup: int) -> None:
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, seq_len + 1), device="cuda")
    if impl == "pizoo":
        from pizoo.lora import lora_settings

        wrapper, _cfg = _wrapper(model_dir, seq_len, lora_settings(rank), "cuda", True)
        pos = torch.arange(seq_len, device="cuda")[None]

        def step_loss():
            return wrapper(ids[:, :-1], pos, ids[:, 1:])
        params = [p for p in wrapper.parameters() if p.requires_grad]
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 modules_to_save=["embed_tokens", "input_layernorm",
                                                                  "post_attention_layernorm", "norm"])).cuda()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # float32 master weights for what trains, as pizoo keeps them
        model.train()

        def step_loss():
            return model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts the labels
    opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95))
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    print(RESULT_PREFIX + json.dumps({"tokens_per_s": seq_len / statistics.median(times),
                                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                                      "loss": float(loss), "gpu": torch.cuda.get_device_name(0)}), flush=True)


def gpu_main(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("B6 --gpu needs an NVIDIA GPU (CUDA); none is available here")
    work = WORK_DIR / "b6"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = synthetic_1b_checkpoint()
    runs = []
    for impl in ("pizoo", "transformers+peft"):
        cmd = [sys.executable, __file__, "--gpu-child", impl, "--model-dir", str(model_dir), "--seq-len",
               str(args.length), "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        run = run_measured(cmd, label=f"{impl} @ {args.length}", log_path=work / f"gpu-{impl}.log")
        run.reported["impl"] = impl
        runs.append(run)
        print(f"  {impl:<18} {run.reported['tokens_per_s']:,.0f} tokens/s, peak {run.reported['peak_gib']:.2f} GiB")
    ours, theirs = runs[0].reported, runs[1].reported
    speedup = ratio(ours["tokens_per_s"], theirs["tokens_per_s"])
    memory = ratio(ours["peak_gib"], theirs["peak_gib"])
    write_result(
        "b6_lora_gpu", title="B6: LoRA+ calibration throughput on GPU (pizoo vs transformers + peft)",
        command=reproduce_command(), machine=machine_info(), versions_=versions(),
        settings={"model": "synthetic 1.1B Llama (bf16 weights)", "length": args.length, "rank": args.rank,
                  "targets": "q,k,v,o", "trainable": "embeddings and norms", "steps": args.steps,
                  "warmup": args.warmup, "gpu": ours["gpu"]},
        runs=runs, medians_={r.reported["impl"]: r.reported for r in runs},
        ratios={"tokens/s, pizoo / transformers+peft": speedup, "peak memory, pizoo / transformers+peft": memory},
        targets=[target("tokens/s vs transformers+peft", speedup, TARGET_SPEEDUP, op=">="),
                 target("peak memory vs transformers+peft", memory, 1.0)],
        tables=[table(["implementation", "tokens/s", "peak GiB"],
                      [[r.reported["impl"], round(r.reported["tokens_per_s"]), round(r.reported["peak_gib"], 2)]
                       for r in runs])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="256,512,1024")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="the CPU part's model shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="the GPU comparison with transformers + peft")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--gpu-child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cpu_child(args.model_dir, args.seq_len, args.child, args.rank)
    elif args.gpu_child:
        gpu_child(args.model_dir, args.seq_len, args.gpu_child, args.rank, args.steps, args.warmup)
    elif args.gpu:
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
