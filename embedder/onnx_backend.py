"""ONNX Runtime backend for the frozen backbone: export once, quantise once, run many times.

The exported graph is the whole Transformer -> Pooling -> Normalize stack of the torch path:

    input_ids, attention_mask: [batch, seq] int64  (dynamic batch and seq axes)
    hidden = encoder(input_ids, additive_mask(attention_mask), token_type_ids=0)
    vec    = mean over unmasked tokens (or hidden[:, 0] for cls pooling), then L2-normalised
    output "embedding": [batch, dim] float32

Files live in ``cache_dir`` named by the *source* fingerprint (weights, tokenizer, pooling) and the
precision, so another backbone never reuses them; each is written to a temp file in the same folder
and renamed, so a crash or a concurrent writer never leaves a half file under the final name. A
``.json`` beside each file records what made it.

Precisions: ``fp32`` (CPU or CUDA); ``int8`` (CPU only: MatMul weights stored as int8 in blocks of
32, activations quantised to int8 per row and block at run time, see ``_quantize_int8``); ``w8a8``
(CPU only: per-token int8 activations on the integer GEMM, see ``headfleet.embedder.w8a8``; its
file is built in the form this CPU runs exactly, ``u8s8`` with an int8 dot product, ``u8u8``
without); ``fp16`` (CUDA only; inputs and outputs stay int64 / float32).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from headfleet.errors import BackendError, ValidationError
from headfleet.embedder.backbone import PoolingConfig, load_encoder, pool
from headfleet.settings import BACKENDS, CPU_ONLY

RECIPE = 1  # bump when export / quantisation changes what a cached file holds
INT8_BLOCK = 32  # int8 block size along K: <= 64 keeps every row's quantisation independent of the batch
GRAPH_OPT_LEVELS = ("disabled", "basic", "extended", "all")
_MASK_NEG = -1.0e4  # additive mask for padded keys; exp(-1e4) is exactly 0 in fp32 and fp16-safe


def backend_tag(backend: str, precision: str, device: str | None = None, graph_opt: str = "all") -> str:
    """Validate a backend + precision (for ``device`` when given) and name it, e.g. ``"onnx-int8"``.

    The tag goes into the backbone fingerprint: every backend + precision pair gets its own, because
    each computes different floats (ONNX fp32 differs from torch fp32 by ~1e-7 per component, int8 by
    ~5e-4 in mean cosine), and the fingerprint promises that a cached vector or a head was made by
    exactly this stack. The price is a cold cache and retrained heads on a switch, even fp32 -> fp32.
    A graph optimisation level other than "all" is named too: its fusions move int8 vectors by up
    to ~6e-3 (rounding lands on other sides of quantisation steps). Thread counts change nothing.
    """
    if backend not in BACKENDS:
        raise ValidationError(f"unknown backend {backend!r}; expected one of {sorted(BACKENDS)}")
    if precision not in BACKENDS[backend]:
        raise ValidationError(
            f"precision {precision!r} is not available on the {backend} backend; expected one of {list(BACKENDS[backend])}"
        )
    if device is not None:
        on_gpu = device.startswith("cuda")
        if precision in CPU_ONLY and on_gpu:
            raise ValidationError(f"{precision} runs on the CPU only; use fp16 on cuda")
        if precision == "fp16" and not on_gpu:
            raise ValidationError("fp16 needs a cuda device; use w8a8, int8 or fp32 on cpu")
    if backend == "onnx":
        _check_graph_opt(graph_opt)
    tag = f"{backend}-{precision}"
    return tag if backend == "torch" or graph_opt == "all" else f"{tag}-opt-{graph_opt}"


def _check_graph_opt(graph_opt: str) -> None:
    if graph_opt not in GRAPH_OPT_LEVELS:
        raise ValidationError(f"unknown graph optimisation level {graph_opt!r}; expected one of {list(GRAPH_OPT_LEVELS)}")


# -- building the files ---------------------------------------------------------------------------
def model_file(cache_dir: Path, source_fingerprint: str, precision: str) -> Path:
    """Where the file of this backbone and precision lives. ``w8a8`` is named with the form this CPU
    runs (``w8a8-u8s8`` or ``w8a8-u8u8``); a form may also be asked for by that name."""
    from headfleet.embedder import w8a8

    form = w8a8.form_of(precision)
    if form is not None:
        precision = f"w8a8v{w8a8.RECIPE}-{form}"
    return Path(cache_dir) / f"{source_fingerprint[:32]}-{precision}-r{RECIPE}.onnx"


def ensure_model_file(folder: Path, pooling: PoolingConfig, precision: str, cache_dir: Path,
                      source_fingerprint: str) -> Path:
    """The cached ONNX file for this backbone and precision, exported / converted on first use."""
    path = model_file(cache_dir, source_fingerprint, precision)
    if path.exists():
        return path
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from headfleet.atomic import locked

    with locked(cache_dir / ".export.lock"):  # workers or replicas starting together export once
        if path.exists():
            return path
        return _build_model_file(folder, pooling, precision, cache_dir, source_fingerprint, path)


def lora_model_file(base: Path, targets) -> Path:
    """Where the LoRA graph of the file ``base`` (:func:`model_file`) for ``targets`` lives."""
    from headfleet.embedder import lora_graph

    return base.with_name(f"{base.stem}-lora{lora_graph.RECIPE}-{'+'.join(sorted(targets))}.onnx")


def ensure_lora_file(base: Path, folder: Path, pooling: PoolingConfig, source_fingerprint: str, targets) -> Path:
    """The LoRA graph (``embedder.lora_graph``) of the cached file ``base``, built on first use from
    it and the fp32 export beside it (exported again from ``folder`` when it was removed); written
    atomically under the export lock, then its manifest, which names the ``base`` it was built
    from (size and modification time): a LoRA file whose base was rebuilt since, or whose manifest
    a crash never wrote, is built again."""
    from headfleet.atomic import locked
    from headfleet.embedder import lora_graph

    path = lora_model_file(base, targets)
    if _built_from(path, base):
        return path
    fp32 = model_file(base.parent, source_fingerprint, "fp32")
    if not fp32.exists():
        ensure_model_file(folder, pooling, "fp32", base.parent, source_fingerprint)
    with locked(base.parent / ".export.lock"):
        if _built_from(path, base):
            return path
        try:
            _atomic(path, lambda tmp: lora_graph.add_lora(base, fp32, tmp, sorted(targets)))
            meta = json.loads(base.with_suffix(".json").read_text()) if base.with_suffix(".json").exists() else {}
            meta.update(lora_recipe=lora_graph.RECIPE, lora_targets=sorted(targets), lora_of=base.name,
                        lora_base=_file_signature(base))
            _atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))
        except ValidationError:
            raise
        except Exception as exc:
            raise BackendError(f"could not build the LoRA graph of {base.name}: {exc}") from exc
    return path


def _file_signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _built_from(path: Path, base: Path) -> bool:
    """Whether the LoRA file ``path`` exists and its manifest says it was built from ``base`` as it is now."""
    try:
        return path.exists() and json.loads(path.with_suffix(".json").read_text()).get("lora_base") == _file_signature(base)
    except (OSError, ValueError):
        return False


def _build_model_file(folder: Path, pooling: PoolingConfig, precision: str, cache_dir: Path,
                      source_fingerprint: str, path: Path) -> Path:
    fp32 = model_file(cache_dir, source_fingerprint, "fp32")
    try:
        if not fp32.exists():
            _atomic(fp32, lambda tmp: export(folder, pooling, tmp))
            _write_manifest(fp32, folder, source_fingerprint, "fp32")
        if precision != "fp32":
            from headfleet.embedder import w8a8

            convert = {"int8": _quantize_int8, "fp16": _convert_fp16}.get(precision)
            form = w8a8.form_of(precision)
            if form is not None:
                convert = lambda src, dst: w8a8.quantize(src, dst, folder, form, source_fingerprint)  # noqa: E731
            elif convert is None:
                raise ValueError(f"no ONNX conversion for precision {precision!r}")
            _atomic(path, lambda tmp: convert(fp32, tmp))
            _write_manifest(path, folder, source_fingerprint, precision)
    except Exception as exc:  # say which backbone and which step failed
        raise BackendError(f"could not build the {precision} ONNX model for {folder}: {exc}") from exc
    return path


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the file is a shareable artefact
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_manifest(path: Path, folder: Path, source_fingerprint: str, precision: str) -> None:
    import onnx
    import onnxruntime
    import torch

    meta = {"source_fingerprint": source_fingerprint, "model_folder": str(folder), "precision": precision,
            "recipe": RECIPE, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
    side = path.with_suffix(".json")
    _atomic(side, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))


def export(folder: Path, pooling: PoolingConfig, out: Path) -> None:
    """torch.onnx.export of Transformer -> Pooling -> Normalize with dynamic batch and seq axes."""
    import warnings

    import torch

    model = load_encoder(folder, attn_implementation="eager")

    class PooledBackbone(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            # A 4-D additive mask is used as is by transformers: no data-dependent mask building
            # (which the tracer would freeze to the example's shape and padding) ends up in the graph.
            keep = attention_mask[:, None, None, :].to(torch.float32)
            additive = (1.0 - keep) * _MASK_NEG
            hidden = self.encoder(input_ids=input_ids, attention_mask=additive,
                                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            return pool(hidden, attention_mask, pooling)  # the torch backend's pooling, traced

    # an example with padding in one row, so the traced graph carries the masked path
    ids = torch.full((2, 8), 101, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "embedding": {0: "batch"}}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes
        torch.onnx.export(PooledBackbone(model), (ids, mask), str(out), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes=axes, do_constant_folding=True)


def _quantize_int8(src: Path, out: Path) -> None:
    """int8 weights in blocks of 32 along K; int8 activations per row and block at run time.

    MatMulNBits(bits=8, accuracy_level=4) rather than ``quantize_dynamic``: the latter quantises
    each activation tensor with one scale for the whole batch, so a text's vector depends on the
    other texts in its batch (cosine down to ~0.965 between batch 1 and batch 64 on sms_spam), which
    a content-addressed cache cannot tolerate; it also loses more (mean cosine 0.990 vs 0.9995).
    """
    import onnx

    quantizer_cls = _import_nbits_quantizer()
    q = quantizer_cls(onnx.load(str(src)), bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(out))


def quantize_int8_dynamic(src: Path, out: Path) -> None:
    """``quantize_dynamic``: the classic int8 recipe, kept for the bench (see ``_quantize_int8``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _QuietLogging():
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])


