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
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> import deepspeed_cpu

from deepspeed_cpu import CPUDeepSpeedStrategy, cpu_deepspeed_env  # noqa: E402  (sets DS_ACCELERATOR first)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from lightning_lora import InstructionDataModule, LoraFinetuneModule  # noqa: E402
from lightning_lora.callbacks import HFExport  # noqa: E402
from lightning_lora.tiny import quickstart_rows  # noqa: E402


class UserModule(L.LightningModule):
    """A LightningModule written by a user, not ours: the PEFT model lives in ``self.net``, under
    the adapter name the user chose; initialisations that need data (CorDA, LoRA-GA) are prepared
    the way PEFT documents it, on a few batches of fixed calibration ids."""

    def __init__(self, base: str, lora: dict, adapter_name: str = "default") -> None:
        super().__init__()
        self.base, self.lora, self.adapter_name = base, lora, adapter_name
        self.net: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        from peft import LoraConfig, get_peft_model

        base = _from_pretrained(self.base, self.trainer.strategy)
        config = LoraConfig(**self.lora)
        _prepare_data_driven_init(base, config)
        self.net = get_peft_model(base, config, adapter_name=self.adapter_name)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        weight = batch.pop("loss_weight", 1)  # a padding batch trains nothing (InstructionDataModule)
        loss = self.net(**batch).loss * weight
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _from_pretrained(path: str, strategy: object) -> torch.nn.Module:
    """The base, loaded as transformers documents it for ZeRO-3 (``HfDeepSpeedConfig`` alive while
    it loads into the partitions Lightning's ``deepspeed.zero.Init`` creates)."""
    from transformers import AutoModelForCausalLM

    if not getattr(strategy, "zero_stage_3", False):
        return AutoModelForCausalLM.from_pretrained(path)
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ds_config = HfDeepSpeedConfig(strategy.config)  # noqa: F841 (transformers keeps a weak reference)
    try:
        return AutoModelForCausalLM.from_pretrained(path)
    finally:
        unset_hf_deepspeed_config()


def _import_late_arch(module: L.LightningModule, arch: str, record: dict) -> None:
    """Make ``module.configure_model`` first import ``arch``'s model classes (inside
    ``deepspeed.zero.Init`` under ZeRO-3), recording whether it was the first import and inside it."""
    configure = module.configure_model

    def configure_importing_first() -> None:
        import importlib

        from deepspeed.runtime.zero import partition_parameters

        name = f"transformers.models.{arch}.modeling_{arch}"
        record["first_import"] = name not in sys.modules
        record["inside_zero_init"] = partition_parameters.zero_init_context > 0
        importlib.import_module(name)
        configure()

    module.configure_model = configure_importing_first


