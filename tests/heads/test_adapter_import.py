"""Importing PEFT adapters: every LoraConfig option and weight dtype is served as PEFT serves it, or refused by name.

Adapters are made and saved by PEFT itself on the tiny BERT of ``tiny_model_dir`` (2 layers,
32 wide, MiniLM's tokenizer and pooling), read through headfleet's PEFT loader, put in a device
slot and served in one batch with plain rows. "As PEFT serves it" means: PEFT's own model,
loaded from the same files onto the same backbone, gives the same vectors. An option PEFT saves
that headfleet does not serve must be refused with an ``AdapterImportError`` whose message names
the option (or target) and the setting that would be accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from headfleet.embedder import Embedder
from headfleet.embedder.lora import module_shapes
from headfleet.errors import AdapterImportError
from headfleet.heads.adapters import LoraAdapter
from triton_interpreter import prepare

# The Triton kernels imported interpretable before peft imports triton (as in
# tests/embedder/test_lora_injection.py), so the kernel tests later in the same run still can.
if not torch.cuda.is_available():
    prepare()
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig  # noqa: E402
from transformers import AutoModel  # noqa: E402

TEXTS = ["Your parcel is waiting, confirm the delivery fee here", "Can we move the meeting to Thursday?",
         "lol ok", "URGENT: the contract clause 4.2 exposes us to unlimited liability"]


def _embedder(folder: Path, targets: tuple[str, ...]) -> Embedder:
    emb = Embedder.load(folder, max_length=64, batch_size=16, device="cpu")
    emb.enable_lora(max_slots=2, max_rank=8, targets=targets)
    return emb


@pytest.fixture(scope="module")
def default_targets(tiny_model_dir) -> Embedder:
    """The service's default injection points (HEADFLEET_LORA_TARGETS=query,value)."""
    return _embedder(tiny_model_dir, ("query", "value"))


@pytest.fixture(scope="module")
def wide_targets(tiny_model_dir) -> Embedder:
    """HEADFLEET_LORA_TARGETS=query,value,key,dense."""
    return _embedder(tiny_model_dir, ("query", "value", "key", "dense"))


