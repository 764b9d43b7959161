"""``lightning_lora.export.keys``: checkpoint key names -> the PEFT model's own ``state_dict`` names.

The PEFT-model key lists come from real tiny PEFT models (Llama, GPT-2, Bloom, Qwen2; plain LoRA,
all-linear, DoRA, ``modules_to_save``), so the names are the ones PEFT and transformers really use.
"""

from __future__ import annotations

import functools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lora.export.keys import PEFT_ROOT, detect_prefix, normalize_keys

LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
# A small but complete PEFT state: LoRA-wrapped, untouched and modules_to_save tensors.
PEFT_KEYS = (
    "base_model.model.model.embed_tokens.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
    LORA_KEY,
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
    "base_model.model.model.layers.0.self_attn.k_proj.weight",
    "base_model.model.lm_head.modules_to_save.default.weight",
)


def _state(prefix: str, wrapper: str = "") -> dict[str, str]:
    """Checkpoint keys under ``wrapper + prefix``; each value names the PEFT key it must end up at."""
    return {f"{wrapper}{prefix}{key}": key for key in PEFT_KEYS}


def _identity() -> dict[str, str]:
    return {key: key for key in PEFT_KEYS}


@pytest.mark.parametrize("wrapper", ["module.", "_forward_module."])
@pytest.mark.parametrize("prefix", ["model.", ""])
def test_legacy_wrapper_prefixes_are_stripped(wrapper: str, prefix: str) -> None:
    state = _state(prefix, wrapper)
    assert detect_prefix(state) == prefix
    assert normalize_keys(state) == _identity()
    assert normalize_keys(state, prefix) == _identity()


@pytest.mark.parametrize("prefix", ["model.", "net.", "a.b.", "student.lm.peft.", "base_model.", ""])
def test_any_attribute_path_is_detected_and_removed(prefix: str) -> None:
    state = _state(prefix)
    assert detect_prefix(state) == prefix
    assert normalize_keys(state) == _identity()


@pytest.mark.parametrize("prefix", ["net", "net.", "a.b", "a.b."])
def test_explicit_prefix_with_and_without_trailing_dot(prefix: str) -> None:
    attribute = prefix.removesuffix(".") + "."
    state = {**_state(attribute), **_state("other.")}  # a second PEFT model: detection alone would refuse
    assert normalize_keys(state, prefix) == _identity()


def test_values_travel_unchanged_with_their_keys() -> None:
    values = {f"net.{key}": object() for key in PEFT_KEYS}
    normalized = normalize_keys(values)
    for key, value in values.items():
        assert normalized[key.removeprefix("net.")] is value


def test_keys_outside_the_peft_model_are_dropped() -> None:
    state = {
        **_state("net."),
        "loss_fn.weight": "x",  # another attribute of the LightningModule
        "net_head.weight": "x",  # shares the attribute's first letters, not its path
        "net.extra.bias": "x",  # beside the PEFT model inside the same attribute
        "metrics.accuracy.total": "x",
        "module.ema.shadow": "x",  # behind a legacy wrapper, still outside
    }
    assert detect_prefix(state) == "net."
    assert normalize_keys(state) == _identity()
    assert normalize_keys(state, "net.") == _identity()


def test_several_peft_models_fail_naming_every_prefix_and_the_option() -> None:
    state = {**_state("student."), **_state("teacher.")}
    with pytest.raises(ValueError) as raised:
        detect_prefix(state)
    message = str(raised.value)
    assert "'student.'" in message and "'teacher.'" in message and "--prefix" in message
    with pytest.raises(ValueError, match="--prefix"):
        normalize_keys(state)
    # The explicit choice keeps only that model.
    assert normalize_keys(state, "teacher.") == _identity()


def test_a_checkpoint_without_a_peft_model_fails_clearly() -> None:
    plain_hf = {key.removeprefix(PEFT_ROOT): 0 for key in PEFT_KEYS}  # a merged model's state, no PEFT
    for call in (detect_prefix, normalize_keys):
        with pytest.raises(ValueError) as raised:
            call(plain_hf)
        assert repr(PEFT_ROOT) in str(raised.value) and "PEFT" in str(raised.value)
    with pytest.raises(ValueError, match="PEFT"):
        detect_prefix({})


def test_an_explicit_prefix_that_matches_nothing_names_it_and_what_is_there() -> None:
    with pytest.raises(ValueError) as raised:
        normalize_keys(_state("model."), "net")
    message = str(raised.value)
    assert "'net.'" in message
    # What would have worked: the prefix the checkpoint does hold.
    assert "'model.'" in message, message


