"""ONNX file handling after tracing: the float16 fallback conversion and the final checked save."""

from __future__ import annotations

import heapq
from collections import defaultdict
from pathlib import Path

import onnx

from basinguard.export.errors import ExportError, first_line
from basinguard.files import umask_mode

_TWO_GIB = 2**31 - 2**26  # protobuf's 2 GiB limit, less a margin for the graph itself
EXTERNAL_DATA = "model.onnx_data"  # optimum's name for the weights of a model over 2 GiB


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order nodes topologically (Kahn), keeping the existing order where it is free to.

    onnxruntime's float16 converter appends its input Casts at the end of the node list; ONNX Runtime
    accepts that, onnx.checker (and other consumers such as TensorRT's parser) do not.
    """
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    users: dict[int, list[int]] = defaultdict(list)
    waiting = []
    for i, node in enumerate(nodes):
        deps = {producer[name] for name in node.input if name in producer}
        waiting.append(len(deps))
        for j in deps:
            users[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise ExportError(f"graph {graph.name!r} has a cycle; cannot order its nodes")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def convert_to_half(raw: Path, name: str, keep_float32: tuple[str, ...]) -> None:
    """Fallback when torch cannot run a module in float16 on this CPU: convert the float32 ONNX graph in place.

    Uses onnxruntime's own converter (ships with onnxruntime, works offline). Float inputs and outputs become
    float16 except `keep_float32` ones (the UNet timestep), as in a graph traced in float16 by torch.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(raw)), keep_io_types=list(keep_float32))
    except Exception as exc:  # the converter raises assorted errors on graphs it cannot handle
        raise ExportError(f"float16 conversion of {name} failed: {first_line(exc)}") from None
    sort_nodes(model.graph)
    onnx.save_model(model, str(raw))


def save_checked(raw: Path, final: Path) -> None:
    """Re-save a traced model as one file, or with one external weights file when over 2 GiB (SD's fp32 UNet;
    torch writes one file per tensor there), then run onnx.checker on it."""
    model = onnx.load(str(raw))
    large = sum(len(t.raw_data) for t in model.graph.initializer) > _TWO_GIB
    onnx.save_model(model, str(final), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA)
    if (final.parent / EXTERNAL_DATA).is_file():  # onnx makes it 0600 whatever the umask: no other account could
        (final.parent / EXTERNAL_DATA).chmod(umask_mode())  # serve the model
    try:
        onnx.checker.check_model(str(final))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{final} fails onnx.checker: {first_line(exc)}") from None
