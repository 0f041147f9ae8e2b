"""Attention fusion for ONNX Runtime: the exporter's decomposed attention → one MultiHeadAttention node.

torch.onnx.export (ours and optimum's) writes each scaled-dot-product attention as Reshape + Transpose per
input, a scale Mul on q and on kᵀ, MatMul, Softmax, MatMul, Transpose, Reshape: it materialises the
(batch, heads, S_q, S_kv) score tensor and makes a pass over it per op. ONNX Runtime's contrib
`com.microsoft.MultiHeadAttention` computes the same from the (batch, S, heads·head_dim) projections in
one kernel. Measured here (1 thread, batch 2, 1,024 tokens, 8 heads of 4): 20.6 ms against 32.6 ms,
outputs equal to 1e-6; in a 256 px UNet, MatMul + Softmax were 78 % of the time.

Only the exact pattern is rewritten (unmasked attention, softmax over the last axis, the default scale
1/√head_dim or constant scales, float32); anything else is left as it is. Needs the `onnx` package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"


@dataclass
class _Graph:
    """Producer/consumer indexes over a GraphProto, and its constants."""

    producer: dict
    consumers: dict
    tensors: dict  # name → TensorProto of initializers and Constant nodes, read only when asked for

    @classmethod
    def of(cls, graph) -> _Graph:
        producer = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        tensors = {init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                tensors[node.output[0]] = node.attribute[0].t
        return cls(producer, consumers, tensors)

    def constant(self, name: str) -> np.ndarray | None:
        """A small constant's value, flattened (shapes and scales); None for anything else."""
        from onnx import TensorProto, numpy_helper

        tensor = self.tensors.get(name)
        if tensor is None or tensor.data_location == TensorProto.EXTERNAL or np.prod(tensor.dims) > 16:
            return None
        return numpy_helper.to_array(tensor).reshape(-1)

    def node(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str):
        """The one node reading `name`, or None when several (a Shape too) or none do."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 else None

    def sole_use(self, name: str) -> bool:
        """Read by one node only, besides Shape nodes (the exporter takes head_dim for the scale from q's shape)."""
        return sum(node.op_type != "Shape" for node in self.consumers.get(name, [])) == 1


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _heads_of_reshape(g: _Graph, reshape) -> tuple[str, int] | None:
    """(the rank-3 input, heads) of a Reshape (B, S, C) → (B, S, heads, head_dim) whose heads is a constant."""
    shape = g.constant(reshape.input[1])
    if shape is not None:
        return (reshape.input[0], int(shape[2])) if shape.size == 4 and shape[2] > 0 else None
    concat = g.node(reshape.input[1], "Concat")
    heads = g.constant(concat.input[2]) if concat is not None and len(concat.input) == 4 else None
    return (reshape.input[0], int(heads[0])) if heads is not None and heads.size == 1 and heads[0] > 0 else None


def _split_heads(g: _Graph, name: str, perm: list[int]) -> tuple[str, int] | None:
    """`name` = Transpose(perm)(Reshape(x → B, S, heads, head_dim)): returns (x, heads)."""
    transpose = g.node(name, "Transpose")
    if transpose is None or list(_attr(transpose, "perm", [])) != perm or not g.sole_use(name):
        return None
    reshape = g.node(transpose.input[0], "Reshape")
    if reshape is None or not g.sole_use(reshape.output[0]):
        return None
    return _heads_of_reshape(g, reshape)


def _key_heads(g: _Graph, name: str) -> tuple[str, int] | None:
    """kᵀ per head, (B, heads, head_dim, S): one Transpose (0, 2, 3, 1), or (0, 2, 1, 3) then (0, 1, 3, 2)."""
    direct = _split_heads(g, name, [0, 2, 3, 1])
    if direct is not None:
        return direct
    swap = g.node(name, "Transpose")
    if swap is None or list(_attr(swap, "perm", [])) != [0, 1, 3, 2] or not g.sole_use(name):
        return None
    return _split_heads(g, swap.input[0], [0, 2, 1, 3])


def _default_scale_root(g: _Graph, name: str) -> str | None:
    """The exporter's √(1/√head_dim) factor, Sqrt(Cast?(Div(1, Sqrt(…)))): returns the Div's output, shared by
    the q and k factors when both come from one computation."""
    sqrt = g.node(name, "Sqrt")
    if sqrt is None:
        return None
    inner = sqrt.input[0]
    cast = g.node(inner, "Cast")
    div = g.node(cast.input[0] if cast is not None else inner, "Div")
    numerator = g.constant(div.input[0]) if div is not None else None
    if numerator is None or numerator.size != 1 or float(numerator[0]) != 1.0:
        return None
    if g.node(div.input[1], "Sqrt") is None:
        return None
    return inner


def _unscale(g: _Graph, name: str) -> tuple[str, float | str | None]:
    """Strip a scalar Mul from `name`: (the input, the factor — a float, a dynamic tensor's name, or None)."""
    mul = g.node(name, "Mul")
    if mul is None or not g.sole_use(name):
        return name, None
    for a, b in ((0, 1), (1, 0)):
        factor = mul.input[b]
        value = g.constant(factor)
        if value is not None and value.size == 1:
            return mul.input[a], float(value[0])
        root = _default_scale_root(g, factor)
        if root is not None:
            return mul.input[a], root
    return name, None


def _match(g: _Graph, softmax):
    """The MultiHeadAttention node replacing the attention around `softmax`, and the output it takes over."""
    from onnx import helper

    axis = _attr(softmax, "axis", -1)
    if axis not in (-1, 3):
        return None
    # the chain after the scores: each output read by the next node alone, else it is needed as it is
    probs_mm = g.only_consumer(softmax.output[0])
    if probs_mm is None or probs_mm.op_type != "MatMul" or probs_mm.input[0] != softmax.output[0]:
        return None
    merge_t = g.only_consumer(probs_mm.output[0])
    if merge_t is None or merge_t.op_type != "Transpose" or list(_attr(merge_t, "perm", [])) != [0, 2, 1, 3]:
        return None
    merge_r = g.only_consumer(merge_t.output[0])
    if merge_r is None or merge_r.op_type != "Reshape":
        return None

    logits, post = _unscale(g, softmax.input[0])  # a scale applied to the scores (older exports)
    scores = g.node(logits, "MatMul")
    if scores is None or not g.sole_use(logits):
        return None
    q_scaled, q_factor = _unscale(g, scores.input[0])
    k_scaled, k_factor = _unscale(g, scores.input[1])
    q = _split_heads(g, q_scaled, [0, 2, 1, 3])
    k = _key_heads(g, k_scaled)
    v = _split_heads(g, probs_mm.input[1], [0, 2, 1, 3])
    if q is None or k is None or v is None or not q[1] == k[1] == v[1]:
        return None

    factors = [f for f in (q_factor, k_factor, post) if f is not None]
    dynamic = [f for f in factors if isinstance(f, str)]
    scale: float | None = math.prod(f for f in factors if isinstance(f, float))  # 1.0 when unscaled
    if dynamic:
        # √(1/√d) on q and on k, from one computation: together the default scale 1/√d, MHA's own default.
        if len(dynamic) != 2 or dynamic[0] != dynamic[1] or q_factor != k_factor or scale != 1.0:
            return None
        scale = None
    attrs = {"num_heads": q[1]} | ({} if scale is None else {"scale": float(scale)})
    name = f"{softmax.name or softmax.output[0]}/fused_mha"
    return helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [merge_r.output[0]], name=name,
                            domain=MS_DOMAIN, **attrs), merge_r