def _save_peft(base: Path, out: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, r: int = 4,
               lora_alpha: float = 8, **options) -> Path:
    """An adapter made by PEFT on ``base`` with ``options``, random (clearly non-zero) A and B in
    ``dtype``, saved by PEFT to ``out``."""
    options.setdefault("target_modules", ["query", "value"])
    options.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModel.from_pretrained(str(base)), LoraConfig(r=r, lora_alpha=lora_alpha, **options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.normal_(0, 0.5)
                param.data = param.data.to(dtype)
    model.save_pretrained(str(out))
    return out


def _peft_vectors(emb: Embedder, base: Path, folder: Path, texts: list[str]) -> np.ndarray:
    """What PEFT gives each text alone, its model loaded from ``folder`` onto ``base``."""
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(folder)).eval()
    out = []
    for text in texts:
        ids = torch.tensor([emb.tokenizer.encode(text).ids[: emb.max_length]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        out.append(emb.runner.pool(hidden, mask)[0].numpy())
    return np.stack(out)


def _assert_served_as_peft(emb: Embedder, base: Path, folder: Path) -> LoraAdapter:
    """Import ``folder``, serve it in a batch mixed with plain rows, compare with PEFT row by row."""
    adapter = LoraAdapter.from_folder(folder, shapes=module_shapes(emb.model))
    emb.lora.write(0, adapter.torch_weights("cpu"), adapter.rank, adapter.scale)
    n = len(TEXTS)
    out = emb.embed(TEXTS + TEXTS, slots=[0] * n + [-1] * n).vectors
    plain = emb.embed(TEXTS).vectors
    expected = _peft_vectors(emb, base, folder, TEXTS)
    np.testing.assert_allclose(out[:n], expected, atol=1e-5)
    cosine = (out[:n] * expected).sum(1) / np.linalg.norm(out[:n], axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.9999
    assert np.abs(out[:n] - plain).max() > 100 * 1e-5  # the adapter really changed the vectors
    np.testing.assert_array_equal(out[n:], plain)  # plain rows in the same batch: the frozen backbone
    return adapter


def _refusal(folder: Path, emb: Embedder) -> str:
    with pytest.raises(AdapterImportError) as err:
        LoraAdapter.from_folder(folder, shapes=module_shapes(emb.model))
    return str(err.value)


_DROP = object()  # _edit_config(folder, option=_DROP) removes the option


def _edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    return folder


# -- weight dtypes -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, stored", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float64, "F64")])
def test_adapter_in_any_float_dtype_loads_and_serves_what_peft_computes(tmp_path, tiny_model_dir, default_targets,
                                                                        dtype, stored):
    from safetensors import safe_open

    folder = _save_peft(tiny_model_dir, tmp_path / "a", dtype=dtype)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}  # PEFT really saved that dtype
    adapter = _assert_served_as_peft(default_targets, tiny_model_dir, folder)
    assert all(a.dtype == np.float32 for a in (*adapter.A.values(), *adapter.B.values()))


def test_integer_weights_are_refused_naming_the_dtype(tmp_path, tiny_model_dir, default_targets):
    from safetensors.torch import load_file, save_file

    folder = _save_peft(tiny_model_dir, tmp_path / "a")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: (v * 100).to(torch.int8) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    msg = _refusal(folder, default_targets)
    assert "is int8; LoRA weights must be floating point (bf16, f16, f32 or f64)" in msg


# -- targets: injection points (HEADFLEET_LORA_TARGETS) ----------------------------------------
@pytest.mark.parametrize("modules, target, setting", [
    (["query", "key"], "target 'key'", "HEADFLEET_LORA_TARGETS=query,value,key"),
    (["dense"], "target 'dense'", "HEADFLEET_LORA_TARGETS=query,value,dense"),
    ("all-linear", "targets 'dense', 'key'", "HEADFLEET_LORA_TARGETS=query,value,dense,key"),
])
def test_target_outside_the_injection_points_is_refused_naming_the_setting(tmp_path, tiny_model_dir,
                                                                           default_targets, modules, target, setting):
    folder = _save_peft(tiny_model_dir, tmp_path / "a", target_modules=modules)
    msg = _refusal(folder, default_targets)
    assert f"the adapter adapts {target} (e.g. encoder.layer.0." in msg
    assert "which this service does not adapt (HEADFLEET_LORA_TARGETS=query,value)" in msg
    assert msg.endswith(f"set {setting} to serve it")
    assert "another architecture" not in msg and "rank" not in msg


@pytest.mark.parametrize("modules", [["query", "key"], ["dense"], "all-linear"])
def test_key_and_dense_targets_load_and_serve_when_enabled(tmp_path, tiny_model_dir, wide_targets, modules):
    """``dense`` includes BERT's pooler, whose output the embedding never reads: PEFT's delta there
    changes nothing we serve, so it is dropped, not refused and not injected."""
    folder = _save_peft(tiny_model_dir, tmp_path / "a", target_modules=modules)
    adapter = _assert_served_as_peft(wide_targets, tiny_model_dir, folder)
    assert adapter.targets == (["dense", "key", "query", "value"] if modules == "all-linear" else sorted(modules))
    assert not any(name.startswith("pooler.") for name in adapter.A)
    assert "pooler.dense" not in wide_targets.lora.layers


# -- LoraConfig options that change the forward: refused by name, with what to do --------------
def test_every_field_of_the_installed_peft_loraconfig_is_decided():
    """Read, no effect on the forward, or refused: a field PEFT adds must be decided here (until
    then an adapter that sets it is refused as unknown, see ``a_newer_peft_option`` below)."""
    import dataclasses

    from headfleet.heads import peft_config as adapters

    decided = adapters._READ | set(adapters._NO_EFFECT) | set(adapters._REFUSED)
    assert {f.name for f in dataclasses.fields(LoraConfig)} - decided == set()
    assert not adapters._READ & set(adapters._NO_EFFECT) and not set(adapters._NO_EFFECT) & set(adapters._REFUSED)


def _peft(**options):  # an adapter PEFT builds and saves with these LoraConfig options
    return "peft", options


def _config(**fields):  # a PEFT-saved plain adapter, these fields then written into its adapter_config.json
    return "config", fields


# option -> (how the adapter is made, the start of the refusal after "<folder>: ", the setting it names)
REFUSED = {
    "lora_bias": (_peft(lora_bias=True), "lora_bias=True is not supported: it adds a bias to lora_B",
                  "train with lora_bias=False"),
    "layer_replication": (_peft(layer_replication=[[0, 2], [1, 2]]),
                          "layer_replication=[[0, 2], [1, 2]] is not supported: it stacks repeated copies",
                          "train the adapter again without it"),
    "use_dora": (_peft(use_dora=True), "use_dora=True is not supported: DoRA rescales", "train with use_dora=False"),
    "bias": (_peft(bias="lora_only"), "bias='lora_only' is not supported: it trains the backbone's own biases",
             "train with bias='none'"),
    "modules_to_save": (_peft(modules_to_save=["pooler"]),
                        "modules_to_save=['pooler'] is not supported: it replaces whole backbone modules",
                        "train without modules_to_save"),
    "rank_pattern": (_peft(target_modules=["query", "key"], rank_pattern={"key": 2}),
                     "rank_pattern={'key': 2} is not supported", "train with one r for every module (no rank_pattern)"),
    "alpha_pattern": (_peft(alpha_pattern={"value": 16}), "alpha_pattern={'value': 16} is not supported",
                      "train with one lora_alpha for every module (no alpha_pattern)"),
    "trainable_token_indices": (_peft(trainable_token_indices=[1, 2]), "trainable_token_indices=[1, 2] is not "
                                "supported: it trains rows of the token embedding", "train the adapter again without it"),
    "target_parameters": (_peft(target_modules=[], target_parameters=["encoder.layer.0.attention.self.query.weight"]),
                          "target_parameters=['encoder.layer.0.attention.self.query.weight'] is not supported",
                          "name linear modules in target_modules instead"),
    "alora_invocation_tokens": (_peft(alora_invocation_tokens=[101]), "alora_invocation_tokens=[101] is not "
                                "supported: Activated LoRA", "train the adapter again without it"),
    "use_bdlora": (_peft(use_bdlora=BdLoraConfig(target_modules_bd_a=["query"], target_modules_bd_b=["value"],
                                                 nblocks=2)), "use_bdlora={", "train the adapter again without it"),
    "kasa_config": (_peft(kasa_config=KasaConfig()), "kasa_config={", "train the adapter again without it"),
    "use_qalora": (_peft(use_qalora=True), "use_qalora=True is not supported: QA-LoRA", "train with use_qalora=False"),
    "init_lora_weights=pissa": (_peft(init_lora_weights="pissa"), "init_lora_weights='pissa' is not supported: PiSSA",
                                "path_initial_model_for_weight_conversion"),
    "init_lora_weights=pissa_niter": (_peft(init_lora_weights="pissa_niter_2"),
                                      "init_lora_weights='pissa_niter_2' is not supported: PiSSA",
                                      "path_initial_model_for_weight_conversion"),
    "init_lora_weights=olora": (_peft(init_lora_weights="olora"), "init_lora_weights='olora' is not supported: OLoRA",
                                "path_initial_model_for_weight_conversion"),
    # what PEFT cannot build here (Megatron, bitsandbytes, calibration data, several adapters, a Conv1D model)
    "megatron_config": (_config(megatron_config={"tensor_model_parallel_size": 2}),
                        "megatron_config={'tensor_model_parallel_size': 2} is not supported", "without megatron_config"),
    "arrow_config": (_config(arrow_config={"top_k": 2}), "arrow_config={'top_k': 2} is not supported: Arrow routes",
                     "import each expert as its own"),
    "fan_in_fan_out": (_config(fan_in_fan_out=True), "fan_in_fan_out=True is not supported: it describes Conv1D "
                       "weights", "(fan_in_fan_out=False)"),
    "init_lora_weights=loftq": (_config(init_lora_weights="loftq"), "init_lora_weights='loftq' is not supported: "
                                "LoftQ trains on the quantised base", "without LoftQ (init_lora_weights=True)"),
    "init_lora_weights=corda": (_config(init_lora_weights="corda"), "init_lora_weights='corda' is not supported: "
                                "CorDA", "path_initial_model_for_weight_conversion"),
    "init_lora_weights=lora_ga": (_config(init_lora_weights="lora_ga"), "init_lora_weights='lora_ga' is not "
                                  "supported: LoRA-GA", "path_initial_model_for_weight_conversion"),
    "a_newer_peft_option": (_config(a_newer_peft_option={"on": True}), "a_newer_peft_option={'on': True} is not "
                            "supported: it is not an option of the PEFT LoraConfig this headfleet knows",
                            "remove it from adapter_config.json"),
}


@pytest.mark.parametrize("option", list(REFUSED))
def test_unsupported_option_is_refused_by_name(tmp_path, tiny_model_dir, default_targets, option):
    (how, values), shown, setting = REFUSED[option]
    if how == "peft":
        folder = _save_peft(tiny_model_dir, tmp_path / "a", **values)
    else:
        folder = _edit_config(_save_peft(tiny_model_dir, tmp_path / "a"), **values)
    msg = _refusal(folder, default_targets)
    assert msg.startswith(f"{folder}: {shown}")
    assert setting in msg
    assert "but the config says r=" not in msg and "another architecture" not in msg


def test_lora_bias_tensors_are_refused_by_name_even_when_the_config_hides_it(tmp_path, tiny_model_dir,
                                                                            default_targets):
    """The tensors say what the config does not: ``lora_B.bias`` names lora_bias, never a wrong rank."""
    folder = _edit_config(_save_peft(tiny_model_dir, tmp_path / "a", lora_bias=True), lora_bias=_DROP)
    msg = _refusal(folder, default_targets)
    assert ".lora_B.bias' comes from lora_bias, which is not supported" in msg
    assert msg.endswith("train with lora_bias=False")
    assert "rank" not in msg


def test_embedding_target_is_refused_naming_it(tmp_path, tiny_model_dir, default_targets):
    folder = _save_peft(tiny_model_dir, tmp_path / "a", target_modules=["query", "word_embeddings"])
    msg = _refusal(folder, default_targets)
    assert "target 'word_embeddings' (embeddings.word_embeddings) is an embedding layer" in msg
    assert msg.endswith("remove it from target_modules")


def test_wrong_rank_is_named_only_for_an_actual_rank_mismatch(tmp_path, tiny_model_dir, default_targets):
    folder = _edit_config(_save_peft(tiny_model_dir, tmp_path / "a"), r=8)
    msg = _refusal(folder, default_targets)
    assert msg.endswith("has rank 4 in lora_A and 4 in lora_B, but the config says r=8")


# -- LoraConfig options PEFT serves as plain LoRA on this backbone: honoured --------------------
HONOURED = {  # option -> what PEFT is asked for; PEFT's own forward for each is plain LoRA on this backbone
    "layers_to_transform": dict(layers_to_transform=[1], layers_pattern="layer"),
    "exclude_modules": dict(exclude_modules=["encoder.layer.0.attention.self.query"]),
    "target_modules regex": dict(target_modules=r".*layer\.1\.attention\.self\.(query|value)"),
    "use_rslora": dict(use_rslora=True, lora_alpha=6),
    "velora_config": dict(velora_config=VeloraConfig(num_groups=4)),
    "monteclora_config": dict(monteclora_config=MontecloraConfig()),
    "init_lora_weights=mica": dict(init_lora_weights="mica"),
    "init_lora_weights=orthogonal": dict(init_lora_weights="orthogonal"),
    "init_lora_weights=eva": dict(init_lora_weights="eva"),
    "init_lora_weights=gaussian": dict(init_lora_weights="gaussian"),
    "fan_in_fan_out on nn.Linear": dict(fan_in_fan_out=True),  # PEFT turns it off for nn.Linear and saves False
}


@pytest.mark.parametrize("option", list(HONOURED))
def test_option_peft_serves_as_plain_lora_is_honoured(tmp_path, tiny_model_dir, default_targets, option):
    folder = _save_peft(tiny_model_dir, tmp_path / "a", **HONOURED[option])
    adapter = _assert_served_as_peft(default_targets, tiny_model_dir, folder)
    if option in ("layers_to_transform", "target_modules regex"):
        assert sorted(adapter.A) == ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]
    if option == "exclude_modules":
        assert "encoder.layer.0.attention.self.query" not in adapter.A and len(adapter.A) == 3


def test_imported_bf16_adapter_round_trips_as_float32_peft_files(tmp_path, tiny_model_dir, default_targets):
    """What the registry stores of an imported bf16 adapter is plain PEFT LoRA that reads back the same."""
    folder = _save_peft(tiny_model_dir, tmp_path / "a", dtype=torch.bfloat16)
    adapter = LoraAdapter.from_folder(folder, shapes=module_shapes(default_targets.model))
    (tmp_path / "b").mkdir()
    for name, data in adapter.to_files().items():
        (tmp_path / "b" / name).write_bytes(data)
    back = LoraAdapter.from_folder(tmp_path / "b", shapes=module_shapes(default_targets.model))
    for name in adapter.A:
        np.testing.assert_array_equal(back.A[name], adapter.A[name])
        np.testing.assert_array_equal(back.B[name], adapter.B[name])
