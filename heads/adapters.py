"""LoRA adapters: Hugging Face PEFT's file format, and the manager that puts them in device slots.

An adapter on disk is PEFT's pair, so one trained here loads in PEFT and one trained with PEFT
loads here:
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora", ...}
    adapter_model.safetensors  "<prefix>.encoder.layer.N.attention.self.query.lora_A.weight" [r, in]
                               "<prefix>.encoder.layer.N.attention.self.query.lora_B.weight" [out, r]
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

Weights may be stored in any float dtype (PEFT often saves bf16); they are widened to float32.
Every field of PEFT's LoraConfig is either honoured or refused by name with what to do instead
(the table above ``_check_config``): nothing an adapter asks for is served as plain LoRA unless
PEFT's own forward for it is plain LoRA on the unchanged backbone.

The manager (vLLM's model manager, for an encoder): adapters live on disk (the registry), in
host memory (an LRU of at most ``max_loaded``) and in device slots (an LRU of the bank's
``max_slots``). ``acquire`` hot-loads what a batch needs and pins it until ``release``, so an
adapter is never evicted from under a forward in flight; when every slot is pinned by batches
in flight, ``acquire`` raises :class:`NoAdapterSlotError` rather than waiting or guessing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from headfleet.errors import AdapterImportError, NoAdapterSlotError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoraAdapter:
    """One adapter's weights, keyed by canonical module name (``encoder.layer.N....query``)."""

    rank: int
    alpha: float
    use_rslora: bool
    targets: list[str]  # short names as in PEFT's target_modules, e.g. ["query", "value"]
    A: dict[str, np.ndarray]  # name -> [in, r] float32 (PEFT stores lora_A.weight as [r, in])
    B: dict[str, np.ndarray]  # name -> [r, out] float32 (PEFT stores lora_B.weight as [out, r])
    base_model: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.A.values()) + sum(b.nbytes for b in self.B.values())

    def torch_weights(self, device) -> dict:
        import torch

        return {n: (torch.from_numpy(self.A[n]).to(device), torch.from_numpy(self.B[n]).to(device)) for n in self.A}

    # -- PEFT format ----------------------------------------------------------------------------
    def peft_config(self) -> dict:
        return {"peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": self.rank, "lora_alpha": self.alpha,
                "use_rslora": self.use_rslora, "target_modules": sorted(self.targets), "lora_dropout": 0.0,
                "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
                "base_model_name_or_path": self.base_model, "inference_mode": True}

    def to_files(self) -> dict[str, bytes]:
        """``{adapter_config.json, adapter_model.safetensors}`` as bytes, in PEFT's layout."""
        from safetensors.numpy import save

        tensors = {}
        for name in sorted(self.A):
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(self.A[name].T)
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(self.B[name].T)
        return {CONFIG_FILE: (json.dumps(self.peft_config(), indent=2) + "\n").encode(),
                WEIGHTS_FILE: save(tensors, metadata={"format": "pt"})}

    @classmethod
    def from_folder(cls, folder: Path | str, *, shapes: dict[str, tuple[int, int]] | None = None,
                    base_names: Iterable[str] = ()) -> "LoraAdapter":
        """Read a PEFT LoRA folder. With ``shapes`` (canonical module -> (in, out) of the backbone)
        and ``base_names`` (names the backbone goes by), refuse an adapter made for another model."""
        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not cfg_path.exists():
            raise AdapterImportError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
        if not w_path.exists():
            raise AdapterImportError(f"{folder} has no {WEIGHTS_FILE} (adapter_model.bin pickles are not loaded; "
                                     "re-save the adapter with safe_serialization=True)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterImportError(f"{cfg_path} is not valid JSON: {exc}") from None
        return cls.from_parts(cfg, w_path.read_bytes(), shapes=shapes, base_names=base_names, where=str(folder))

    @classmethod
    def from_parts(cls, cfg: dict, weights: bytes, *, shapes: dict[str, tuple[int, int]] | None = None,
                   base_names: Iterable[str] = (), where: str = "adapter") -> "LoraAdapter":
        """An adapter from PEFT's config dict and safetensors bytes; every refusal names its cause.

        ``shapes``: canonical module -> (in, out) of the backbone (``embedder.lora.module_shapes``);
        with it, a module the backbone lacks or shapes differently is refused, and when it also
        names the injection points (``ModuleShapes.adapted``), a module that is not one is refused
        naming the ``HEADFLEET_LORA_TARGETS`` that would serve it."""
        from headfleet.embedder.lora import canonical_module_name

        _check_config(cfg, where)
        base = cfg.get("base_model_name_or_path")
        names = {n.rstrip("/").rsplit("/", 1)[-1].lower() for n in base_names if n}
        if base and names and base.rstrip("/").rsplit("/", 1)[-1].lower() not in names:
            raise AdapterImportError(f"{where} was trained on base model {base!r}, but this backbone is "
                                     f"{sorted(names)[0]!r}: an adapter only works on the weights it was trained on")
        r, alpha = _rank_and_alpha(cfg, where)
        A: dict[str, np.ndarray] = {}
        B: dict[str, np.ndarray] = {}
        for key, tensor in _read_safetensors(weights, where).items():
            m = _LORA_WEIGHT.match(key)
            if m is None:
                _refuse_tensor(key, cfg, where)  # raises, unless PEFT saved it for training only
                continue
            stem = m.group("stem")
            name = canonical_module_name(stem)
            if shapes is not None and name not in shapes:  # a wrapper's prefix (bert., 0.auto_model.)
                name = max((k for k in shapes if stem.endswith("." + k)), key=len, default=name)
            part = A if m.group("part") == "A" else B
            if name in part:
                raise AdapterImportError(f"{where}: two lora_{m.group('part')} weights for {name} (one is {key!r}): "
                                         "the file holds several adapters; save each with its own folder")
            part[name] = _as_float32(tensor, key, where).T
        if not A or set(A) != set(B):
            raise AdapterImportError(f"{where}: lora_A and lora_B weights do not pair up")
        for name in A:
            a, b = A[name], B[name]
            if shapes is not None:
                if name not in shapes:
                    raise AdapterImportError(f"{where}: the backbone has no layer {name!r} (target "
                                             f"{_target(name)!r}); this adapter was made for another architecture")
                if (a.shape[0], b.shape[1]) != shapes[name]:
                    raise AdapterImportError(f"{where}: {name} is {a.shape[0]}->{b.shape[1]} in the adapter but "
                                             f"{shapes[name][0]}->{shapes[name][1]} in this backbone: another base model")
            if a.shape[1] != r or b.shape[0] != r:
                raise AdapterImportError(f"{where}: {name} has rank {a.shape[1]} in lora_A and {b.shape[0]} in "
                                         f"lora_B, but the config says r={r}")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise AdapterImportError(f"{where}: {name} holds non-finite values")
        _check_injection_points(A, shapes, where)
        unread = sorted(n for n in A if n in getattr(shapes, "unread", ()))
        for name in unread:  # the pooler: PEFT's delta there changes pooler_output, never our embedding
            del A[name], B[name]
        if not A:
            raise AdapterImportError(f"{where}: the adapter only adapts {unread}, whose output the embedding never "
                                     "reads (it pools the last hidden state); target the encoder layers instead")
        targets = sorted({_target(n) for n in A})
        return cls(rank=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)), targets=targets,
                   A={n: np.ascontiguousarray(a) for n, a in A.items()},
                   B={n: np.ascontiguousarray(b) for n, b in B.items()}, base_model=base)