def _prune(graph) -> None:
    """Drop the nodes, initializers and value_info no graph output depends on any more."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in ([a.g] if a.HasField("g") else list(a.graphs)):
                    needed.update(i for n in sub.node for i in n.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def fuse_attention(model) -> int:
    """Rewrite every matching attention of `model` (a ModelProto, in place); returns how many were fused."""
    from onnx import helper

    graph = model.graph
    g = _Graph.of(graph)
    fused = []
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        found = _match(g, softmax)
        if found is not None:
            fused.append(found)
    if not fused:
        return 0
    replaced = {id(old): new for new, old in fused}  # each fused node takes its output Reshape's place
    nodes = [replaced.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(graph)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(fused)


def fused_model(path: Path) -> tuple[bytes | str, int]:
    """What to open for `path`: the fused model (serialised) and the count, or `path` itself and 0 when nothing
    matched. A model whose weights live in external data files is fused into `<name>.fused.onnx` beside it (the
    weights are not copied), rebuilt when the source is newer; where that folder is read-only it is not fused."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return str(path), 0  # ONNX Runtime's CPU MultiHeadAttention is float32 only
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    count = fuse_attention(model)
    if count == 0:
        return str(path), 0
    if not external:
        return model.SerializeToString(), count
    target = path.with_name(path.stem + ".fused.onnx")
    if target.exists() and target.stat().st_mtime >= path.stat().st_mtime:
        return str(target), count
    partial = target.with_name(target.name + ".partial")
    try:  # the graph alone: its initializers still name the weight files beside it, which are not copied
        partial.write_bytes(model.SerializeToString())
        partial.replace(target)
    except OSError:
        return str(path), 0
    return str(target), count
