"""Distributed FF (ffkernels.distributed) with real processes: gloo on 127.0.0.1, a free port, 2 or 3 ranks.

Every test starts its ranks (torch.multiprocessing, "forkserver"), bounds them by a wall-clock limit (a hang fails
the test and the processes are killed) and by the process group's timeout, and checks each rank's outcome.
The equivalence tests compare with single-process FFNet.ff_step on the same batches.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ffkernels import FFNet, NonFiniteLossError
from ffkernels.distributed import (DataParallelFF, PipelineFF, communication_per_step, micro_batch_sizes,
                                   partition_layers, shard)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WALL_LIMIT_S = 60   # per test: every rank must have finished by then

# Ranks are forked from one server process that imports torch and ffkernels once per session: starting a
# fresh interpreter per rank ("spawn") costs seconds each on a busy 2-core machine. Nothing in the server
# starts threads, so forking from it is safe. Also preloaded, as each costs seconds: torch.distributed.tensor
# (imported by torch.testing.assert_close in an initialized process group) and sklearn (the "digits" dataset).
mp.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor", "sklearn.datasets", "ffkernels",
                           "ffkernels.distributed", __name__])


# ---- harness ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def _entry(rank, world, ports, pg_timeout, init, fn, args, out_dir):
    """One rank: join the group (unless ``fn`` does), run ``fn(rank, world, *args)``, record the outcome."""
    _torchrun_env(rank, world, ports[0])
    torch.set_num_threads(1)
    result = {"ok": False}
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
        result = {"ok": True, "value": fn(rank, world, ports, *args)}
    except BaseException as e:  # recorded for the parent to check
        result = {"ok": False, "error": type(e).__name__, "message": str(e)}
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world, tmp_path, *args, pg_timeout=20, init=True, ports=1, expect_hang=()):
    """Run ``fn`` on ``world`` spawned ranks; returns each rank's {"ok", "value" | "error", "message"}.

    Ranks in ``expect_hang`` may still be running once the others are done; they are killed then.
    """
    ctx = mp.get_context("forkserver")
    out_dir = tmp_path / f"ranks-{fn.__name__}"
    out_dir.mkdir()
    port_list = [_free_port() for _ in range(ports)]
    procs = [ctx.Process(target=_entry, args=(r, world, port_list, pg_timeout, init, fn, args, str(out_dir)),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + WALL_LIMIT_S
    try:
        for r, p in enumerate(procs):
            if r not in expect_hang:
                p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive() and r not in expect_hang]
        assert not hung, f"ranks {hung} still running after {WALL_LIMIT_S} s: a hang"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results = []
    for r in range(world):
        path = out_dir / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else
                       {"ok": False, "error": "no result", "message": f"exit code {procs[r].exitcode}"})
    return results


def assert_all_ok(results):
    bad = {r: res for r, res in enumerate(results) if not res["ok"]}
    assert not bad, f"ranks failed: {bad}"


def make_batches(steps, in_features, dtype, seed=1, sizes=(8, 7, 2, 5, 6, 1)):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, in_features, generator=gen, dtype=dtype),
             torch.randn(b, in_features, generator=gen, dtype=dtype)) for b in sizes[:steps]]


def make_net(dims, dtype, seed=0, **kw):
    torch.manual_seed(seed)
    return FFNet(dims, dtype=dtype, **kw)


def assert_nets_close(a: FFNet, b: FFNet, exact: bool, rtol=1e-9, atol=1e-12):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            if exact:
                assert torch.equal(sa[k], sb[k]), k
            else:
                torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)
    assert [l.step_count for l in a.layers] == [l.step_count for l in b.layers]


# ---- pure helpers (no processes) -------------------------------------------------------------------------

def test_partition_layers_balances_cost_and_checks_input():
    dims = [784, 2000, 2000, 2000, 2000]
    assert partition_layers(dims, 2) == [range(0, 2), range(2, 4)]
    assert partition_layers(dims, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert partition_layers(dims, 1) == [range(0, 4)]
    assert partition_layers([10, 1000, 10, 10], 2) == [range(0, 1), range(1, 3)]
    assert partition_layers(dims, 2, balance=[1, 3]) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError, match="at least one layer per stage"):
        partition_layers(dims, 5)
    with pytest.raises(ValueError, match="balance must be 2 positive layer counts summing to 4"):
        partition_layers(dims, 2, balance=[2, 1])


def test_shard_and_micro_batch_sizes():
    x = torch.arange(7)
    assert [shard(x, r, 3).tolist() for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard(torch.arange(1), 1, 2).numel() == 0
    with pytest.raises(ValueError, match="rank must lie in"):
        shard(x, 3, 3)
    assert micro_batch_sizes(7, 3) == [3, 2, 2]
    assert micro_batch_sizes(2, 3) == [1, 1]
    assert micro_batch_sizes(5, 1) == [5]


def test_distributed_training_needs_torchrun_environment(monkeypatch):
    from ffkernels import train_cli
    from ffkernels.distributed import init_from_env

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="needs the environment variable RANK, which torchrun sets"):
        init_from_env()
    with pytest.raises(SystemExit, match="start one process per rank with torchrun"):
        train_cli.main(["--distributed", "pipeline"])
    with pytest.raises(SystemExit, match="--micro-batches only applies to --distributed pipeline"):
        train_cli.main(["--micro-batches", "2"])


def test_wrappers_need_a_process_group():
    net = make_net([6, 4], torch.float32)
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        DataParallelFF(net)
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        PipelineFF(net)


# ---- data-parallel ---------------------------------------------------------------------------------------

def _dp_matches_one_process(rank, world, ports, loss, optimizer):
    """Shards of each batch on the ranks == FFNet.ff_step on the whole batch; then resume; then a non-finite step."""
    dims, dt = [12, 16, 9, 7], torch.float64
    kw = dict(loss=loss, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0, lr=1e-2,
              norm="none")  # no input normalization: a huge input row makes the goodness overflow (below)
    net = make_net(dims, dt, seed=0, **kw)
    ref = copy.deepcopy(net)
    dp = DataParallelFF(net)
    batches = make_batches(6, dims[0], dt)  # rows 8, 7, 2, 5, 6, 1: unequal shards, and empty ones on 3 ranks
    for step, (xp, xn) in enumerate(batches[:3]):
        out = dp.ff_step(shard(xp, rank, world), shard(xn, rank, world))
        torch.testing.assert_close(out.losses, ref.ff_step(xp, xn).losses, rtol=1e-10, atol=0)
    assert_nets_close(net, ref, exact=False)

    # resume: rank 0 loads the checkpoint into a differently initialized net; the wrapper copies it to all ranks
    fresh = make_net(dims, dt, seed=1 + rank, **kw)
    if rank == 0:
        fresh.load_state_dict(net.state_dict())
    dp = DataParallelFF(fresh)
    for xp, xn in batches[3:]:
        dp.ff_step(shard(xp, rank, world), shard(xn, rank, world), return_outputs=True)
        ref.ff_step(xp, xn)
    assert_nets_close(fresh, ref, exact=False)
    every = [None] * world
    dist.all_gather_object(every, {k: v for k, v in fresh.state_dict().items() if isinstance(v, torch.Tensor)})
    assert all(torch.equal(every[0][k], other[k]) for other in every for k in other), "ranks differ"

    # a non-finite loss on one rank's shard only: every rank raises and leaves everything unchanged
    before = copy.deepcopy(fresh.state_dict())
    xp, xn = batches[0]
    xn = shard(xn, rank, world).clone()
    if rank == world - 1:
        xn[0] = 1e200  # a finite negative whose goodness, hence loss, overflows to inf
    with pytest.raises(NonFiniteLossError, match="layer 0: .*on every rank"):
        dp.ff_step(shard(xp, rank, world), xn)
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
    assert [l.step_count for l in fresh.layers] == [6, 6, 6]


@pytest.mark.parametrize("world,loss,optimizer", [(2, "hinton", "adam"), (3, "symba", "sgd")])
def test_data_parallel_equals_one_process_resumes_and_fails_together(tmp_path, world, loss, optimizer):
    assert_all_ok(launch(_dp_matches_one_process, world, tmp_path, loss, optimizer))


def _dp_mismatched_nets(rank, world, ports):
    DataParallelFF(make_net([6, 5 + rank, 4], torch.float32))


def test_data_parallel_rejects_different_nets_on_every_rank(tmp_path):
    results = launch(_dp_mismatched_nets, 2, tmp_path)
    for res in results:
        assert res["error"] == "ValueError" and "rank 1's FFNet differs from rank 0's" in res["message"]


# ---- pipeline --------------------------------------------------------------------------------------------

def _pipeline_matches_sequential(rank, world, ports, micro_batches, dtype_name, ckpt):
    """Stages over the ranks == FFNet.ff_step step after step; resuming from a gathered checkpoint too."""
    dims, dt = [12, 16, 9, 7, 5], getattr(torch, dtype_name)
    net = make_net(dims, dt)
    ref = copy.deepcopy(net)
    batches = make_batches(6, dims[0], dt)
    pipe = PipelineFF(net, micro_batches=micro_batches)
    with pytest.raises(ValueError, match="stage 0 .* reads the data" if pipe.is_first else "only stage 0 reads"):
        pipe.run(None if pipe.is_first else batches)
    exact = micro_batches == 1  # one micro-batch: the same kernels on the same inputs, bit for bit

    def check(losses, steps):
        every = [None] * world
        dist.all_gather_object(every, losses)
        if rank == 0:
            got = torch.cat(every, dim=1)
            want = torch.stack([ref.ff_step(xp, xn).losses for xp, xn in steps])
            assert got.shape == want.shape
            assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-10, atol=0)

    check(pipe.run(batches[:2] if pipe.is_first else None), batches[:2])
    check(pipe.run(batches[2:3] if pipe.is_first else None), batches[2:3])  # a second run (epoch) goes on
    pipe.gather_net(0)
    if rank == 0:
        assert_nets_close(net, ref, exact)
        torch.save(net.state_dict(), ckpt)
    dist.barrier()

    # resume: only rank 0 loads the checkpoint; the other ranks start from other weights and get rank 0's
    fresh = make_net(dims, dt, seed=1 + rank)
    if rank == 0:
        fresh.load_state_dict(torch.load(ckpt))
    pipe = PipelineFF(fresh, micro_batches=micro_batches)
    check(pipe.run(batches[3:] if pipe.is_first else None), batches[3:])
    pipe.gather_net(0)
    if rank == 0:
        assert_nets_close(fresh, ref, exact)
        assert [l.step_count for l in fresh.layers] == [6] * 4


@pytest.mark.parametrize("world,micro_batches,dtype", [(2, 1, "float32"), (3, 3, "float64")])
def test_pipeline_equals_sequential_sweep_and_resumes(tmp_path, world, micro_batches, dtype):
    results = launch(_pipeline_matches_sequential, world, tmp_path, micro_batches, dtype, str(tmp_path / "ckpt.pt"))
    assert_all_ok(results)


# ---- failures --------------------------------------------------------------------------------------------

def _outcome(fn, net):
    """Run ``fn``; report the exception it raised and which layers of ``net`` changed meanwhile."""
    before = copy.deepcopy(net.state_dict())
    try:
        fn()
        error = message = None
    except Exception as e:
        error, message = type(e).__name__, str(e)
    after = net.state_dict()
    changed = sorted({int(k.split(".")[1]) for k, v in before.items()
                      if isinstance(v, torch.Tensor) and not torch.equal(v, after[k])})
    return {"error": error, "message": message, "changed": changed, "steps": [l.step_count for l in net.layers]}


def _pipeline_nonfinite_in_middle_stage(rank, world, ports):
    """Stages [0], [1, 2], [3]; layer 2's loss overflows at the second step."""
    net = make_net([12, 16, 9, 7, 5], torch.float32)
    pipe = PipelineFF(net, balance=[1, 2, 1])
    batches = make_batches(3, 12, torch.float32)
    pipe.run(batches[:1] if pipe.is_first else None)
    if rank == 1:
        with torch.no_grad():
            net.layers[2].weight.mul_(1e30)  # finite weights whose goodness overflows to inf
    return _outcome(lambda: pipe.run(batches[1:] if pipe.is_first else None), net)