def _run_late_arch(arch: str, vocab_size: int, record: dict) -> None:
    """Build a fresh ``arch`` model after fit (the context has exited) and run it."""
    from transformers import AutoModelForCausalLM

    from lightning_lora.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    ids = torch.randint(3, vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    record["logits_shape"] = list(logits.shape)
    record["logits_finite"] = bool(torch.isfinite(logits).all())


def _prepare_data_driven_init(base: torch.nn.Module, config) -> None:
    """CorDA's covariances and LoRA-GA's gradients, from fixed calibration batches (PEFT's recipe)."""
    init = str(config.init_lora_weights)
    if init not in ("corda", "lora_ga"):
        return
    generator = torch.Generator().manual_seed(0)
    # One sequence per batch: CorDA's hooks take (tokens, features) inputs.
    batches = [torch.randint(3, base.config.vocab_size, (1, 24), generator=generator) for _ in range(4)]
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config.corda_config = CordaConfig(corda_method="ipm")

        def run_model() -> None:
            with torch.no_grad():
                for ids in batches:
                    base(input_ids=ids)

        preprocess_corda(base, config, run_model=run_model)
    else:
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config.lora_ga_config = LoraGAConfig()

        def train_step() -> None:
            for ids in batches:
                base(input_ids=ids, labels=ids).loss.backward()

        preprocess_loraga(base, config, train_step)


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
    parser.add_argument("--export-shard-size", default="5GB", help="HFExport(max_shard_size=...)")
    parser.add_argument("--steps", type=int, default=4, help="max_steps (the total, when resuming)")
    parser.add_argument("--resume-from", default=None, help="checkpoint to resume (ckpt_path of trainer.fit)")
    parser.add_argument("--record", action="store_true", help="write start.pt and finished.json (see above)")
    parser.add_argument("--added-tokens", default="", help="comma-separated new tokens; every answer ends with one")
    parser.add_argument("--init", default=None, help="init_lora_weights (pissa, olora, corda, lora_ga, ...)")
    parser.add_argument("--lora-bias", action="store_true", help="LoraConfig(lora_bias=True)")
    parser.add_argument("--rank-pattern", default="", help="a JSON rank_pattern, e.g. '{\"v_proj\": 2}'")
    parser.add_argument("--adapter-name", default="default", help="the user module's adapter name")
    parser.add_argument("--top-k-checkpoints", action="store_true",
                        help="ModelCheckpoint(save_top_k=2, monitor='score', mode='min') every step, no save_last; "
                        "the logged scores make step 2 the best and the last checkpoint written one of step 4")
    parser.add_argument("--quantization", default=None, help="LoraFinetuneModule(quantization=...): nf4 or fp4 (QLoRA)")
    parser.add_argument("--dtype", default="fp32", help="LoraFinetuneModule(dtype=...): the compute dtype of a 4-bit base")
    parser.add_argument("--merge-base", default="dequantized", help="HFExport(merge_base=...)")
    parser.add_argument("--fail-at", type=int, default=None, help="training_step raises at this step")
    parser.add_argument("--export-on-exception", action="store_true")
    parser.add_argument("--inject-oserror", action="store_true",
                        help="reading the final checkpoint raises OSError on global rank 0, as a network filesystem can")
    parser.add_argument("--late-arch", default=None, help="configure_model first imports this architecture's "
                        "model classes; after fit a new model of it runs (OUT/late_arch.json)")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="ModelCheckpoint(every_n_train_steps=N, save_top_k=-1) into OUT/checkpoints")
    parser.add_argument("--log-losses", action="store_true", help="write OUT/losses-rankR.pt: each step's loss")
    parser.add_argument("--pg-timeout", type=float, default=None, help="process-group timeout in seconds")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this global step, as a preempted run would (--steps stays the planned total)")
    parser.add_argument("--seed", type=int, default=None, help="seed_everything(SEED) first (the LoRA init repeats)")
    parser.add_argument("--rows", type=int, default=64, help="training rows (before the 1/8 validation split)")
    parser.add_argument("--accumulate", type=int, default=1, help="Trainer(accumulate_grad_batches=...)")
    parser.add_argument("--val-batches", type=int, default=1, help="Trainer(limit_val_batches=...): 0 runs no validation")
    parser.add_argument("--dump-state", action="store_true",
                        help="write OUT/{start,end}_state.pt (weights, Adam moments, step, as the optimizer holds "
                             "them: DeepSpeed's own safe_get_full_* under DeepSpeed) and OUT/steps-rankR.pt (each "
                             "step's micro-batches as token ids, padding batches left out, and the lr)")
    parser.add_argument("--keep-checkpoints", choices=["complete", "plain"], default=None,
                        help="CompleteCheckpoint (or Lightning's ModelCheckpoint) into OUT/checkpoints: every step, the "
                        "newest 2 by step, save_last=True; --resume-from auto|last is then resolved by resolve_ckpt_path")
    parser.add_argument("--preemption", action="store_true", help="add the Preemption callback")
    parser.add_argument("--signal-at", default=None, help="STEP:RANK:SIGNAL: global rank RANK sends itself SIGNAL "
                        "when the batch after global_step STEP starts")
    parser.add_argument("--kill-in-save", default=None, help="STEP:TEXT: global rank 0 sends itself SIGKILL right after "
                        "torch.save wrote a file whose path holds TEXT while global_step is STEP")
    return parser.parse_args()