@pytest.mark.parametrize("attribute", ["module.", "_forward_module.", "module.lm.", "module.module."])
def test_attribute_named_like_a_legacy_wrapper_with_explicit_prefix(attribute: str) -> None:
    # A user's ``self.module = get_peft_model(...)``: HFExport records prefix "module." (the
    # attribute's name) and passes it explicitly; the keys carry no legacy wrapper.
    state = _state(attribute)
    assert normalize_keys(state, attribute) == _identity()


@pytest.mark.parametrize("attribute", ["lm_base_model.model.", "base_model.model.", "teacher.base_model.model."])
def test_attribute_path_containing_the_peft_root_is_detected(attribute: str) -> None:
    # The prefix is an attribute path: it ends at a '.' boundary, and the inner HF model's module
    # names never contain 'base_model.model.' (PreTrainedModel.base_model is a property, not a
    # submodule), so the PEFT root is the last occurrence that starts a path component.
    state = _state(attribute)
    assert detect_prefix(state) == attribute
    assert normalize_keys(state) == _identity()


# --- property: any attribute path, any legacy wrapper, real PEFT key names -----------------------

_PEFT_SETUPS = {
    "llama-qv": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-dora": ("llama", dict(target_modules="all-linear", use_dora=True)),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bloom-qkv": ("bloom", dict(target_modules=["query_key_value", "dense_h_to_4h"])),
    "qwen2-lm-head": ("qwen2", dict(target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"])),
}


@functools.cache
def _peft_keys(setup: str) -> tuple[str, ...]:
    """The ``state_dict`` keys of a real tiny PEFT model."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lightning_lora.tiny import tiny_config

    arch, lora = _PEFT_SETUPS[setup]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices and deprecations are not under test
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, task_type="CAUSAL_LM", **lora))
    keys = tuple(model.state_dict())
    assert all(key.startswith(PEFT_ROOT) for key in keys) and any(".lora_A." in key for key in keys)
    return keys


_IDENTIFIER = st.from_regex(re.compile(r"[a-z_][a-z0-9_]{0,7}"), fullmatch=True)
# Names people give the attribute, including ones that look like legacy wrappers or the PEFT root.
_COMPONENT = st.one_of(
    st.sampled_from(["model", "net", "lm", "backbone", "peft_model", "policy", "module", "_forward_module",
                     "base_model", "lm_base_model"]),
    _IDENTIFIER,
)
_ATTRIBUTE = st.lists(_COMPONENT, min_size=0, max_size=3).map(lambda parts: "".join(f"{p}." for p in parts))
_WRAPPER = st.sampled_from(["", "module.", "_forward_module."])
# Other state of the LightningModule: paths that hold no PEFT model.
_OTHER_KEY = st.lists(_IDENTIFIER, min_size=1, max_size=4).map(".".join).filter(lambda k: "base_model" not in k)


@settings(max_examples=300, deadline=None)
@given(
    setup=st.sampled_from(sorted(_PEFT_SETUPS)),
    attribute=_ATTRIBUTE,
    wrapper=_WRAPPER,
    others=st.lists(_OTHER_KEY, max_size=4, unique=True),
    explicit=st.sampled_from([None, "with-dot", "without-dot"]),
)
def test_normalisation_recovers_exactly_the_peft_model_keys(
    setup: str, attribute: str, wrapper: str, others: list[str], explicit: str | None
) -> None:
    peft_keys = _peft_keys(setup)
    state = {f"{wrapper}{attribute}{key}": key for key in peft_keys}
    # Other state of the LightningModule, possibly inside the same attribute beside the PEFT model;
    # except under an attribute path that itself contains the component path 'base_model.model.',
    # where a sibling 'base_model.model.x' would be indistinguishable from a PEFT model at the root.
    if f".{PEFT_ROOT}" not in f".{attribute}":
        state.update({f"{wrapper}{attribute}{other}": None for other in others[:2]})
    state.update({f"{wrapper}{other}": None for other in others[2:]})
    # None: detected (keys behind "module." may be read as a wrapper or as an attribute called
    # module; either reading gives the same PEFT keys). Otherwise given, as HFExport records it.
    prefix = {None: None, "with-dot": attribute, "without-dot": attribute.removesuffix(".")}[explicit]
    assert normalize_keys(state, prefix) == {key: key for key in peft_keys}
