"""Sharded gradients (FSDP2, tensor parallel, 2-D meshes; gloo, CPU processes).

Each setup trains the same model on the same global batch as a single-process
run; every rank's record must hold the single-process per-layer norms, global
norm and findings, and gradmedic's clipping must equal torch's on the same
DTensors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradmedic
import ranks
from gradmedic.diagnose import diagnose_rows
from gradmedic.history import load_history

STEPS = 2
BATCH = 16
REL = 1e-5
CLIP = 0.05  # below every step's gradient norm: each step is clipped


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 1)
    )


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 1, generator=g)


def _reference(clip: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, float]], float]:
    """Single process, full batch: gradmedic's rows, autograd's layer norms per step, and
    the global norm of one more backward on the last batch after training."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    with gradmedic.watch(model, opt) as mon:
        for step in range(STEPS):
            x, y = _data(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            want.append(
                {
                    name: math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model[i].parameters()))
                    for name, i in (("0", 0), ("2", 2), ("4", 4))
                }
            )
            if clip:
                gradmedic.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    return mon.history.rows(), want, after


# ---------------------------------------------------------------- workers


def _tp_plan() -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # layer 4 stays a plain module: replicated parameters, plain tensors
    return {"0": ColwiseParallel(), "2": RowwiseParallel()}


def _build(setup: str, rank: int, world: int) -> tuple[nn.Module, int, int]:
    """The parallel model, this rank's data-parallel index and the data-parallel size."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    model = _model()
    if setup in ("fsdp2", "fsdp2_clip"):
        mesh = init_device_mesh("cpu", (world,))
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, rank, world
    if setup == "tp":
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, _tp_plan())
        return model, 0, 1
    if setup == "fsdp2_tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], _tp_plan())
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        return model, mesh["dp"].get_local_rank(), 2
    if setup == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        cpu = torch.device("cpu")
        return FullyShardedDataParallel(model, use_orig_params=True, device_id=cpu), rank, world
    raise ValueError(setup)


def _worker(rank: int, world: int, port: int, setup: str, out: str) -> None:
    ranks.init(rank, world, port)
    model, dp_rank, dp_size = _build(setup, rank, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = os.path.join(out, "rank{rank}.jsonl")
    with gradmedic.watch(model, opt, sink=sink) as mon:
        for step in range(STEPS):
            if rank == 0:  # one rank reads alone mid-run: the reduction was issued by all
                mon.grad_norms()
            x, y = _data(step)
            xs, ys = x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]
            opt.zero_grad()
            nn.functional.mse_loss(model(xs), ys).backward()
            if setup.endswith("_clip"):  # gradmedic's clipping inside the monitored loop
                gradmedic.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
    if setup != "fsdp1":  # FSDP1 clips with its own model.clip_grad_norm_
        result = _clip_against_torch(model, x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank])
        Path(out, f"clip{rank}.json").write_text(json.dumps(result))
    ranks.finish()


def _clip_against_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """torch's and gradmedic's clip_grad_norm_ on the same DTensor gradients."""
    from torch.distributed.tensor import DTensor

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    saved = [p.grad.detach().clone() for p in params]
    # torch rejects a mix of DTensor and plain gradients; clip the DTensor ones with it
    dparams = [p for p in params if isinstance(p.grad, DTensor)]
    out: dict[str, Any] = {}
    for who, clip in (("torch", _torch_clip), ("gradmedic", None)):
        for p, g in zip(params, saved, strict=True):
            p.grad = g.clone()
        if clip is None:
            total = gradmedic.clip_grad_norm_(dparams, max_norm=0.05)
        else:
            total = _torch_clip(dparams, 0.05)
        out[who] = {
            "total": float(full(total)),
            "grads": [full(p.grad).reshape(-1).tolist() for p in dparams],
        }
    for p, g in zip(params, saved, strict=True):
        p.grad = g.clone()
    out["gradmedic_all"] = float(gradmedic.clip_grad_norm_(params, max_norm=1e9))
    out["autoclip"] = float(gradmedic.AutoClip()(params))
    return out


def _torch_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_; over several meshes (2-D mesh plus its submesh, which
    torch's own stacking of norms rejects) torchtitan's way: each mesh's
    get_total_norm made full, combined, then torch's clip_grads_with_norm_."""
    meshes: dict[int, list[torch.Tensor]] = {}
    for p in params:
        meshes.setdefault(id(p.grad.device_mesh), []).append(p)
    if len(meshes) == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    parts = [
        torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True).full_tensor()
        for group in meshes.values()
    ]
    total = torch.linalg.vector_norm(torch.stack(parts))
    for group in meshes.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total