class RecordLosses(L.Callback):
    """Each training step's loss on this rank, by global step."""

    def __init__(self) -> None:
        self.losses: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step] = loss.detach().cpu().clone()


def main() -> None:
    args = parse()
    cpu_deepspeed_env()
    if args.seed is not None:
        L.seed_everything(args.seed)
    out = Path(args.out)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    added = args.added_tokens.split(",") if args.added_tokens else []
    lora = dict(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                modules_to_save=args.modules_to_save.split(",") if args.modules_to_save else None,
                use_rslora=args.rslora, use_dora=args.dora)
    if args.init is not None:
        lora["init_lora_weights"] = args.init
    extra = {"lora_bias": True} if args.lora_bias else {}
    if args.rank_pattern:
        extra["rank_pattern"] = json.loads(args.rank_pattern)
    if args.user_module:
        module: L.LightningModule = UserModule(args.base, {**lora, **extra, "task_type": "CAUSAL_LM"}, args.adapter_name)
    else:
        module = LoraFinetuneModule(args.base, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                                    added_tokens=added or None, quantization=args.quantization, dtype=args.dtype, **lora)
    step = module.training_step

    def instrumented_step(batch: dict, batch_idx: int) -> torch.Tensor:
        if module.global_step == args.fail_at:
            raise RuntimeError("simulated failure")
        # Steps 1..4 score 5, 1, 3, 2: kept top-2 (lowest) are then steps 2 and 4, and step 2 is "best".
        module.log("score", float(SCORES[module.global_step % len(SCORES)]))
        return step(batch, batch_idx)

    module.training_step = instrumented_step
    late_arch: dict = {}
    if args.late_arch:
        _import_late_arch(module, args.late_arch, late_arch)
    if args.inject_oserror:
        _inject_oserror()
    data_file = out / "train.jsonl"
    if "LOCAL_RANK" not in os.environ or args.num_nodes > 1:
        # The launching process writes; the ranks Lightning starts read. Processes started by an
        # outside launcher (torchrun, one per node) each write the same rows, atomically.
        out.mkdir(parents=True, exist_ok=True)
        rows = quickstart_rows("train")[:args.rows]
        if added:  # the new tokens appear in the answers, so their embeddings are trained
            rows = [{**row, "output": f"{row['output']} {added[i % len(added)]}"} for i, row in enumerate(rows)]
        tmp = data_file.with_name(f".train-{os.getpid()}.jsonl")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(data_file)
    data = InstructionDataModule(str(data_file), tokenizer=args.base, batch_size=4, val_split=0.125,
                                 template="human_assistant", max_length=64, added_tokens=added or None)

    timeout = {"timeout": datetime.timedelta(seconds=args.pg_timeout)} if args.pg_timeout else {}
    if args.strategy == "deepspeed":
        strategy: object = CPUDeepSpeedStrategy(stage=args.stage, exclude_frozen_parameters=args.exclude_frozen, **timeout)
    elif args.strategy == "ddp":
        strategy = DDPStrategy(**timeout)
    else:
        strategy = "auto"
    export = HFExport(dirpath=str(out / "export"), dtype=args.export_dtype, base_model=args.export_base_model,
                      export_on_exception=args.export_on_exception, max_shard_size=args.export_shard_size,
                      merge_base=args.merge_base)
    callbacks: list[L.Callback] = [export] if args.export else []
    if args.top_k_checkpoints:
        # The one written last (step 4) is neither ModelCheckpoint's "best" (step 2) nor a "last".
        callbacks.insert(0, ModelCheckpoint(dirpath=out / "checkpoints", monitor="score", mode="min", save_top_k=2,
                                            every_n_train_steps=1, save_last=False))
    if args.record:
        callbacks.append(RecordStart(out / "start.pt"))
    callbacks += _preemption_callbacks(args, out)
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=args.checkpoint_every,
                                         save_top_k=-1, filename="{step}"))
    losses = RecordLosses()
    if args.log_losses:
        callbacks.append(losses)
    if args.dump_state:
        callbacks.append(DumpState(out))
    if args.stop_at is not None:
        callbacks.append(StopAt(args.stop_at))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, precision=args.precision,
        max_steps=args.steps, limit_val_batches=args.val_batches, accumulate_grad_batches=args.accumulate, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=args.top_k_checkpoints or bool(args.checkpoint_every) or bool(args.keep_checkpoints),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks, default_root_dir=str(out),
    )
    ckpt_path = args.resume_from
    if args.keep_checkpoints and ckpt_path in ("auto", "last"):
        from lightning_lora import resolve_ckpt_path

        ckpt_path = resolve_ckpt_path(trainer, ckpt_path)
        if trainer.is_global_zero:
            (out / "resumed_from.txt").write_text(str(ckpt_path))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if args.log_losses:
        torch.save(losses.losses, out / f"losses-rank{trainer.global_rank}.pt")
    trainer.save_checkpoint(out / "ckpt")
    trained = _gather_trained(trainer, module)
    frozen = _gather_lora_bases(module) if args.init is not None else None
    if trainer.is_global_zero:
        torch.save(trained, out / "trained.pt")
        if frozen is not None:
            torch.save(frozen, out / "frozen.pt")
        if args.quantization:
            torch.save(_trained_logits(module), out / "trained_logits.pt")
        if args.late_arch:
            _run_late_arch(args.late_arch, 128, late_arch)
            (out / "late_arch.json").write_text(json.dumps(late_arch))
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


