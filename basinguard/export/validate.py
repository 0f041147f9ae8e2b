"""Checks of an exported ONNX model: its declared inputs/outputs, and ONNX Runtime CPU against torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from basinguard.export.errors import ExportError, first_line
from basinguard.export.graphs import GraphSpec, half_inputs


def graph_io(path: Path) -> dict[str, list[dict]]:
    """Names, dtypes and shapes (ints, or names for dynamic axes) as the ONNX file declares them."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": dims}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # as many threads as the caller lets torch use
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _max_diff(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return float("inf")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")  # NaN/inf never pass


def _describe(inputs: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())


def _check_case(spec: GraphSpec, session: ort.InferenceSession, inputs: dict[str, torch.Tensor], half: bool,
                atol: float) -> dict:
    with torch.no_grad():
        ref = spec.module(**inputs)
    ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    feed = {k: v.numpy() for k, v in (half_inputs(spec, inputs) if half else inputs).items()}
    got = session.run(list(spec.outputs), feed)
    result = {"inputs": _describe(inputs), "max_abs_diff": {}, "tolerance": {}}
    for name, g, r in zip(spec.outputs, got, ref, strict=True):
        diff = _max_diff(g, r)
        bound = atol * max(1.0, float(np.abs(r).max()))
        result["max_abs_diff"][name], result["tolerance"][name] = diff, bound
        if not diff <= bound:
            raise ExportError(f"{spec.name} validation failed: output {name!r} for {result['inputs']} differs from "
                              f"torch by {diff:.3g} > tolerance {bound:.3g} (atol {atol:g} x max(1, max |torch|))")
    return result


def validate_graph(spec: GraphSpec, path: Path, half: bool, atol: float, log: Callable[[str], object]) -> dict:
    """Run each validation case through ONNX Runtime CPU and the float32 torch module; raise on a large gap.

    A float16 graph that ONNX Runtime's CPU provider cannot load or run is reported and skipped, not failed.
    """
    try:
        session = _session(path)
        results = [_check_case(spec, session, case, half, atol) for case in spec.cases]
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (NOT_IMPLEMENTED, Fail, ...)
        if half:
            reason = f"ONNX Runtime CPU cannot run the float16 graph: {first_line(exc)}"
            log(f"  {spec.name}: validation skipped ({reason})")
            return {"skipped": reason}
        raise ExportError(f"{spec.name}: ONNX Runtime cannot run the exported model: {first_line(exc)}") from None
    worst = max(d for r in results for d in r["max_abs_diff"].values())
    for r in results:
        log(f"  {spec.name}: {r['inputs']}: max |onnx - torch| = "
            + ", ".join(f"{k} {v:.2e}" for k, v in r["max_abs_diff"].items()))
    return {"max_abs_diff": worst, "atol": atol, "cases": results}
