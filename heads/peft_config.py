"""PEFT's LoraConfig, field by field: what an adapter asks for is honoured or refused by name.

Every field of ``peft.LoraConfig`` is either read (rank, alpha, rsLoRA, the base model's name),
has no effect on an inference forward over the unchanged shared backbone, or is refused with
what to do instead (the table below); a field the table does not know is refused when set. The
same goes for the tensors in ``adapter_model.safetensors``: anything that is not a LoRA A/B
weight is refused by the option that made PEFT save it (:func:`refuse_tensor`). Nothing an
adapter asks for is served as plain LoRA unless PEFT's own forward for it is plain LoRA on the
unchanged backbone. Every refusal is an ``AdapterImportError`` whose message names the option
(or tensor) and the setting that would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

from headfleet.embedder.lora_names import canonical_module_name, target_name
from headfleet.errors import AdapterImportError

CONFIG_FILE = "adapter_config.json"

# Every field of peft.LoraConfig (peft 0.21, peft/tuners/lora/config.py) is read, has no effect on
# an inference forward over the unchanged shared backbone, or is refused by name with what to do.
# A field this table does not know is refused when set (not None, False or empty): a newer PEFT
# option could change the forward, and serving it as plain LoRA would be silently wrong.
#
#   read        peft_type (LORA), r, lora_alpha, use_rslora -> scale; base_model_name_or_path
#               (checked against the backbone's names); init_lora_weights (below)
#   weights     target_modules, exclude_modules, layers_to_transform, layers_pattern: PEFT saves
#               lora_A/lora_B for exactly the modules it adapted, so the file says which; each must
#               exist in the backbone with the same shape and be an injection point
#               (HEADFLEET_LORA_TARGETS); deltas on the pooler are dropped (never read)
#   no effect   see _NO_EFFECT
#   refused     see _REFUSED, and init_lora_weights in _INIT_REFUSED
_READ = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "base_model_name_or_path", "init_lora_weights",
                   "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})
_NO_EFFECT = {
    "task_type": "metadata (a task head would come as modules_to_save, refused)",
    "auto_mapping": "metadata", "peft_version": "metadata", "inference_mode": "metadata",
    "revision": "metadata (the base model's revision; the shapes are checked)",
    "lora_dropout": "training only",
    "loftq_config": "the config of init_lora_weights='loftq' (refused there)",
    "eva_config": "the config of init_lora_weights='eva' (initialisation only; a redistributed rank "
                  "comes as rank_pattern, refused)",
    "corda_config": "the config of init_lora_weights='corda' (refused there)",
    "lora_ga_config": "the config of init_lora_weights='lora_ga' (refused there)",
    "velora_config": "VeLoRA compresses activations for the backward pass; its forward is plain LoRA "
                     "(its lora_velora_embed buffers are not loaded)",
    "monteclora_config": "MonteCLoRA samples A only while training; in eval its forward is plain LoRA "
                         "(its lora_monteclora_sampler tensors are not loaded)",
    "megatron_core": "the Megatron module, used only with megatron_config (refused)",
    "qalora_group_size": "used only with use_qalora (refused)",
    "ensure_weight_tying": "ties adapters of tied embedding/output layers; an encoder's linear layers have none",
    "runtime_config": "never saved",
}


@dataclasses.dataclass(frozen=True)
class _Refusal:
    why: str
    fix: str
    is_set: Callable[[object], bool] = bool


_RETRAIN = "train the adapter again without it"
_REFUSED: dict[str, _Refusal] = {
    "use_dora": _Refusal("DoRA rescales every adapted weight by a learned magnitude vector; headfleet adds "
                         "plain low-rank deltas", "train with use_dora=False"),
    "fan_in_fan_out": _Refusal("it describes Conv1D weights stored [in, out] (GPT-2 style); this backbone's "
                               "layers are nn.Linear", "use an adapter trained on this backbone (fan_in_fan_out=False)"),
    "bias": _Refusal("it trains the backbone's own biases, which every tenant shares", "train with bias='none'",
                     lambda v: v not in (None, "none")),
    "lora_bias": _Refusal("it adds a bias to lora_B, which headfleet's adapter slots do not hold",
                          "train with lora_bias=False"),
    "modules_to_save": _Refusal("it replaces whole backbone modules with trained copies; headfleet serves "
                                "low-rank deltas only", "train without modules_to_save and fit the classifier as "
                                "a headfleet head"),
    "rank_pattern": _Refusal("it gives some modules a rank other than r; an adapter slot holds one rank",
                             "train with one r for every module (no rank_pattern)"),
    "alpha_pattern": _Refusal("it gives some modules a lora_alpha of their own; an adapter slot holds one scale",
                              "train with one lora_alpha for every module (no alpha_pattern)"),
    "layer_replication": _Refusal("it stacks repeated copies of the backbone's layers into a deeper model; the "
                                  "shared backbone keeps its own layers", _RETRAIN),
    "megatron_config": _Refusal("it adapts Megatron's parallel linear layers", "train on the plain Hugging Face "
                                "backbone, without megatron_config"),
    "trainable_token_indices": _Refusal("it trains rows of the token embedding; headfleet adapts linear layers "
                                        "only", _RETRAIN),
    "target_parameters": _Refusal("it puts LoRA on raw parameters (MoE experts), not on linear modules",
                                  "name linear modules in target_modules instead"),
    "alora_invocation_tokens": _Refusal("Activated LoRA applies its delta only from an invocation sequence on; "
                                        "headfleet applies it to every token", _RETRAIN),
    "use_qalora": _Refusal("QA-LoRA pools the inputs of GPTQ-quantised layers; this backbone is not quantised",
                           "train with use_qalora=False"),
    "use_bdlora": _Refusal("BD-LoRA stores block-diagonal A or B factors; headfleet's slots hold full ones",
                           _RETRAIN),
    "arrow_config": _Refusal("Arrow routes every token among several expert adapters",
                             "import each expert as its own adapter"),
    "kasa_config": _Refusal("KaSA truncates the base weights' smallest singular values and puts a learned "
                            "diagonal between A and B; the shared backbone is not truncated", _RETRAIN),
}
# init_lora_weights: True, False, "gaussian", "eva", "orthogonal" and "mica" only initialise A and B
# (the base weights stay as they were). These also change the base weights the adapter is trained
# beside (a residual, or a quantised copy; PEFT redoes PiSSA, OLoRA, CorDA and LoftQ when it loads
# the adapter), so the saved A and B belong with weights the shared backbone does not have:
_CONVERT = ("convert it to a plain LoRA adapter: save_pretrained(..., path_initial_model_for_weight_conversion=...)"
            ", which saves init_lora_weights=True")
_INIT_FINE = (True, False, "gaussian", "eva", "orthogonal", "mica")
_INIT_REFUSED = {
    "pissa": ("PiSSA moves each base weight's principal singular components into A and B and trains on the "
              "residual weights", _CONVERT),
    "olora": ("OLoRA moves a QR factor of each base weight into A and B and trains on the residual weights",
              _CONVERT),
    "corda": ("CorDA moves context-oriented components of each base weight into A and B and trains on the "
              "residual weights", _CONVERT),
    "lora_ga": ("LoRA-GA subtracts its initial delta from the base weights and trains on the residual weights",
                _CONVERT),
    "loftq": ("LoftQ trains on the quantised base weights, with A and B initialised to their quantisation error; "
              "on this full-precision backbone that error would be added a second time",
              "train on this backbone without LoftQ (init_lora_weights=True)"),
}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_option(where: str, option: str, value: object, why: str, fix: str) -> None:
    raise AdapterImportError(f"{where}: {option}={_shown(value)} is not supported: {why}; {fix}")


def check_config(cfg: dict, where: str) -> None:
    """Refuse every LoraConfig field that is set and would change the forward (see the table above).

    ``cfg``: the parsed ``adapter_config.json``; ``where``: the folder or name shown in messages.
    Raises ``AdapterImportError`` naming the option, its value, why and what to do instead.
    """
    if not isinstance(cfg, dict):
        raise AdapterImportError(f"{where}: {CONFIG_FILE} holds {type(cfg).__name__}, not an object")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterImportError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for option, refusal in _REFUSED.items():
        if option in cfg and refusal.is_set(cfg[option]):
            _refuse_option(where, option, cfg[option], refusal.why, refusal.fix)
    init = cfg.get("init_lora_weights", True)
    if init not in _INIT_FINE:
        family = str(init).lower().split("_niter_")[0]  # pissa_niter_16 is PiSSA
        why, fix = _INIT_REFUSED.get(family, ("it is an initialisation this headfleet does not know",
                                              "re-save the adapter with init_lora_weights=True if its base "
                                              "weights were not changed"))
        _refuse_option(where, "init_lora_weights", init, why, fix)
    for option, value in cfg.items():
        if option not in _READ and option not in _NO_EFFECT and option not in _REFUSED \
                and value not in (None, False, "", [], {}):
            _refuse_option(where, option, value, "it is not an option of the PEFT LoraConfig this headfleet "
                           "knows (peft 0.21), so its effect on the vectors is unknown",
                           "remove it from adapter_config.json if the adapter does not use it")


def rank_and_alpha(cfg: dict, where: str) -> tuple[int, float]:
    """``(r, lora_alpha)`` of a config (PEFT's defaults 8 and 8 when absent); raises
    ``AdapterImportError`` unless r is a whole number >= 1 and lora_alpha a finite number."""
    try:
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise AdapterImportError(f"{where}: r={cfg.get('r')!r} and lora_alpha={cfg.get('lora_alpha')!r} must be "
                                 "numbers") from None
    if r < 1 or not math.isfinite(alpha):
        raise AdapterImportError(f"{where}: r={r} must be at least 1 and lora_alpha={alpha} finite")
    return r, alpha


# "<module>.lora_A.weight" as PEFT saves it; "<module>.lora_A.<adapter>.weight" as a raw state dict has it
LORA_WEIGHT = re.compile(r"^(?P<stem>.+?)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
# what else PEFT may save, by the option that makes it: (key pattern, option, loaded for training only)
_OTHER_TENSORS = (
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.bias$"), "lora_bias", False),
    (re.compile(r"\.lora_magnitude_vector(?:\.|$)"), "use_dora", False),
    (re.compile(r"\.lora_diag(?:\.|$)"), "kasa_config", False),
    (re.compile(r"\.modules_to_save\."), "modules_to_save", False),
    (re.compile(r"\.trainable_tokens_delta$"), "trainable_token_indices", False),
    (re.compile(r"\.lora_velora_embed(?:\.|$)"), "velora_config", True),
    (re.compile(r"\.lora_monteclora_sampler\."), "monteclora_config", True),
)
_EMBEDDING = re.compile(r"^(?P<stem>.+?)\.lora_embedding_[AB](?:\.|$)")


def refuse_tensor(key: str, cfg: dict, where: str) -> None:
    """Refuse a tensor that is not a LoRA A/B weight (``key`` as stored in the safetensors file),
    by the option that makes PEFT save it: raises ``AdapterImportError``, except for a buffer PEFT
    keeps for training only (VeLoRA, MonteCLoRA) when the config says so, where it returns."""
    for pattern, option, training_only in _OTHER_TENSORS:
        if pattern.search(key):
            if training_only and cfg.get(option):
                return
            refusal = _REFUSED.get(option)
            why = refusal.why if refusal else "it is a tensor of an option the config does not declare"
            raise AdapterImportError(f"{where}: tensor {key!r} comes from {option}, which is not supported: {why}; "
                                     f"{refusal.fix if refusal else 'export the adapter again with PEFT'}")
    emb = _EMBEDDING.match(key)
    if emb:
        name = canonical_module_name(emb.group("stem"))
        raise AdapterImportError(f"{where}: target {target_name(name)!r} ({name}) is an embedding layer; headfleet "
                                 "adapts linear layers only: remove it from target_modules")
    raise AdapterImportError(f"{where}: tensor {key!r} is not a LoRA A/B weight; refusing an adapter that changes "
                             "more than low-rank deltas")