# -- PEFT's LoraConfig, field by field ----------------------------------------------------------
#
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


def _check_config(cfg: dict, where: str) -> None:
    """Refuse every LoraConfig field that is set and would change the forward; see the table above."""
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


def _rank_and_alpha(cfg: dict, where: str) -> tuple[int, float]:
    try:
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    except (TypeError, ValueError):
        raise AdapterImportError(f"{where}: r={cfg.get('r')!r} and lora_alpha={cfg.get('lora_alpha')!r} must be "
                                 "numbers") from None
    if r < 1 or not math.isfinite(alpha):
        raise AdapterImportError(f"{where}: r={r} must be at least 1 and lora_alpha={alpha} finite")
    return r, alpha


# "<module>.lora_A.weight" as PEFT saves it; "<module>.lora_A.<adapter>.weight" as a raw state dict has it
_LORA_WEIGHT = re.compile(r"^(?P<stem>.+?)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
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


def _refuse_tensor(key: str, cfg: dict, where: str) -> None:
    """Refuse a tensor that is not a LoRA A/B weight, by the option that makes PEFT save it; return
    for a buffer PEFT keeps for training only (VeLoRA, MonteCLoRA) when the config says so."""
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
        from headfleet.embedder.lora import canonical_module_name

        name = canonical_module_name(emb.group("stem"))
        raise AdapterImportError(f"{where}: target {_target(name)!r} ({name}) is an embedding layer; headfleet "
                                 "adapts linear layers only: remove it from target_modules")
    raise AdapterImportError(f"{where}: tensor {key!r} is not a LoRA A/B weight; refusing an adapter that changes "
                             "more than low-rank deltas")


def _read_safetensors(weights: bytes, where: str) -> dict:
    """name -> torch tensor, whatever dtype the file stores (safetensors' numpy reader has no bf16)."""
    from safetensors.torch import load

    try:
        return load(weights)
    except Exception as exc:
        raise AdapterImportError(f"{where}: the safetensors file cannot be read: {exc}") from None


def _as_float32(tensor, key: str, where: str) -> np.ndarray:
    """A LoRA weight as float32 numpy (bf16 and f16 widen exactly, f64 rounds)."""
    import torch

    if not tensor.is_floating_point():
        raise AdapterImportError(f"{where}: tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}; LoRA "
                                 "weights must be floating point (bf16, f16, f32 or f64)")
    return tensor.detach().to(torch.float32).numpy()


def _target(name: str) -> str:
    """``encoder.layer.0.attention.self.key`` -> ``key``: the short name target_modules and
    HEADFLEET_LORA_TARGETS use."""
    return name.rsplit(".", 1)[-1]


def _check_injection_points(A: dict[str, np.ndarray], shapes, where: str) -> None:
    """Every module the adapter changes must carry an injection point; a refusal names the targets
    and the HEADFLEET_LORA_TARGETS that would serve them."""
    adapted = set(getattr(shapes, "adapted", ()))
    if not adapted:  # plain shapes, or a backbone without injection points yet: nothing to check against
        return
    unread = getattr(shapes, "unread", frozenset())
    outside = sorted(n for n in A if n not in adapted and n not in unread)
    if not outside:
        return
    current = shapes.adapted_targets
    missing = list(dict.fromkeys(_target(n) for n in outside))
    new = [t for t in missing if t not in current]
    shown = ", ".join(repr(t) for t in missing)
    msg = (f"{where}: the adapter adapts target{'s' if len(missing) > 1 else ''} {shown} (e.g. {outside[0]}), which "
           f"this service does not adapt (HEADFLEET_LORA_TARGETS={','.join(current)})")
    if new:
        msg += f"; set HEADFLEET_LORA_TARGETS={','.join(current + new)} to serve it"
    raise AdapterImportError(msg)


@dataclasses.dataclass
class _Loaded:
    adapter: LoraAdapter
    slot: int = -1
    pins: int = 0  # batches in flight using the slot, plus explicit pins


class AdapterManager:
    """id -> device slot, with host and device LRUs, pinning, load metrics.

    One manager per SlotBank (``manager_for(bank)``), whoever drives the backbone. An id names
    one adapter's content (the engine uses ``<tenant>/<name>@<version>#<sha256 prefix>``), so the
    same id always means the same weights. ``load(id) -> LoraAdapter`` reads an adapter from disk
    (the registry); it is given per :meth:`acquire`, as only the caller knows where its registry is.
    Thread-safe; slot writes happen under the lock, and only into a slot no batch in flight holds.
    """

    def __init__(self, bank, load: Callable[[str], LoraAdapter] | None = None, *, max_loaded: int = 1024,
                 on_load: Callable[[float], None] | None = None):
        self.bank = bank
        self._load = load
        self.max_loaded = max(int(max_loaded), bank.max_slots)
        self.load_hooks: list[Callable[[float], None]] = [on_load] if on_load else []  # seconds per cold load
        self._host: OrderedDict[str, _Loaded] = OrderedDict()  # LRU: least recently used first
        self._slots: list[str | None] = [None] * bank.max_slots
        self._slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(bank.max_slots))
        self._explicit: dict[str, int] = {}
        self._lock = threading.Lock()
        self.counts = {"disk_loads": 0, "slot_loads": 0, "slot_hits": 0, "host_evictions": 0, "slot_evictions": 0}
        self.load_ms: list[float] = []  # disk -> host -> slot times of recent cold loads (bounded)

    @property
    def max_slots(self) -> int:
        return self.bank.max_slots

    def acquire(self, ids: Sequence[str], load: Callable[[str], LoraAdapter] | None = None) -> dict[str, int]:
        """Slots for the distinct ``ids`` of one batch, pinned until :meth:`release`. All or nothing."""
        ids = list(dict.fromkeys(ids))
        if len(ids) > self.max_slots:
            raise NoAdapterSlotError(f"{len(ids)} adapters in one batch but only {self.max_slots} device slots "
                                     "(HEADFLEET_LORA_SLOTS); split the batch")
        got: dict[str, int] = {}
        try:
            for aid in ids:
                got[aid] = self._acquire_one(aid, load or self._load)
        except BaseException:
            self.release(list(got))
            raise
        return got

    def release(self, ids: Iterable[str]) -> None:
        with self._lock:
            for aid in dict.fromkeys(ids):
                entry = self._host.get(aid)
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1

    def pin(self, aid: str, load: Callable[[str], LoraAdapter] | None = None) -> int:
        """Keep ``aid`` in a device slot until :meth:`unpin` (a tenant that must never cold-load)."""
        slot = self.acquire([aid], load)[aid]
        with self._lock:
            self._explicit[aid] = self._explicit.get(aid, 0) + 1
        return slot

    def unpin(self, aid: str) -> None:
        with self._lock:
            if self._explicit.get(aid):
                self._explicit[aid] -= 1
                if not self._explicit[aid]:
                    del self._explicit[aid]
        self.release([aid])

    def forget(self, aid: str) -> None:
        """Drop ``aid`` from host memory and its slot (a deleted or retrained classifier); a batch in
        flight keeps its slot until it releases it."""
        with self._lock:
            entry = self._host.get(aid)
            if entry is None or entry.pins:
                return
            self._drop(aid, entry)

    def forget_matching(self, pred: Callable[[str], bool]) -> None:
        """:meth:`forget` every adapter whose id satisfies ``pred``."""
        with self._lock:
            ids = [aid for aid in self._host if pred(aid)]
        for aid in ids:
            self.forget(aid)

    def slot_of(self, aid: str) -> int:
        with self._lock:
            entry = self._host.get(aid)
            return -1 if entry is None else entry.slot

    def snapshot(self) -> dict:
        with self._lock:
            return {"slots": self.max_slots, "slots_used": sum(s is not None for s in self._slots),
                    "loaded": len(self._host), "max_loaded": self.max_loaded,
                    "pinned": sum(e.pins > 0 for e in self._host.values()), **self.counts}

    # -- internals --------------------------------------------------------------------------------
    def _acquire_one(self, aid: str, load: Callable[[str], LoraAdapter] | None) -> int:
        with self._lock:
            entry = self._host.get(aid)
            if entry is not None and entry.slot >= 0:
                entry.pins += 1
                self._host.move_to_end(aid)
                self._slot_lru.move_to_end(entry.slot)
                self.counts["slot_hits"] += 1
                return entry.slot
        t0 = time.perf_counter()
        if entry is None and load is None:
            raise KeyError(f"adapter {aid!r} is not loaded and no loader was given")
        adapter = entry.adapter if entry is not None else load(aid)  # disk read outside the lock
        with self._lock:
            entry = self._host.get(aid)
            if entry is None:
                entry = self._host[aid] = _Loaded(adapter)
                self.counts["disk_loads"] += 1
            self._host.move_to_end(aid)
            if entry.slot < 0:
                slot = self._free_slot()
                self.bank.write(slot, adapter.torch_weights(self.bank.device), adapter.rank, adapter.scale)
                self._slots[slot] = aid
                entry.slot = slot
                self.counts["slot_loads"] += 1
                ms = (time.perf_counter() - t0) * 1e3
                self.load_ms.append(ms)
                del self.load_ms[:-1024]
                for hook in self.load_hooks:
                    hook(ms / 1e3)
            else:
                self.counts["slot_hits"] += 1
            entry.pins += 1
            self._slot_lru.move_to_end(entry.slot)
            self._evict_host()  # after pinning: the adapter just loaded is never the one evicted
            return entry.slot

    def _free_slot(self) -> int:
        for slot in self._slot_lru:  # least recently used first
            owner = self._slots[slot]
            if owner is None:
                return slot
            entry = self._host[owner]
            if entry.pins == 0:
                entry.slot = -1
                self._slots[slot] = None
                self.bank.clear(slot)
                self.counts["slot_evictions"] += 1
                return slot
        raise NoAdapterSlotError(f"all {self.max_slots} LoRA device slots are held by batches in flight or pinned; "
                                 "retry shortly, or raise HEADFLEET_LORA_SLOTS")

    def _evict_host(self) -> None:
        while len(self._host) > self.max_loaded:
            for aid, entry in self._host.items():
                if entry.pins == 0 and entry.slot < 0:
                    self._drop(aid, entry)
                    self.counts["host_evictions"] += 1
                    break
            else:  # everything left is in a slot: host memory is bounded by slots, not by max_loaded
                return

    def _drop(self, aid: str, entry: _Loaded) -> None:
        if entry.slot >= 0:
            self._slots[entry.slot] = None
            self.bank.clear(entry.slot)
        del self._host[aid]


_managers_lock = threading.Lock()


def manager_for(bank, *, max_loaded: int = 1024) -> AdapterManager:
    """The one manager of ``bank`` (created at the first call)."""
    with _managers_lock:
        manager = getattr(bank, "manager", None)
        if manager is None:
            manager = bank.manager = AdapterManager(bank, max_loaded=max_loaded)
        return manager


__all__ = ["AdapterImportError", "AdapterManager", "LoraAdapter", "NoAdapterSlotError"]