def _import_nbits_quantizer():
    # importing this module calls logging.basicConfig(level=INFO) on the root logger; undo that
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, logger

    root.handlers[:] = handlers
    root.setLevel(level)
    logger.setLevel(logging.WARNING)  # one INFO line per graph node otherwise
    return MatMulNBitsQuantizer


class _QuietLogging:
    """Mute ORT's quantisation tools' root-logger warnings while they run."""

    def __enter__(self):
        import logging

        self._was = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        import logging

        logging.disable(self._was)


def _convert_fp16(src: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(out))


# -- running --------------------------------------------------------------------------------------
class OrtRunner:
    """One InferenceSession; ``runner(input_ids, mask) -> [batch, dim] float32``. Thread-safe."""

    def __init__(self, path: Path, *, device: str = "cpu", threads: int | None = None,
                 graph_opt: str = "all"):
        import onnxruntime as ort

        _check_graph_opt(graph_opt)
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_opt]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3  # errors only; ORT warns about every unused initializer otherwise
        # No busy-waiting between parallel sections: in the service a forward is cut into pieces
        # (the scheduler's yield_tokens) and other work (HTTP, heads, a LoRA row's torch forward)
        # runs between them, which spinning pool threads starved. bench/load.py, quiet, one run
        # each: tenant B's p99 under a flood / alone 2.70x spinning, 1.89x without; batch-64
        # throughput of the flood unchanged (1.3 vs 1.4 requests/s). No effect on the numbers.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("device is cuda but this onnxruntime has no CUDAExecutionProvider "
                                   "(install onnxruntime-gpu)")
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            wanted = "CUDAExecutionProvider"
        else:
            providers = ["CPUExecutionProvider"]
            wanted = "CPUExecutionProvider"
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime could not load {path}: {exc}") from exc
        if self.session.get_providers()[0] != wanted:  # never a silent fallback to the CPU
            raise BackendError(f"onnxruntime runs {path} on {self.session.get_providers()[0]}, not {wanted}")
        self.path = path
        self.graph_opt = graph_opt
        self.threads = threads

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        # input_ids, mask: [batch, seq] int64
        (out,) = self.session.run(["embedding"], {"input_ids": input_ids, "attention_mask": mask})
        return out


def backbone_fingerprint(path: str | os.PathLike | None = None, backend: str = "torch", precision: str = "fp32",
                         graph_opt: str = "all") -> str:
    """The fingerprint ``Embedder.load`` gives for these settings, without loading any weights
    (for listings such as which heads must be retrained)."""
    from headfleet.embedder.backbone import fingerprint, resolve_model_path

    folder = resolve_model_path(path)
    return fingerprint(folder, PoolingConfig.from_folder(folder), backend_tag(backend, precision, graph_opt=graph_opt))
