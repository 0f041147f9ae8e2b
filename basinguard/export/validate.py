"""Checks of an exported ONNX model: its declared inputs/outputs, and ONNX Runtime CPU against torch.

Validation runs at a reduced latent size (VALIDATION_SIDE): the UNet is traced at the model's native size (the VAE
decoder at graphs.VAE_TRACE_SIDE), and validation on other batch sizes and (smaller, non-square) latents is what
shows the graph generalises. At the native
size it would cost what a full-size generation does with unfused attention: for SD 2.1-768-v (96x104 latents,
batch 3, 5 heads) one attention score tensor is 3*5*9984^2 floats = 6 GB, twice over with its softmax, which is
what took the export past 24 GB. torch's outputs are computed first (`expected_outputs`), so the exporter can
free the torch module before ONNX Runtime loads the exported copy of its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


# The larger latent side validation runs at (the cases' other side and batch keep their offsets). 32 is a multiple
# of every UNet's size multiple (8 for SD 1.x/2.x, 4 for SDXL) and still takes each down-sampling level.
VALIDATION_SIDE = 32


def reduced_case(spec: GraphSpec, case: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`case` with its spatial axes (the dynamic axes after batch and channels) shortened by the same amount as the
    traced example's native side is above VALIDATION_SIDE, so (h, w + m) at native (h, w) becomes (32, 32 + m):
    still off the traced size and non-square, at a ninth of the attention memory or less."""
    reduced = {}
    for name, value in case.items():
        for axis in spec.dynamic_axes.get(name, {}):
            native = spec.example[name].shape[axis] if axis >= 2 else 0
            if native > VALIDATION_SIDE:
                value = value.narrow(axis, 0, value.shape[axis] - (native - VALIDATION_SIDE)).contiguous()
        reduced[name] = value
    return reduced


@dataclass
class Expected:
    """What validation compares against: the validation inputs (reduced) and the float32 torch module's outputs."""

    name: str
    outputs: tuple[str, ...]
    cases: list[tuple[dict[str, np.ndarray], list[np.ndarray], str]]  # (ONNX feed, torch outputs, description)


def expected_outputs(spec: GraphSpec, half: bool) -> Expected:
    """Run the torch module on each validation case (at the reduced size); the module is not needed afterwards."""
    cases = []
    for case in spec.cases:
        inputs = reduced_case(spec, case)
        with torch.no_grad():
            ref = spec.module(**inputs)
        outs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        feed = {k: v.numpy() for k, v in (half_inputs(spec, inputs) if half else inputs).items()}
        cases.append((feed, outs, _describe(inputs)))
    return Expected(spec.name, spec.outputs, cases)


def _check_case(expected: Expected, session: ort.InferenceSession, feed: dict[str, np.ndarray],
                ref: list[np.ndarray], described: str, atol: float) -> dict:
    got = session.run(list(expected.outputs), feed)
    result = {"inputs": described, "max_abs_diff": {}, "tolerance": {}}
    for name, g, r in zip(expected.outputs, got, ref, strict=True):
        diff = _max_diff(g, r)
        bound = atol * max(1.0, float(np.abs(r).max()))
        result["max_abs_diff"][name], result["tolerance"][name] = diff, bound
        if not diff <= bound:
            raise ExportError(f"{expected.name} validation failed: output {name!r} for {described} differs from "
                              f"torch by {diff:.3g} > tolerance {bound:.3g} (atol {atol:g} x max(1, max |torch|))")
    return result


def validate_graph(spec: GraphSpec | Expected, path: Path, half: bool, atol: float,
                   log: Callable[[str], object]) -> dict:
    """Run each validation case (at the reduced size) through ONNX Runtime CPU and compare with the float32 torch
    module's outputs (`spec`'s module, or computed before by `expected_outputs`); raise on a large gap.

    A float16 graph that ONNX Runtime's CPU provider cannot load or run is reported and skipped, not failed.
    """
    try:
        session = _session(path)
        expected = spec if isinstance(spec, Expected) else None
        if expected is None:  # computed after the session opens: a graph ORT cannot open never runs torch
            expected = expected_outputs(spec, half)
        results = [_check_case(expected, session, *case, atol) for case in expected.cases]
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
