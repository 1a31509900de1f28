import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.train.distributed import (
    InfiniteSampler,
    RankFailedError,
    all_gather_object,
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    derive_seed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    resolve_device,
    run_on_every_rank,
    shard,
)

SIZE = 32
SPEC = {"channels": [2, 4, 4, 8, 8], "dropout": 0.0}


def test_helpers_without_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device.type) == (0, 1, 0, "cpu")
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()
    barrier()
    assert all_reduce_mean(2.5) == 2.5
    t = torch.tensor([1.0, 2.0])
    out = all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    assert all_reduce_mean({"a": 1.0, "b": torch.tensor(3.0)}) == {"a": 1.0, "b": torch.tensor(3.0)}
    assert all_reduce_sum(4.0) == 4.0 and all_reduce_max({"x": 1}) == {"x": 1.0}
    assert all_gather_object({"k": 1}) == [{"k": 1}]
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_device("tpu")


def test_infinite_sampler_is_deterministic_and_shards_like_one_big_batch():
    n, seed = 7, 11
    single = InfiniteSampler(n, seed, rank=0, world_size=1, batch_size=4)
    stream = [i for _, i in zip(range(40), single)]
    # every pass over the data is a permutation, different passes differ
    for e in range(5):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]
    # two ranks with batch 2 see, per iteration, exactly the single process's batch of 4
    ranks = [InfiniteSampler(n, seed, rank=r, world_size=2, batch_size=2) for r in range(2)]
    streams = [[i for _, i in zip(range(20), s)] for s in ranks]
    for it in range(10):
        combined = streams[0][2 * it:2 * it + 2] + streams[1][2 * it:2 * it + 2]
        assert combined == stream[4 * it:4 * it + 4]
    # resume: starting at iteration k gives the tail of the uninterrupted stream
    resumed = InfiniteSampler(n, seed, rank=1, world_size=2, batch_size=2, start=3)
    assert [i for _, i in zip(range(8), resumed)] == streams[1][6:14]
    # set_epoch starts at the first iteration of that pass; the seed changes the order
    by_epoch = InfiniteSampler(n, seed, rank=0, world_size=1, batch_size=1)
    by_epoch.set_epoch(2)
    assert [i for _, i in zip(range(n), by_epoch)] == stream[2 * n:3 * n]
    other = InfiniteSampler(n, seed + 1, rank=0, world_size=1, batch_size=4)
    assert [i for _, i in zip(range(40), other)] != stream
    ordered = InfiniteSampler(3, seed, shuffle=False, rank=0, world_size=1)
    assert [i for _, i in zip(range(7), ordered)] == [0, 1, 2, 0, 1, 2, 0]
    positions = [p for p, _ in zip(ranks[1].positions(), range(4))]
    assert [p for p, _ in positions] == [2, 3, 6, 7]


def test_derive_seed_is_stable_and_spread():
    assert derive_seed(0, "labeled") == derive_seed(0, "labeled")
    seeds = {derive_seed(0, "labeled"), derive_seed(0, "unlabeled"), derive_seed(1, "labeled"), derive_seed(0, 0)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


def _data():
    g = torch.Generator().manual_seed(5)
    x_l = torch.randn(2, 1, SIZE, SIZE, SIZE, generator=g)
    labels = torch.randint(0, 14, (2, SIZE, SIZE, SIZE), generator=g)
    x_u = torch.randn(2, 1, SIZE, SIZE, SIZE, generator=g)
    return x_l, labels, x_u


def _make_pair():
    from common.networks import build_network

    torch.manual_seed(1)
    net_a = build_network("unet", **SPEC)
    torch.manual_seed(2)
    net_b = build_network("unet", **SPEC)
    # Plain SGD: the comparison is about the DDP gradient average; Adam's first step lr * g / (|g| + eps) would
    # amplify rounding noise on weights whose gradient is ~0 (1x1 convs followed by InstanceNorm).
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in (net_a, net_b)]
    return net_a, net_b, opts


