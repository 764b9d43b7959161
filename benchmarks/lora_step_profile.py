"""Where a LoRA training step of a Qwen2-0.5B-shaped model spends its time on a CUDA GPU.

A diagnostic for ``train_throughput.py --gpu``: a bare PEFT step (bf16 base, fp32 LoRA, autocast,
AdamW), no Trainer and no Lightning, timed at several batch shapes, then one step of 8 x 176
tokens under ``torch.profiler`` with its GPU kernel time and host CPU time. When the CPU time is
much larger than the kernel time, the step is bound by the host's per-operator dispatch and more
tokens per step cost almost nothing. Run on a machine with a CUDA GPU::

    python benchmarks/lora_step_profile.py | tee benchmarks/results/lora_step_profile_<gpu>.txt
"""
import time

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, Qwen2Config

cfg = Qwen2Config(vocab_size=151936, hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  max_position_embeddings=512, initializer_range=0.02)
torch.manual_seed(0)
with torch.device("cuda"):
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def step(ids, pos=None):
    with torch.autocast("cuda", torch.bfloat16):
        out = model(input_ids=ids, labels=ids, position_ids=pos)
    out.loss.backward()
    opt.step()
    opt.zero_grad()


def timed(name, rows, width, n=8, packed=False):
    ids = torch.randint(3, 380, (rows, width), device="cuda")
    pos = None
    if packed:  # 3 examples per row
        third = width // 3
        pos = torch.cat([torch.arange(third), torch.arange(third), torch.arange(width - 2 * third)]).repeat(rows, 1).cuda()
    for _ in range(2):
        step(ids, pos)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step(ids, pos)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / n * 1000
    print(f"{name}: {ms:.1f} ms/step, {rows * width / ms * 1000:.0f} tokens/s", flush=True)


timed("bs1x176", 1, 176)
timed("bs8x176", 8, 176)
timed("bs3x512 packed", 3, 512, packed=True)
timed("bs20x512 packed", 20, 512, packed=True, n=4)
ids = torch.randint(3, 380, (8, 176), device="cuda")
step(ids)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step(ids)
    torch.cuda.synchronize()
events = prof.key_averages()
launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx"))
print(f"profiled bs8x176 step: {launches} kernel launches; the tables' footers give the host CPU time "
      "and the GPU kernel time ('Self CUDA time total')")
print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))
print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
