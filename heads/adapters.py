"""LoRA adapters in Hugging Face PEFT's file format.

An adapter on disk is PEFT's pair, so one trained here loads in PEFT and one trained with PEFT
loads here:
    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora", ...}
    adapter_model.safetensors  "<prefix>.encoder.layer.N.attention.self.query.lora_A.weight" [r, in]
                               "<prefix>.encoder.layer.N.attention.self.query.lora_B.weight" [out, r]
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

Weights may be stored in any float dtype (PEFT often saves bf16); they are widened to float32.
Every field of PEFT's LoraConfig is either honoured or refused by name with what to do instead
(``heads.peft_config``): nothing an adapter asks for is served as plain LoRA unless PEFT's own
forward for it is plain LoRA on the unchanged backbone.

Which adapter sits in which device slot is the manager's business (``heads.adapter_manager``;
``AdapterManager`` and ``manager_for`` are importable from here too).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from headfleet.embedder.lora_names import PEFT_PREFIX, canonical_module_name, lora_scale, target_name
from headfleet.errors import AdapterImportError, NoAdapterSlotError
from headfleet.heads.adapter_manager import AdapterManager, manager_for
from headfleet.heads.peft_config import CONFIG_FILE, LORA_WEIGHT, check_config, rank_and_alpha, refuse_tensor

WEIGHTS_FILE = "adapter_model.safetensors"


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
        """What the low-rank product is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.A.values()) + sum(b.nbytes for b in self.B.values())

    def torch_weights(self, device) -> dict:
        """name -> (A [in, r], B [r, out]) float32 tensors on ``device``, as ``SlotBank.write`` takes them."""
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
        and ``base_names`` (names the backbone goes by), refuse an adapter made for another model.

        Raises ``AdapterImportError`` naming the cause: no config, no safetensors file, JSON that
        does not parse, or any refusal of :meth:`from_parts`."""
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
        check_config(cfg, where)
        base = cfg.get("base_model_name_or_path")
        names = {n.rstrip("/").rsplit("/", 1)[-1].lower() for n in base_names if n}
        if base and names and base.rstrip("/").rsplit("/", 1)[-1].lower() not in names:
            raise AdapterImportError(f"{where} was trained on base model {base!r}, but this backbone is "
                                     f"{sorted(names)[0]!r}: an adapter only works on the weights it was trained on")
        r, alpha = rank_and_alpha(cfg, where)
        A: dict[str, np.ndarray] = {}
        B: dict[str, np.ndarray] = {}
        for key, tensor in _read_safetensors(weights, where).items():
            m = LORA_WEIGHT.match(key)
            if m is None:
                refuse_tensor(key, cfg, where)  # raises, unless PEFT saved it for training only
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
                                             f"{target_name(name)!r}); this adapter was made for another architecture")
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
        targets = sorted({target_name(n) for n in A})
        return cls(rank=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)), targets=targets,
                   A={n: np.ascontiguousarray(a) for n, a in A.items()},
                   B={n: np.ascontiguousarray(b) for n, b in B.items()}, base_model=base)


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
    missing = list(dict.fromkeys(target_name(n) for n in outside))
    new = [t for t in missing if t not in current]
    shown = ", ".join(repr(t) for t in missing)
    msg = (f"{where}: the adapter adapts target{'s' if len(missing) > 1 else ''} {shown} (e.g. {outside[0]}), which "
           f"this service does not adapt (HEADFLEET_LORA_TARGETS={','.join(current)})")
    if new:
        msg += f"; set HEADFLEET_LORA_TARGETS={','.join(current + new)} to serve it"
    raise AdapterImportError(msg)


__all__ = ["AdapterImportError", "AdapterManager", "LoraAdapter", "NoAdapterSlotError", "manager_for"]
