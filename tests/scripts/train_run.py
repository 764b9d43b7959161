"""Train a tiny LoRA run for the export tests, the way a user would, and record the truth.

Lightning re-runs this file for every extra rank (its subprocess launcher), so it is a plain
script; tests call it with ``subprocess``. It writes, under ``--out``:

- ``ckpt``: the final checkpoint (a ZeRO directory under DeepSpeed, a ``.ckpt`` file otherwise),
  saved with ``trainer.save_checkpoint``;
- ``trained.pt`` (rank 0): every trainable tensor at the end of training, full and in fp32, keyed
  like the PEFT model (``base_model.model....lora_A.default.weight``). Under DeepSpeed these are
  the fp32 master weights gathered with ``deepspeed.utils.safe_get_full_fp32_param``: the
  independent truth the export is compared with;
- ``export/`` when ``--export`` adds the ``HFExport`` callback;
- with ``--record`` (rank 0): ``start.pt``, what the engine holds when training starts (after a
  resume has restored its checkpoint): ``global_step``, ``trainable`` (as ``trained.pt``, the fp32
  master weights) and ``params`` (every parameter as the model computes with it, gathered under
  ZeRO-3, in its working dtype); and ``finished.json`` (``global_step`` and ``strict_loading`` after
  fit).

``--resume-from CKPT`` passes ``ckpt_path=CKPT`` to ``trainer.fit`` (a new Trainer resuming an earlier
run); ``--steps`` is then the total step count, the earlier run's steps included.

Example::

    python tests/scripts/train_run.py --base BASE --out OUT --strategy deepspeed --stage 3 --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> import deepspeed_cpu

from deepspeed_cpu import CPUDeepSpeedStrategy, cpu_deepspeed_env  # noqa: E402  (sets DS_ACCELERATOR first)

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_lora import InstructionDataModule, LoraFinetuneModule  # noqa: E402
from lightning_lora.callbacks import HFExport  # noqa: E402
from lightning_lora.tiny import quickstart_rows  # noqa: E402


class UserModule(L.LightningModule):
    """A LightningModule written by a user, not ours: the PEFT model lives in ``self.net``."""

    def __init__(self, base: str, lora: dict) -> None:
        super().__init__()
        self.base, self.lora = base, lora
        self.net: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.net = get_peft_model(AutoModelForCausalLM.from_pretrained(self.base), LoraConfig(**self.lora))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.net(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["single", "ddp", "deepspeed"], default="single")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1, help="Trainer(num_nodes=...); launch one process per node yourself, e.g. with torchrun")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--exclude-frozen", action="store_true")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated names, or all-linear")
    parser.add_argument("--modules-to-save", default="")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--alpha", type=int, default=8)
    parser.add_argument("--rslora", action="store_true")
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--user-module", action="store_true", help="train UserModule (self.net) instead of ours")
    parser.add_argument("--export", action="store_true", help="add HFExport(dirpath=OUT/export)")
    parser.add_argument("--export-dtype", default="auto")
    parser.add_argument("--export-base-model", default=None, help="HFExport(base_model=...), e.g. a wrong one")
    parser.add_argument("--steps", type=int, default=4, help="max_steps (the total, when resuming)")
    parser.add_argument("--resume-from", default=None, help="checkpoint to resume (ckpt_path of trainer.fit)")
    parser.add_argument("--record", action="store_true", help="write start.pt and finished.json (see above)")
    parser.add_argument("--added-tokens", default="", help="comma-separated new tokens; every answer ends with one")
    return parser.parse_args()


def main() -> None:
    args = parse()
    cpu_deepspeed_env()
    out = Path(args.out)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    added = args.added_tokens.split(",") if args.added_tokens else []
    lora = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets,
                modules_to_save=args.modules_to_save.split(",") if args.modules_to_save else None,
                use_rslora=args.rslora, use_dora=args.dora)
    if args.user_module:
        module: L.LightningModule = UserModule(args.base, {**lora, "task_type": "CAUSAL_LM"})
    else:
        module = LoraFinetuneModule(args.base, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                                    added_tokens=added or None, **lora)
    data_file = out / "train.jsonl"
    if "LOCAL_RANK" not in os.environ or args.num_nodes > 1:
        # The launching process writes; the ranks Lightning starts read. Processes started by an
        # outside launcher (torchrun, one per node) each write the same rows, atomically.
        out.mkdir(parents=True, exist_ok=True)
        rows = quickstart_rows("train")[:64]
        if added:  # the new tokens appear in the answers, so their embeddings are trained
            rows = [{**row, "output": f"{row['output']} {added[i % len(added)]}"} for i, row in enumerate(rows)]
        tmp = data_file.with_name(f".train-{os.getpid()}.jsonl")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(data_file)
    data = InstructionDataModule(str(data_file), tokenizer=args.base, batch_size=4, val_split=0.125,
                                 template="human_assistant", max_length=64, added_tokens=added or None)

    if args.strategy == "deepspeed":
        strategy: object = CPUDeepSpeedStrategy(stage=args.stage, exclude_frozen_parameters=args.exclude_frozen)
    elif args.strategy == "ddp":
        strategy = "ddp"
    else:
        strategy = "auto"
    export = HFExport(dirpath=str(out / "export"), dtype=args.export_dtype, base_model=args.export_base_model)
    callbacks: list[L.Callback] = [export] if args.export else []
    if args.record:
        callbacks.append(RecordStart(out / "start.pt"))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, precision=args.precision,
        max_steps=args.steps, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=str(out),
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume_from)
    trainer.save_checkpoint(out / "ckpt")
    trained = _gather_trained(trainer, module)
    if trainer.is_global_zero:
        torch.save(trained, out / "trained.pt")
        if args.record:
            finished = {"global_step": trainer.global_step, "strict_loading": module.strict_loading}
            (out / "finished.json").write_text(json.dumps(finished))
    # Leave the process group before the interpreter exits: exiting with gloo's threads still
    # running aborts the process now and then ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class RecordStart(L.Callback):
    """Save what the engine holds when training starts: after DeepSpeed set up, after any resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = {
            "global_step": trainer.global_step,
            "trainable": _gather_trained(trainer, pl_module),
            "params": _gather_params(trainer, pl_module),
        }
        if trainer.is_global_zero:
            torch.save(start, self.path)


def _attribute(module: L.LightningModule) -> str:
    return "net." if isinstance(module, UserModule) else "model."


def _gather_params(trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every parameter, full, in the dtype the model computes with. Runs on all ranks."""
    params = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):  # ZeRO-3 partition: gather it (a collective)
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                value = param.detach().cpu().clone()
        else:
            value = param.detach().cpu().clone()
        params[name.removeprefix(_attribute(module))] = value
    return params


def _gather_trained(trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Every trainable tensor, full and fp32, named as in the PEFT model. Runs on all ranks."""
    attribute = _attribute(module)
    trained = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(trainer.strategy, CPUDeepSpeedStrategy):
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(param)  # a collective under ZeRO-3
        else:
            value = param.detach()
        trained[name.removeprefix(attribute)] = value.float().cpu().clone()
    return trained


if __name__ == "__main__":
    main()
    # Everything is on disk now. Skip the interpreter's teardown: with gloo's (and, under torchrun,
    # the rendezvous store's) C++ threads alive it aborts now and then after the work is done
    # ("terminate called without an active exception", exit -6), seen with ZeRO-1 and two torchrun
    # nodes even after destroy_process_group. The race is in PyTorch's teardown, not in the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