def test_pipeline_nonfinite_loss_stops_its_stage_and_later_ones(tmp_path):
    results = launch(_pipeline_nonfinite_in_middle_stage, 3, tmp_path)
    assert_all_ok(results)
    first, middle, last = (r["value"] for r in results)
    # the failing stage: layer 1 took the step, layer 2 did not (as FFNet.ff_step)
    assert middle["error"] == "NonFiniteLossError" and "layer 2: " in middle["message"], middle
    assert middle["changed"] == [1] and middle["steps"][1:3] == [2, 1]
    # the later stage is told and skips the step
    assert last["error"] == "NonFiniteLossError" and "layer 2 (stage 1) had a non-finite loss" in last["message"]
    assert last["changed"] == [] and last["steps"][3] == 1
    # the earlier stage is never told (nothing flows backwards): it loses its peer and says so
    assert first["error"] == "DistributedFFError" and "rank 0 failed while sending" in first["message"], first


def _dp_rank_raises(rank, world, ports):
    dp = DataParallelFF(make_net([12, 16, 9], torch.float32))
    for step, (xp, xn) in enumerate(make_batches(4, 12, torch.float32)):
        if rank == 1 and step == 2:
            raise RuntimeError("injected failure on rank 1")
        dp.ff_step(shard(xp, rank, world), shard(xn, rank, world))


