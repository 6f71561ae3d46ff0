"""LoRA rows inside the ONNX graph: the exported backbone with a per-row low-rank delta on every
target linear, so adapter rows run on the same ONNX Runtime backend (fp32, int8, ``w8a8``) as the
plain rows, not on a torch copy.

For each target linear (``query`` and ``value`` by default) with input ``x`` [batch, seq, in] and
output ``y`` [batch, seq, out] (before its bias Add, exactly where the torch path's
``MultiLoRALinear`` adds its delta):

    y[b] += (x[b] @ (A[b] * scale[b])) @ B[b]        A: [batch, in, r], B: [batch, r, out], scale: [batch]

for adapters of rank r <= ``GRAPH_MAX_RANK`` (16); wider ones run on the torch copy.

``A``/``B`` come in as copies of every adapter slot (``LoraGraphRunner``: from the bank's stacked
``[slots, in, max_rank]`` buffers, cut to the widest rank among the rows rounded up to a multiple
of ``RANK_STEP``) with each row's slot index, and the graph gathers each row's block itself; so
the file depends only on the backbone, the precision and the target names, never on which
adapters are resident. Linears that read the same ``x`` (``query`` and ``value`` of a layer)
share one shrink GEMM over their concatenated A's. The base linear stays whatever the precision
made it (an integer GEMM on ``w8a8``, whose adapted linears' biases move into the outlier Gemm:
``fold_biases``); the delta runs in fp32 on the fp32 activation ``x``, as LoRA was trained. Rows
without an adapter never enter this graph (the embedder sends them to the plain file), so plain
vectors stay bit-identical to a batch without adapters.

Graph inputs: ``input_ids``, ``attention_mask`` [batch, seq] int64; ``lora_rows`` [rows] int64,
each row's slot (``rows`` is the batch, or 1 when every row carries the same adapter: broadcast);
per group of linears reading one ``x``, ``lora_A.<module>|<module>...`` [slots, r x members, in]
(each member's A transposed, times the slot's scale, one member after the other in the order
named; the graph transposes the gathered rows back, which ONNX Runtime fuses into the GEMM); per
linear ``lora_B.<module>`` [slots, r, out]; all float32 but ``lora_rows``, with canonical module
names (e.g. ``encoder.layer.0.attention.self.query``). Output ``embedding``.
Reference: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (the delta
``x A B * alpha / r``); the per-row gather follows S-LoRA / Punica's batching of many adapters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from headfleet.errors import ValidationError
from headfleet.embedder.lora_names import canonical_module_name, read_by_embedding, target_name

log = logging.getLogger(__name__)
A_PREFIX, B_PREFIX, GROUP_SEP, ROWS = "lora_A.", "lora_B.", "|", "lora_rows"  # graph input names (module docstring)
RANK_STEP = 8  # the rank the rows' A/B are cut to is a multiple of this (LoraGraphRunner)
# Adapters up to this rank run in the graph; wider ones on the torch copy (Embedder._forward_split).
# A shrink GEMM's output up to 32 columns (2 members x 16) gives each row the same bits whatever
# the width and the batch; at 48 columns and more ONNX Runtime's GEMM (2 threads) gave a row other
# last bits alone, beside wider adapters and broadcast, which w8a8's int8 steps after it grow to
# ~1e-3: a row's vector would depend on its batch (review, 1 Dec).
GRAPH_MAX_RANK = 16
RECIPE = 5  # bump when the delta's placement or arithmetic changes (it is in the file name and the LoRA fingerprint)


def target_linears(fp32_graph, targets: Sequence[str]) -> list[tuple[str, str, str, int, int]]:
    """``(module, x, y, in, out)`` of every weight MatMul of the fp32 export whose module's short
    name is in ``targets`` and whose output the embedding reads, in graph order.

    ``module`` is the canonical name (as ``embedder.lora.module_shapes`` gives it); ``x``/``y`` are
    the MatMul's input and output tensor names, which every precision's conversion keeps."""
    shapes = {i.name: tuple(i.dims) for i in fp32_graph.initializer}
    found = []
    for node in fp32_graph.node:
        if node.op_type != "MatMul" or len(shapes.get(node.input[1], ())) != 2:
            continue
        # torch.onnx names a linear's MatMul "/<module path with / for .>/MatMul"
        path = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        module = canonical_module_name(path)
        if target_name(module) in targets and read_by_embedding(module):
            k, n = shapes[node.input[1]]
            found.append((module, node.input[0], node.output[0], int(k), int(n)))
    return found


def add_lora(src: Path, fp32: Path, out: Path, targets: Sequence[str]) -> list[str]:
    """Write ``src`` (any precision's file of the fp32 export ``fp32``) with the per-row LoRA delta
    on every target linear to ``out``; returns the adapted module names.

    Target linears that read the same input (``query`` and ``value`` of one layer) share one shrink
    GEMM: their A's come concatenated along the rank axis in one input, already multiplied by each
    row's scale, and the product is split before each module's expand.

    Raises ValidationError when the export has no such linear, ValueError when the converted file lost one of their
    tensors (a conversion that renamed them cannot carry the delta)."""
    import onnx
    from onnx import TensorProto, helper

    linears = target_linears(onnx.load(str(fp32)).graph, targets)
    if not linears:
        raise ValidationError(f"the backbone has no linear layers named {list(targets)} to adapt")
    model = onnx.load(str(src))
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    producers = {o: i for i, node in enumerate(graph.node) for o in node.output}
    known = producers.keys() | {i.name for i in graph.input}
    for module, x, y, _, _ in linears:
        if x not in known or y not in producers:
            raise ValueError(f"{src.name} has no tensors {x!r} -> {y!r} of {module}: cannot add its LoRA delta")
    groups: dict[str, list[tuple[str, str, int, int]]] = {}
    for module, x, y, k, n in linears:
        groups.setdefault(x, []).append((module, y, k, n))
    after: dict[int, list] = {}
    gathers = []  # each row's A/B taken from the slot copies by index, first thing in the graph
    graph.input.append(helper.make_tensor_value_info(ROWS, TensorProto.INT64, ["rows"]))

    def per_row(name: str, dims: list) -> str:
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["slots"] + dims))
        gathers.append(helper.make_node("Gather", [name, ROWS], [name + "/rows"], name=name + "/rows", axis=0))
        return name + "/rows"

    for x, members in groups.items():
        a = per_row(A_PREFIX + GROUP_SEP.join(m for m, *_ in members), ["ranks", members[0][2]])
        p = f"lora/{members[0][0]}"
        xa = [p + "/xa"] if len(members) == 1 else [f"lora/{m}/xa" for m, *_ in members]
        shrink = [helper.make_node("Transpose", [a], [p + "/a"], name=p + "/a", perm=[0, 2, 1]),
                  helper.make_node("MatMul", [x, p + "/a"], [p + "/xa" if len(members) == 1 else p + "/xa_all"],
                                   name=p + "/shrink")]  # [batch, seq, members x rank], scale included
        if len(members) > 1:  # equal parts: every member's A is cut to the same rank
            extra = {"num_outputs": len(members)} if opset >= 18 else {}
            shrink.append(helper.make_node("Split", [p + "/xa_all"], xa, name=p + "/split", axis=2, **extra))
        after.setdefault(min(producers[y] for _, y, _, _ in members), []).extend(shrink)
        for (module, y, _, n), part in zip(members, xa):
            b = per_row(B_PREFIX + module, ["rank", n])
            base = y + "/lora_base"
            producer = graph.node[producers[y]]
            producer.output[list(producer.output).index(y)] = base
            q = f"lora/{module}"
            after.setdefault(producers[y], []).extend([
                helper.make_node("MatMul", [part, b], [q + "/delta"], name=q + "/expand"),  # [batch, seq, out]
                helper.make_node("Add", [base, q + "/delta"], [y], name=q + "/add"),
            ])
    nodes = list(gathers)
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes += after.get(i, [])
    del graph.node[:]
    graph.node.extend(nodes)
    folded = fold_biases(graph, [y for _, _, y, _, _ in linears])
    log.info("LoRA graph %s: %d adapted linears, %d biases folded into their outlier Gemm", out.name, len(linears), folded)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return [m for m, *_ in linears]


def fold_biases(graph, outputs: Sequence[str]) -> int:
    """On a ``w8a8`` file: move each adapted linear's bias into its fp32 outlier Gemm, so the
    delta's Add replaces the bias Add instead of running beside it; returns how many were folded.

    ``w8a8`` (``embedder.w8a8``) ends a linear with ``Gemm(x_o, W_o, C=integer product)``, where
    ``x_o`` [tokens, k] are the activation's outlier columns picked by a one-hot MatMul. The pick
    gets one more column that is exactly 1 (a zero one-hot column plus a constant ``[0..0, 1]``),
    and ``W_o`` one more row: the bias for an adapted linear, zeros for the other linears reading
    the same pick. So ``Gemm`` yields ``x_o W_o + bias + C`` and the separate bias Add goes: per
    layer, two passes over [tokens, out] less, for one over [tokens, k + 1]. The bias is then summed
    in another order than the plain file's (LoRA rows are keyed by this graph's recipe). A linear
    whose tensors do not have this form (fp32, MatMulNBits ``int8``) keeps its bias Add.
    ``outputs``: each adapted linear's output before its bias (the delta Add writes it)."""
    from onnx import helper, numpy_helper

    consts = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    producer = {o: node for node in graph.node for o in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)

    def array(name):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    def own(name, reader, value: np.ndarray) -> str:
        """``value`` as the constant ``reader`` reads, written in place when only it reads it."""
        if len(readers[name]) == 1:
            consts[name].CopyFrom(numpy_helper.from_array(value, consts[name].name))
            return name
        new = name + "/lora_fold/" + (reader.name or reader.output[0])
        graph.initializer.append(numpy_helper.from_array(value, new))
        consts[new] = graph.initializer[-1]
        reader.input[list(reader.input).index(name)] = new
        readers[name].remove(reader)
        readers[new] = [reader]
        return new

    widened: set[str] = set()  # 2-D picks given their ones column
    drop = []
    for y in outputs:
        add = producer.get(y)  # the delta's Add: (base, delta) -> y
        users = readers.get(y, [])
        if add is None or add.op_type != "Add" or len(users) != 1 or users[0].op_type != "Add":
            continue
        bias_add = users[0]
        bias = next((array(i) for i in bias_add.input if i != y and i in consts), None)
        reshape = producer.get(add.input[0])
        gemm = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        if bias is None or bias.ndim != 1 or gemm is None or gemm.op_type != "Gemm" or len(gemm.input) < 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        xo2, w_name = gemm.input[0], gemm.input[1]
        flat = producer.get(xo2)
        pick = producer.get(flat.input[0]) if flat is not None and flat.op_type == "Reshape" else None
        w = array(w_name)
        if pick is None or pick.op_type != "MatMul" or w is None or w.shape[1] != bias.shape[0]:
            continue
        if pick.output[0] not in widened:
            onehot, shape = array(pick.input[1]), array(flat.input[1])
            k = w.shape[0]
            if onehot is None or shape is None or onehot.shape[1] != k or list(shape) != [-1, k]:
                continue
            # the widened pick must reach nothing but Gemms that read it as A, untransposed: any
            # other reader would get a column it does not expect
            gemms = readers[xo2]
            if readers.get(pick.output[0]) != [flat] or any(
                    g.op_type != "Gemm" or g.input[0] != xo2 or array(g.input[1]) is None
                    or any(helper.get_attribute_value(a) for a in g.attribute if a.name in ("transA", "transB"))
                    for g in gemms):
                continue
            own(pick.input[1], pick, np.concatenate([onehot, np.zeros((onehot.shape[0], 1), onehot.dtype)], 1))
            own(flat.input[1], flat, np.array([-1, k + 1], shape.dtype))
            one = np.zeros(k + 1, np.float32)
            one[-1] = 1.0
            picked = pick.output[0]
            pick.output[0] = picked + "/lora_fold"
            graph.initializer.append(numpy_helper.from_array(one, picked + "/lora_one"))
            graph.node.insert(list(graph.node).index(pick) + 1, helper.make_node(
                "Add", [picked + "/lora_fold", picked + "/lora_one"], [picked], name=picked + "/lora_one"))
            for g in gemms:  # every linear reading the pick gets a zero row (exact zeros: same sums)
                wg = array(g.input[1])
                own(g.input[1], g, np.concatenate([wg, np.zeros((1, wg.shape[1]), wg.dtype)], 0))
            widened.add(pick.output[0])
            w_name = gemm.input[1]
            w = array(w_name)
        w = w.copy()
        w[-1] = bias
        own(w_name, gemm, w)
        add.output[0] = bias_add.output[0]
        drop.append(bias_add)
    for node in drop:
        graph.node.remove(node)
    return len(drop)


