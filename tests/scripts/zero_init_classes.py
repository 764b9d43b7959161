"""One process, a real ``deepspeed.zero.Init`` (gloo, world size 1): Llama's classes imported before
the context, Qwen2's first imported inside it. Prints a JSON report for tests/test_model_classes.py."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402, F401  (its generation utilities import torch._dynamo, not to be imported inside zero.Init)
from transformers import GenerationMixin, PreTrainedModel  # noqa: E402, F401
from transformers.models.llama import modeling_llama  # noqa: E402  (imported before the context)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_lora.model_classes import restore_class_decorators  # noqa: E402
from lightning_lora.tiny import tiny_config  # noqa: E402

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op here (~30 s on 2 cores) that a
# zero.Init never uses; skipped as tests/deepspeed_cpu.py skips it for training.
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
llama_init = modeling_llama.LlamaAttention.__init__
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    assert "transformers.models.qwen2.modeling_qwen2" not in sys.modules
    from transformers.models.qwen2 import modeling_qwen2


def runs(arch: str) -> str:
    """'ok', or the error a new model of ``arch`` raises in its forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(arch, 64))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5]]))
    except AttributeError as err:
        return str(err)
    return "ok"


# transformers >= 5.25 with kernels installed wraps the attention classes' forward (functools.wraps).
report = {"decorated": hasattr(modeling_qwen2.Qwen2Attention.forward, "__wrapped__"),
          "qwen2_before": runs("qwen2"), "llama_before": runs("llama")}
report["restored"] = restore_class_decorators()
report["restored_again"] = restore_class_decorators()
report["qwen2_after"] = runs("qwen2")
report["llama_init_unchanged"] = modeling_llama.LlamaAttention.__init__ is llama_init
print("REPORT " + json.dumps(report))