def _pipeline_rank_raises(rank, world, ports):
    net = make_net([12, 16, 9, 7], torch.float32)
    pipe = PipelineFF(net)
    if rank == 1:
        grad, calls = net.layers[1].ff_grad, []

        def failing_grad(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure on rank 1")
            return grad(*args)

        net.layers[1].ff_grad = failing_grad
    pipe.run(make_batches(5, 12, torch.float32) if pipe.is_first else None)


@pytest.mark.parametrize("scenario", [_dp_rank_raises, _pipeline_rank_raises])
def test_a_failing_rank_stops_the_others_with_a_clear_error(tmp_path, scenario):
    results = launch(scenario, 3, tmp_path, pg_timeout=30)  # a lost peer is noticed at once, not at the timeout
    assert results[1]["error"] == "RuntimeError" and "injected failure" in results[1]["message"]
    for r in (0, 2):
        assert results[r]["error"] == "DistributedFFError", results[r]
        assert f"rank {r} failed while" in results[r]["message"] and "another rank probably failed" in \
            results[r]["message"]


def _dp_rank_hangs(rank, world, ports):
    dp = DataParallelFF(make_net([12, 16, 9], torch.float32))
    for step, (xp, xn) in enumerate(make_batches(3, 12, torch.float32)):
        if rank == 1 and step == 1:
            time.sleep(WALL_LIMIT_S)  # stuck, alive: only the timeout can tell
        dp.ff_step(shard(xp, rank, world), shard(xn, rank, world))


def test_a_hanging_rank_fails_the_others_after_the_timeout(tmp_path):
    # rank 1 sleeps for the whole wall limit: had rank 0 waited for it, it would have finished without error.
    # (No wall-clock bound is asserted beyond launch()'s hang limit: on a busy machine that would be flaky.)
    results = launch(_dp_rank_hangs, 2, tmp_path, pg_timeout=3, expect_hang=(1,))
    assert results[0]["error"] == "DistributedFFError" and "timed out" in results[0]["message"].lower(), results[0]


# ---- the train command -----------------------------------------------------------------------------------

# plain FF, the recipe's parts explicitly off: what both distributed modes can train (the defaults turn them on in
# one process and off under --distributed, where they are not supported)
CLI_COMMON = ["--dataset", "digits", "--hidden", "24", "24", "24", "--batch-size", "50", "--epochs", "1",
              "--threads", "1", "--no-progress", "--no-head", "--lr-schedule", "constant", "--negatives", "random",
              "--jitter", "0", "--peer-norm", "0"]


def _cli_train_then_resume(rank, world, ports, mode, out_dir, extra):
    """``ffkernels train --distributed MODE`` (one epoch, --save), then a second run resuming from it."""
    from ffkernels import train_cli

    argv = CLI_COMMON + ["--distributed", mode, "--dist-timeout", "30", *extra]
    os.environ["MASTER_PORT"] = str(ports[0])
    train_cli.main(argv + ["--save", f"{out_dir}/first.pt", "--json", f"{out_dir}/first.json"])
    os.environ["MASTER_PORT"] = str(ports[1])
    train_cli.main(argv + ["--resume", f"{out_dir}/first.pt", "--save", f"{out_dir}/second.pt"])


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The same two runs with single-process ``ffkernels train`` (one thread, as each rank; explicit pos/neg
    pairs in the first layer, as the distributed modes build them)."""
    from ffkernels import train_cli

    out = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    try:
        pair = CLI_COMMON + ["--first-layer", "pair"]
        train_cli.main(pair + ["--save", f"{out}/first.pt"])
        train_cli.main(pair + ["--resume", f"{out}/first.pt", "--save", f"{out}/second.pt"])
    finally:
        torch.set_num_threads(threads)
    return {k: torch.load(out / f"{k}.pt") for k in ("first", "second")}


@pytest.mark.parametrize("mode,extra,exact", [("data", [], False), ("pipeline", [], True),
                                              ("pipeline", ["--micro-batches", "3"], False)])
def test_train_command_distributed_checkpoints_resume_like_one_process(tmp_path, one_process_runs, mode, extra,
                                                                       exact):
    results = launch(_cli_train_then_resume, 2, tmp_path, mode, str(tmp_path), extra, init=False, ports=2)
    assert_all_ok(results)
    report = json.loads((tmp_path / "first.json").read_text())
    assert report["distributed"] == mode and report["world_size"] == 2 and len(report["epochs"]) == 1
    for name, want in one_process_runs.items():
        got = torch.load(tmp_path / f"{name}.pt")
        assert got.keys() == want.keys()
        for k, v in want.items():
            if k.endswith("_extra_state"):
                assert got[k]["step"] == v["step"] == (29 if name == "first" else 58), k
            elif exact:  # one micro-batch: the same kernels on the same batches, bit for bit
                assert torch.equal(got[k], v), (name, k)
            else:  # a sum of shard (micro-batch) gradients rounds differently; Adam amplifies tiny gradients
                torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-4, msg=f"{name} {k}")


def test_communication_per_step_from_shapes():
    dims = [784, 2000, 2000, 2000, 2000]
    grads = (784 * 2000 + 2000 + 2) + 3 * (2000 * 2000 + 2000 + 2)  # per layer: weight, bias, loss, rows
    assert communication_per_step(dims, 100, "data", 2)["per_rank"] == grads * 4  # ring: 2(w-1)/w = 1
    assert communication_per_step(dims, 100, "data", 4)["per_rank"] == grads * 4 * 3 // 2
    assert communication_per_step(dims, 100, "data", 1)["per_rank"] == 0
    pipe = communication_per_step(dims, 100, "pipeline", 3)  # stages [0, 1], [2], [3]: two cuts of width 2000
    assert pipe["per_rank"] == 2 * 100 * 2000 * 4 + 3 * 8 and pipe["total"] == 2 * pipe["per_rank"]
    with pytest.raises(ValueError, match="mode must be"):
        communication_per_step(dims, 100, "model", 2)


def _cli_resume_from(rank, world, ports, checkpoint):
    from ffkernels import train_cli

    train_cli.main(CLI_COMMON + ["--distributed", "data", "--resume", checkpoint])  # the 300 s default timeout


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_train_command_distributed_bad_checkpoint_stops_every_rank_with_one_line(tmp_path, content):
    """A checkpoint rank 0 cannot read (garbage; another net's state_dict) stops both ranks at once with rank 0's
    one-line reason (not rank 1 left waiting for the 300 s process-group timeout: launch calls that a hang)."""
    path = tmp_path / "bad.pt"
    if content is None:
        from ffkernels import FFNet
        torch.save(FFNet([64, 7]).state_dict(), path)  # digits has 64 features, but not these layers
    else:
        path.write_bytes(content)
    results = launch(_cli_resume_from, 2, tmp_path, str(path), init=False)
    for res in results:
        assert not res["ok"] and res["error"] == "SystemExit", res
        assert "checkpoint" in res["message"] and str(path) in res["message"] and "\n" not in res["message"], res
    want = "cannot read" if content is not None else "does not fit"
    assert want in results[0]["message"] and results[1]["message"] == results[0]["message"]