class StopAt(L.Callback):
    """End fit after global step ``step`` (after ModelCheckpoint, listed before it, saved that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class DumpState(L.Callback):
    """What the optimizer holds when training starts (after a resume) and ends, and what each step trained."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[dict] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "start_state.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "end_state.pt")
        torch.save(self.steps, self.out / f"steps-rank{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        rows = [] if "loss_weight" in batch else _example_ids(batch)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.steps.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "rows": rows, "lr": lr})

    def _dump(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> None:
        state: dict = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}, "global_step": trainer.global_step}
        deepspeed_run = isinstance(trainer.strategy, CPUDeepSpeedStrategy)
        for key, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if deepspeed_run:  # DeepSpeed's own gathering (a collective under ZeRO-3)
                from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

                state["weights"][key] = safe_get_full_fp32_param(param).cpu().clone()
                started = bool(trainer.strategy.deepspeed_engine.optimizer.optimizer.state)  # none before a first step
                for moment in ("exp_avg", "exp_avg_sq"):
                    state[moment][key] = safe_get_full_optimizer_state(param, moment).cpu().clone() if started else None
            else:
                slot = trainer.optimizers[0].state[param]
                state["weights"][key] = param.detach().float().cpu().clone()
                for moment in ("exp_avg", "exp_avg_sq"):
                    state[moment][key] = slot[moment].cpu().clone() if slot else None
        inner = trainer.strategy.deepspeed_engine.optimizer.optimizer if deepspeed_run else trainer.optimizers[0]
        state["steps"] = sorted({int(slot["step"]) for slot in inner.state.values() if "step" in slot})
        if trainer.is_global_zero:
            torch.save(state, self.out / name)


def _example_ids(batch: dict) -> list[tuple[int, ...]]:
    """The token ids of each example of a padded or packed batch (a packed row's examples restart
    their position ids at 0; padding is single zeros)."""
    if "position_ids" not in batch:
        return [tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    examples = []
    for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        examples += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:]) if b - a >= 2]
    return examples


SCORES = (5, 1, 3, 2)