def _run(setup: str, world: int, tmp: Path) -> list[list[dict[str, Any]]]:
    ranks.spawn(_worker, world, setup, str(tmp))
    return [load_history(tmp / f"rank{r}.jsonl")[1] for r in range(world)]


def _check(setup: str, world: int, tmp: Path) -> None:
    per_rank = _run(setup, world, tmp)
    clip = setup.endswith("_clip")
    ref_rows, autograd, after = _reference(clip)
    ref_findings = _findings(ref_rows)
    for rank, rows in enumerate(per_rank):
        assert len(rows) == STEPS, rank
        for row, ref, want in zip(rows, ref_rows, autograd, strict=True):
            for layer in ("0", "2", "4"):
                key = _key(row["grad_norm"], layer)
                norms = row["pre_clip_grad_norm"] if clip else row["grad_norm"]
                assert norms[key] == pytest.approx(want[layer], rel=REL), (rank, layer)
                got = row["grad_norm"][key]  # after clipping, when clipped
                assert got == pytest.approx(ref["grad_norm"][layer], rel=REL), (rank, layer)
                assert row["grad_max"][key] == pytest.approx(ref["grad_max"][layer], rel=REL)
                assert row["grad_nonfinite"][key] == 0
            # data parallel only: deltas and output maxima combined over the ranks
            for stat in ("delta_norm", "output_max") if setup in ("fsdp1", "fsdp2") else ():
                for layer, value in ref[stat].items():
                    got = row[stat][_key(row[stat], layer)]
                    assert got == pytest.approx(value, rel=REL), (rank, stat, layer)
            for stat in ("update_norm", "param_norm") if setup != "fsdp1" else ():
                for layer, value in ref[stat].items():
                    assert row[stat][layer] == pytest.approx(value, rel=REL), (rank, stat, layer)
            total = math.sqrt(sum(v * v for v in want.values()))
            if clip:
                assert row["clip"]["kind"] == ref["clip"]["kind"] == "norm"
                assert row["clip"]["clipped"] is ref["clip"]["clipped"] is True
                for k in ("pre_norm", "post_norm", "total_norm", "scale"):
                    assert row["clip"][k] == pytest.approx(ref["clip"][k], rel=REL), (rank, k)
                assert row["clip"]["pre_norm"] == pytest.approx(total, rel=REL)
                total = ref["global_grad_norm"]
            assert row["global_grad_norm"] == pytest.approx(total, rel=REL)
            for name, value in ref["param_grad_norm"].items():
                got = row["param_grad_norm"][_key(row["param_grad_norm"], name)]
                assert got == pytest.approx(value, rel=REL), (rank, name)
        assert _findings(rows) == ref_findings, rank
        if setup == "fsdp1":
            continue
        vs_torch = json.loads((tmp / f"clip{rank}.json").read_text())
        assert vs_torch["gradmedic"]["total"] == pytest.approx(vs_torch["torch"]["total"], rel=1e-6)
        for a, b in zip(vs_torch["gradmedic"]["grads"], vs_torch["torch"]["grads"], strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
        # every gradient, plain ones included: the unsharded model's norm on this batch
        assert vs_torch["gradmedic_all"] == pytest.approx(after, rel=REL)
        assert vs_torch["autoclip"] == pytest.approx(after, rel=REL)


def _key(values: dict[str, Any], name: str) -> str:
    """The sharded run's name for a layer or parameter (FSDP1 prefixes its wrapper's)."""
    return name if name in values else _PREFIX + name


_PREFIX = "_fsdp_wrapped_module."


def _findings(rows: list[dict[str, Any]]) -> list[tuple[str, str, tuple[str, ...]]]:
    layers = list(rows[0]["grad_norm"])
    diag = diagnose_rows(rows, None, layers=layers, context={})
    return sorted(
        (f.problem.value, f.severity.value, tuple(n.removeprefix(_PREFIX) for n in f.layers))
        for f in diag.findings
    )


# ---------------------------------------------------------------- tests


def test_fsdp2_two_ranks_record_the_unsharded_norms(tmp_path: Path) -> None:
    _check("fsdp2", 2, tmp_path)


@pytest.mark.slow
def test_tensor_parallel_colwise_rowwise_and_replicated(tmp_path: Path) -> None:
    _check("tp", 2, tmp_path)


@pytest.mark.slow
def test_fsdp2_with_tensor_parallel_on_a_2d_mesh(tmp_path: Path) -> None:
    _check("fsdp2_tp", 4, tmp_path)


@pytest.mark.slow
def test_fsdp1_use_orig_params_flat_shards(tmp_path: Path) -> None:
    _check("fsdp1", 2, tmp_path)


@pytest.mark.slow
def test_fsdp2_with_gradmedic_clipping_records_pre_and_post_clip_norms(tmp_path: Path) -> None:
    _check("fsdp2_clip", 2, tmp_path)
