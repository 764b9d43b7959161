"""What a Lightning checkpoint records for the export, and so the values its readers need.

Every reader of a pickled checkpoint (``.ckpt``, ZeRO model states, FSDP ``meta.pt``) passes
:data:`CLIENT_NEEDED` to the restricted loader: a foreign object there stops the export, one
anywhere else (a user's hyper-parameter class, a callback's state) is left unread.
"""

from __future__ import annotations

__all__ = ["CHECKPOINT_KEY", "CLIENT_NEEDED", "LORA_HPARAMS"]

# Where LoraFinetuneModule and HFExport record what the export needs, inside any Lightning checkpoint.
CHECKPOINT_KEY = "lightning_lora"

# LoraFinetuneModule's hyperparameters that are LoraConfig fields of the same name: read from a
# checkpoint written before it recorded CHECKPOINT_KEY.
LORA_HPARAMS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora", "use_dora",
                "init_lora_weights", "bias")

# The hyper-parameters are needed only by a checkpoint without CHECKPOINT_KEY: checked where used.
CLIENT_NEEDED: list[tuple[str, ...]] = [(CHECKPOINT_KEY,), ("global_step",)]