def _preemption_callbacks(args: argparse.Namespace, out: Path) -> list[L.Callback]:
    """--keep-checkpoints, --preemption, --signal-at and --kill-in-save (tests/test_preemption.py)."""
    from lightning_lora.callbacks import CompleteCheckpoint, Preemption

    used = args.keep_checkpoints or args.preemption or args.signal_at or args.kill_in_save
    callbacks: list[L.Callback] = [RecordStop(out)] if used else []
    if args.keep_checkpoints:
        kind = CompleteCheckpoint if args.keep_checkpoints == "complete" else ModelCheckpoint
        callbacks.append(kind(dirpath=out / "checkpoints", filename="{step}", every_n_train_steps=1, save_top_k=2,
                              monitor="step", mode="max", save_last=True))
    if args.preemption:
        callbacks.append(Preemption())
    if args.signal_at:
        step, rank, name = args.signal_at.split(":")
        callbacks.append(SendSignal(int(step), int(rank), name))
    if args.kill_in_save:
        step, text = args.kill_in_save.split(":", 1)
        callbacks.append(KillInSave(int(step), text))
    return callbacks


class RecordStop(L.Callback):
    """OUT/stopped-rankR.json when fit ends in an exception: its type, exit code and global step."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        stop = {"type": type(exception).__name__, "code": getattr(exception, "code", None), "global_step": trainer.global_step}
        (self.out / f"stopped-rank{trainer.global_rank}.json").write_text(json.dumps(stop))


class SendSignal(L.Callback):
    """Global rank ``rank`` sends itself a real signal when the batch after ``step`` starts."""

    def __init__(self, step: int, rank: int, name: str) -> None:
        self.step, self.rank, self.name, self.sent = step, rank, name, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.sent:
            import signal

            self.sent = True
            os.kill(os.getpid(), signal.Signals[self.name])


class KillInSave(L.Callback):
    """Global rank 0 dies by SIGKILL right after torch.save wrote a file whose path holds ``text``
    at global step ``step``: a real kill in the middle of a real save."""

    def __init__(self, step: int, text: str) -> None:
        self.step, self.text = step, text

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import signal

        save = torch.save

        def save_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            result = save(obj, f, *args, **kwargs)
            if trainer.global_rank == 0 and trainer.global_step == self.step and self.text in str(f):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        torch.save = save_then_die


def _inject_oserror() -> None:
    """Reading a checkpoint's rank files fails on global rank 0 as a flaky network filesystem would."""
    import lightning_lora.export.zero as zero

    original = zero._load

    def flaky(path: Path, *args, **kwargs) -> dict:
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            raise OSError(f"[Errno 5] Input/output error: {str(path)!r} (injected)")
        return original(path, *args, **kwargs)

    zero._load = flaky


@torch.no_grad()
def _trained_logits(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The live trained model's logits on fixed ids (eval mode: no dropout; LoraFinetuneModule keeps
    its 4-bit layers on training's arithmetic in eval mode too)."""
    model = module.model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "logits": model(input_ids=ids).logits.float()}


def _gather_lora_bases(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The base weights of the LoRA layers as training ended (an initialisation may have rewritten
    them), full, named as in the PEFT model. Not partitioned: the runs that use it are not ZeRO-3."""
    return {name.removeprefix(_attribute(module)): param.detach().float().cpu().clone()
            for name, param in module.named_parameters() if name.endswith(".base_layer.weight")}


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
    try:
        main()
    except SystemExit as stop:  # Preemption's: leave with its code, skipping the teardown (see below)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code if isinstance(stop.code, int) else 1)
    # Everything is on disk now. Skip the interpreter's teardown: with gloo's (and, under torchrun,
    # the rendezvous store's) C++ threads alive it aborts now and then after the work is done
    # ("terminate called without an active exception", exit -6), seen with ZeRO-1 and two torchrun
    # nodes even after destroy_process_group. The race is in PyTorch's teardown, not in the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