class LoraGraphRunner:
    """Runs a batch whose rows carry adapter slots through the LoRA graph, in one forward:
    ``runner(input_ids, mask, slots) -> [batch, dim] float32``.

    ``slots``: [batch] int64, the bank slot of each row, holding an adapter of rank at most
    ``GRAPH_MAX_RANK`` (else ValueError; the embedder sends wider ones to the torch copy). A row
    whose slot is -1 or cleared reads a slot of zeros: a zero delta on this file's base (on fp32
    the plain file's vector to the bit, on ``int8`` and ``w8a8`` within about 1e-2 a component;
    the embedder sends plain rows and rows of cleared slots to the plain file). Each forward feeds the graph the slots' copies of A/B (``SlotBank``: per
    module ``A [slots, in, max_rank]``, ``B [slots, max_rank, out]``, torch buffers on the CPU,
    copied per slot when the slot is written: A transposed and times the slot's scale, both cut
    to each multiple of ``RANK_STEP`` up to ``GRAPH_MAX_RANK``; about 0.9 MB per slot for
    all-MiniLM-L6-v2's 12 targets at max rank 16) at the widest rank among the rows rounded up
    to a multiple of ``RANK_STEP``, and the rows' slots. Thread-safe; like the torch path, a slot
    must not be rewritten while a forward that uses it runs (the adapter manager's pins)."""

    def __init__(self, session, bank, modules: Sequence[str]):
        missing = [m for m in modules if m not in bank.layers]
        if missing:
            raise ValueError(f"the adapter bank has no layers for {missing[:3]}")
        self.session = session  # an OrtRunner's InferenceSession over the LoRA file
        self.bank = bank
        self.modules = list(modules)
        names = [i.name for i in session.get_inputs()]
        self.groups = [n[len(A_PREFIX):].split(GROUP_SEP) for n in names if n.startswith(A_PREFIX)]
        if sorted(m for g in self.groups for m in g) != sorted(self.modules):
            raise ValueError(f"the LoRA graph adapts {self.groups}, the bank {self.modules}")
        self._A = {m: bank.layers[m].A.detach().numpy() for m in self.modules}  # views of the bank
        self._B = {m: bank.layers[m].B.detach().numpy() for m in self.modules}
        # Copies of every slot for the graph to gather rows from, one set per rank a batch can be
        # cut to (multiples of RANK_STEP up to max_rank): per group the members' A transposed and
        # times the slot's scale, [slots + 1, members x rank, in]; per module B, [slots + 1, rank,
        # out]. The last slot stays zeros (rows of a cleared slot). They are graph inputs as they
        # stand, without a copy: the graph's Gather takes each row's block (a host-side gather of
        # 9.4 MB for 32 rank-8 rows took 1-5.6 ms a forward; in the graph the LoRA file cost +0.5 to
        # +4.0 % over the plain file against +6.5 to +11.3 % with it, same vectors, 1 Dec, not quiet).
        # Refreshed per slot when the bank's generation of it moves.
        self.max_rank = min(bank.max_rank, GRAPH_MAX_RANK)
        self.ranks = sorted({min(self.max_rank, k) for k in range(RANK_STEP, self.max_rank + RANK_STEP, RANK_STEP)})
        self.zero = bank.max_slots
        self._Am = {r: [np.zeros((bank.max_slots + 1, len(g) * r, self._A[g[0]].shape[1]), np.float32)
                        for g in self.groups] for r in self.ranks}
        self._Bm = {r: {m: np.zeros((bank.max_slots + 1, r, self._B[m].shape[2]), np.float32) for m in self.modules}
                    for r in self.ranks}
        self._seen = [-1] * bank.max_slots

    def _refresh(self, slot: int) -> None:
        generation = self.bank.generation[slot]
        if self._seen[slot] == generation:
            return
        scale = self.bank._scales_host[slot]
        for r in self.ranks:
            for group, am in zip(self.groups, self._Am[r]):
                blocks = am[slot].reshape(len(group), r, am.shape[-1])
                for j, m in enumerate(group):
                    np.multiply(self._A[m][slot, :, :r].T, scale, out=blocks[j])
                    self._Bm[r][m][slot] = self._B[m][slot, :r]
        self._seen[slot] = generation

    def __call__(self, input_ids: np.ndarray, mask: np.ndarray, slots: np.ndarray) -> np.ndarray:
        ranks = self.bank._ranks_host
        host = np.asarray(slots, np.int64).tolist()
        live = [s >= 0 and ranks[s] > 0 for s in host]
        widest = max([ranks[s] for s, ok in zip(host, live) if ok] or [1])
        if widest > self.max_rank:
            raise ValueError(f"a row's adapter has rank {widest}; the LoRA graph serves ranks up to {self.max_rank}")
        # cut to a multiple of 8 (zero columns add exact zeros): a row's delta must not depend on the
        # other rows' ranks, and at rank 1 ONNX Runtime's GEMM takes another path whose last-bit
        # differences, through the int8 activation steps after it, moved a rank-1 row by up to
        # 2e-3 between a batch alone and beside a rank-16 adapter
        rank = min(self.max_rank, -(-widest // RANK_STEP) * RANK_STEP)
        for s in set(s for s, ok in zip(host, live) if ok):
            self._refresh(s)
        # a dead row reads the zero slot, not a resident adapter times 0: NaN or inf in one cannot
        # reach it
        rows = np.array([s if ok else self.zero for s, ok in zip(host, live)], np.int64)
        if (rows == rows[0]).all():  # one adapter: its A/B once, broadcast over the rows
            rows = rows[:1]
        feeds = {"input_ids": input_ids, "attention_mask": mask, ROWS: rows}
        for group, am in zip(self.groups, self._Am[rank]):
            feeds[A_PREFIX + GROUP_SEP.join(group)] = am
        for m, bm in self._Bm[rank].items():
            feeds[B_PREFIX + m] = bm
        (out,) = self.session.run(["embedding"], feeds)
        return out