def _step(net_a, net_b, opts, x_l, labels, x_u):
    from common.core.labelmaps import one_hot_organs
    from common.train.cps import CPSSettings, Learner, Pair, cps_step
    from common.train.losses import build_loss

    return cps_step(Pair(Learner(net_a, opts[0]), Learner(net_b, opts[1])), x_l, one_hot_organs(labels, 13), x_u,
                    CPSSettings(build_loss("dice_focal"), weight=1.0))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = init_distributed("cpu")  # a group already exists: reports it
        assert (info.rank, info.world_size) == (rank, world)
        net_a, net_b, opts = _make_pair()
        ddp = [torch.nn.parallel.DistributedDataParallel(n) for n in (net_a, net_b)]
        x_l, labels, x_u = _data()
        sl = slice(rank, rank + 1)
        losses = _step(ddp[0], ddp[1], opts, x_l[sl], labels[sl], x_u[sl])
        losses = all_reduce_mean(losses)
        reduced = {
            "mean_float": all_reduce_mean(float(rank)),
            "sum_tensor": all_reduce_sum(torch.tensor([rank, 1.0])),
            "max": all_reduce_max({"flag": float(rank == 1)}),
            "gathered": all_gather_object(rank * 10),
        }
        barrier()
        if rank == 0:
            grads = {name: {k: p.grad for k, p in net.named_parameters()} for name, net in (("a", net_a), ("b", net_b))}
            torch.save({"a": net_a.state_dict(), "b": net_b.state_dict(), "grads": grads, "losses": losses,
                        "reduced": reduced},
                       os.path.join(out_dir, "ddp.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_cps_step_matches_single_process_on_combined_batch(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["reduced"]["mean_float"] == 0.5
    assert ddp["reduced"]["sum_tensor"].tolist() == [1.0, 2.0]
    assert ddp["reduced"]["max"] == {"flag": 1.0}
    assert ddp["reduced"]["gathered"] == [0, 10]

    net_a, net_b, opts = _make_pair()
    x_l, labels, x_u = _data()
    # single process, combined batch 2 labeled + 2 unlabeled (rank order: rank 0's sample first)
    losses = _step(net_a, net_b, opts, x_l, labels, x_u)
    for key, value in losses.items():
        assert ddp["losses"][key] == pytest.approx(value, rel=1e-4), key
    for name, net in (("a", net_a), ("b", net_b)):
        # DDP averages the gradients over ranks: equal to the gradient of the combined batch
        grads = {k: p.grad for k, p in net.named_parameters()}
        assert set(ddp["grads"][name]) == set(grads)
        scale = max(float(g.abs().max()) for g in grads.values())
        for key, g in grads.items():
            np.testing.assert_allclose(ddp["grads"][name][key].numpy(), g.numpy(), rtol=1e-3, atol=1e-5 * scale,
                                       err_msg=f"grad {name}.{key}")
        ref = net.state_dict()
        assert set(ddp[name]) == set(ref)
        for key, value in ddp[name].items():
            np.testing.assert_allclose(value.numpy(), ref[key].numpy(), atol=1e-5 * scale, rtol=1e-4,
                                       err_msg=f"{name}.{key}")


def test_shard_splits_items_round_robin():
    items = [f"case{i}" for i in range(7)]
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert parts == [["case0", "case3", "case6"], ["case1", "case4"], ["case2", "case5"]]
    assert shard(items) == items  # no process group: everything


def _failing_step_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from common.core.errors import InputError

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert run_on_every_rank(lambda: rank * 2, "ok step") == [0, 2]

        def step():
            if rank == 1:
                raise InputError("/data/case7.nii.gz", "truncated file")
            return "done"

        try:
            run_on_every_rank(step, "boxes")
            outcome = "no error"
        except RankFailedError as exc:
            outcome = f"RankFailedError: {exc}"
        except InputError as exc:
            outcome = f"InputError: {exc}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        torch.distributed.destroy_process_group()


def test_an_error_on_one_rank_ends_every_rank_with_its_message(tmp_path):
    mp.start_processes(_failing_step_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    rank0 = (tmp_path / "rank0.txt").read_text()
    rank1 = (tmp_path / "rank1.txt").read_text()
    assert rank1.startswith("InputError:") and "case7.nii.gz" in rank1  # the failing rank keeps its own error
    assert rank0.startswith("RankFailedError: boxes failed on rank 1: InputError:")
    assert "case7.nii.gz" in rank0 and "truncated file" in rank0
