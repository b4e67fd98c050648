"""EigenDamage: K-FAC statistics against hand formulas, selection, factorized layers, bring-back, checkpoints,
the counter and BN folding, and the multi-process statistics, on toy PyramidNets and hand-made nets."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from micronet.checkpoint import atomic_save, load_model, make_checkpoint, safe_load
from micronet.compression.eigendamage import (
    EMA, NOISE, BringBackPool, bring_back_step, collect_kfac, prunable_layers, prune_step, select_removals,
)
from micronet.compression.factorized import (
    FactorizedConv2d, FactorizedLinear, apply_factorization_plan, factorization_plan,
)
from micronet.compression.quantize import quantize_model
from micronet.errors import MicronetError
from micronet.nets import create_model
from micronet.scoring import count, foldable_batchnorms

ARGS = {"depth": 11, "alpha": 16, "num_classes": 10}


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("pyramidnet", **ARGS).eval()


def batches(n: int = 2, size: int = 8, shape=(3, 16, 16), classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def damped(A: torch.Tensor, G: torch.Tensor, lam: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    pi = (torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])
    return A + (lam * pi).sqrt() * torch.eye(A.shape[0]), G + (lam / pi).sqrt() * torch.eye(G.shape[0])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1.3e-6) -> None:
    """torch.testing.assert_close's float32 defaults, without its first-use import of torch.distributed.tensor
    (seconds on a busy machine)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max |diff| {(actual - expected).abs().max()}"


def layer_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- statistics against hand formulas ----------------------------------------------------------------------


def test_linear_factors_ema_and_corrected_eigenvalues_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    data = batches(2, 5, shape=(4,), classes=3)
    stats = collect_kfac(model, data, "cpu", fisher="empirical")
    f = stats.layers["0"]
    W, b = model[0].weight.detach(), model[0].bias.detach()

    def batch_factors(x, y):
        a = torch.cat([x, torch.ones(len(x), 1)], 1)  # the bias as a ones column
        delta = (x @ W.t() + b).softmax(1) - F.one_hot(y, 3).float()  # per-example dLoss/dlogits
        return a.t() @ a / len(x), delta.t() @ delta / len(x), a, delta

    A1, G1, a, delta = batch_factors(*data[0])
    A2, G2, _, _ = batch_factors(*data[1])
    assert_close(f.A, EMA * A1 + (1 - EMA) * A2)
    assert_close(f.G, EMA * G1 + (1 - EMA) * G2)
    A_d, G_d = damped(f.A, f.G)
    assert_close(A_d @ f.Q_A, f.Q_A * f.l_A, atol=1e-5, rtol=1e-4)
    assert_close(G_d @ f.Q_G, f.Q_G * f.l_G, atol=1e-5, rtol=1e-4)
    grads = delta[:, :, None] * a[:, None, :]  # example n's gradient of [W b]
    s = (f.Q_G.t() @ grads @ f.Q_A).square().mean(0)
    assert_close(f.s[:, :, 0], s)
    assert (stats.batches, stats.examples, stats.correction_examples) == (2, 10, 5)


def test_conv_factors_match_unfolded_patches_and_per_example_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    (x, y), = data = batches(1, 6, shape=(3, 8, 8), classes=5)
    stats = collect_kfac(model, data, "cpu", fisher="empirical")
    f = stats.layers["0"]

    patches = F.unfold(x, 3, padding=1, stride=2).reshape(6, 3, 9, 16)  # Wave: every tap of every patch
    assert_close(f.A, torch.einsum("nctl,ndtl->cd", patches, patches) / 6)
    out = conv(x)
    out.retain_grad()
    F.cross_entropy(model[2](model[1](out)), y).backward()
    g = out.grad.flatten(2)
    assert_close(f.G, torch.einsum("nol,npl->op", g, g) * 6 / 16)

    s = torch.zeros(4, 3, 9)
    for i in range(6):  # example i's own weight gradient, one backward each
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        w = conv.weight.grad.reshape(4, 3, 9)
        s += torch.einsum("oi,oct,cj->ijt", f.Q_G, w, f.Q_A).square() / 6
    assert_close(f.s, s, atol=1e-7, rtol=1e-4)
    assert stats.layers["2"].A.shape == (65, 65)  # the classifier's bias column


def test_true_fisher_draws_labels_from_the_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.0, 60.0, 0.0]))  # class 1 has all the probability
    data = batches(2, 5, shape=(4,), classes=3)
    true = collect_kfac(model, data, "cpu", fisher="true")
    ones = collect_kfac(model, [(x, torch.ones_like(y)) for x, y in data], "cpu", fisher="empirical")
    wrong = collect_kfac(model, data, "cpu", fisher="empirical")
    assert_close(true.layers["0"].G, ones.layers["0"].G)
    assert_close(true.layers["0"].s, ones.layers["0"].s)
    assert not torch.allclose(true.layers["0"].G, wrong.layers["0"].G)


@pytest.mark.parametrize("train_mode", [False, True])
def test_collection_leaves_bn_statistics_modes_and_grads_alone(train_mode):
    model = toy().train()
    model.layer2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    stats = collect_kfac(model, batches(), "cpu", train_mode=train_mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(f.s).all() and (f.s > 0).all() for f in stats.layers.values())


def test_every_conv_and_linear_is_a_layer_unless_excluded():
    model = toy()
    names = list(prunable_layers(model))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == convs and names[0] == "conv1" and names[-1] == "fc" and len(names) == 1 + 3 * 3 + 1
    assert "fc" not in prunable_layers(model, exclude=["fc"])
    with pytest.raises(MicronetError, match="exclude names no layer"):
        prunable_layers(model, exclude=["nope"])


def test_layers_whose_gradient_cannot_be_read_are_refused():
    data = batches(1, 2, shape=(3, 4, 4), classes=2)
    inplace = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(32, 2))
    with pytest.raises(MicronetError, match="'0' is modified in place"):
        collect_kfac(inplace, data, "cpu")
    shared = nn.Conv2d(3, 3, 1)
    twice = nn.Sequential(shared, shared, nn.Flatten(), nn.Linear(48, 2))
    with pytest.raises(MicronetError, match="runs more than once"):
        collect_kfac(twice, data, "cpu")
    collect_kfac(twice, data, "cpu", exclude=["0"])  # named by its first place in the model


# ---- selection ----------------------------------------------------------------------------------------------


def test_selection_is_global_with_a_water_filled_per_layer_cap():
    groups = [torch.tensor([5.0, 1.0, 3.0, 2.0]), torch.tensor([0.5, 4.0]), torch.tensor([10.0, 0.1, 0.2])]
    # 4 of 9 go; caps int(0.5 * size) = 2, 1, 1: 0.2 is blocked by its group's cap, so 2.0 goes instead
    capped = select_removals(groups, 0.5, 0.5)
    assert [m.tolist() for m in capped] == [[False, True, False, True], [True, False], [False, True, False]]
    free = select_removals(groups, 0.5, 0.99)  # caps 3, 1 (keeps one), 2
    assert [m.tolist() for m in free] == [[False, True, False, False], [True, False], [False, True, True]]
    assert not any(m.any() for m in select_removals(groups, 0.0, 0.5))
    with pytest.raises(MicronetError):
        select_removals(groups, 1.0, 0.5)


# ---- factorized layers ----------------------------------------------------------------------------------------


def assert_three_deep(model: nn.Module) -> None:
    for name in factorization_plan(model):
        layer = model.get_submodule(name)
        assert [type(m) for m in layer.children()] == [type(layer.core)] * 3
        assert list(dict(layer.named_children())) == ["input", "core", "output"]


def test_rotation_without_cuts_computes_the_same_function():
    model = toy()
    x = batches(1, 4)[0][0]
    expected = model(x)
    for _ in range(2):  # the second step composes its rotations with the first one's
        report = prune_step(model, collect_kfac(model, batches(), "cpu"), 0.0)
        assert report["entries_removed"] == 0
        assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
        assert_three_deep(model)
    assert set(factorization_plan(model)) == {n for n, m in toy().named_modules()
                                              if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert isinstance(model.conv1, FactorizedConv2d) and isinstance(model.fc, FactorizedLinear)


def test_prune_step_reaches_the_rate_under_the_layer_cap_and_keeps_eigen_directions():
    model = toy()
    stats = collect_kfac(model, batches(), "cpu")
    report = prune_step(model, stats, 0.3, max_layer_rate=0.5)
    assert abs(report["entry_rate"] - 0.3) <= 0.02
    assert report["entries_removed"] == int(0.3 * report["entries"])
    for name, r in report["layers"].items():
        for dim in ("out", "in"):
            full, kept = r[f"{dim}_rank_before"], r[f"{dim}_rank"]
            assert 1 <= kept and full - kept <= int(0.5 * full)
        layer = model.get_submodule(name)
        assert (layer.out_rank, layer.in_rank) == (r["out_rank"], r["in_rank"])
    # the classifier is P_G [W b] P_A with orthonormal kept eigenvectors of the damped factors
    old = toy().fc
    fc = model.fc
    f = stats.layers["fc"]
    rows_in = torch.cat([fc.input.weight, fc.input.bias[:, None]], 1).detach()  # kept eigenvectors of A
    out = fc.output.weight.detach()  # kept eigenvectors of G
    eye_in, eye_out = torch.eye(rows_in.shape[0]), torch.eye(out.shape[1])
    assert_close(rows_in @ rows_in.t(), eye_in, atol=1e-5, rtol=0)
    assert_close(out.t() @ out, eye_out, atol=1e-5, rtol=0)
    A_d, G_d = damped(f.A, f.G)
    assert_close(A_d @ rows_in.t(), rows_in.t() * (rows_in @ A_d @ rows_in.t()).diag(),
                               atol=1e-5, rtol=1e-3)
    effective = out @ fc.core.weight.detach() @ rows_in
    Wb = torch.cat([old.weight, old.bias[:, None]], 1).detach()
    assert_close(effective, out @ out.t() @ Wb @ rows_in.t() @ rows_in, atol=1e-5, rtol=1e-4)
    assert report["parameters_after"] == layer_params(model)


def test_steps_land_on_the_asked_rate_the_last_one_removing_only_the_gap(rate: float = 0.5):
    """Coarse steps (half of all eigen-directions each) with bring-back between them: each prune step aims at
    the rate, and the one that would pass it removes just enough to land on it (one direction's worth)."""
    model = toy()
    before = layer_params(model)
    most = int((1 - rate) * before)
    pool, rows = BringBackPool(), []
    for step in range(6):
        stats = collect_kfac(model, batches(1), "cpu")
        report = prune_step(model, stats, 0.5, 0.6, pool, max_parameters=most)
        rows.append((report["entry_rate"], 1 - report["parameters_after"] / before))
        assert report["parameters_after"] == layer_params(model)  # the size it searched on is the size it built
        if report["parameters_after"] <= most:
            break
        bring_back_step(model, pool, 0.25, torch.Generator().manual_seed(step))
    reached = 1 - layer_params(model) / before
    assert rate <= reached <= rate + 0.002, rows
    assert rows[-1][0] < 0.5 or len(rows) == 1  # the last step removed less than a whole step


# ---- bring-back --------------------------------------------------------------------------------------------


def factorized_params(layer: nn.Module) -> int:
    k = layer.core.weight[0, 0].numel()
    cin = layer.input.weight.shape[1]
    cout = layer.output.weight.shape[0]
    bias_in = layer.input.bias is not None
    bias_out = layer.output.bias is not None
    return (cin + bias_in) * layer.in_rank + layer.in_rank * layer.out_rank * k + (layer.out_rank + bias_out) * cout


def test_bring_back_grows_by_back_ratio_of_the_deleted_directions():
    model = toy()
    pool = BringBackPool()
    pruned = prune_step(model, collect_kfac(model, batches(), "cpu"), 0.3, 0.5, pool)
    assert pool.total_deleted() == pruned["entries_removed"]
    for name, r in pruned["layers"].items():
        assert pool.deleted_rows[name] == r["out_rank_before"] - r["out_rank"]
        assert pool.deleted_cols[name] == r["in_rank_before"] - r["in_rank"]
    assert sum(pool.row_score.values()) + sum(pool.col_score.values()) <= 1.0
    old = {n: model.get_submodule(n) for n in pruned["layers"]}
    state = pool.to_state()
    report = bring_back_step(model, pool, 0.25, torch.Generator().manual_seed(0))
    assert report["entries_added"] == report["entries_requested"] == int(0.25 * pruned["entries_removed"])
    growth = 0
    for name, r in report["layers"].items():
        new = model.get_submodule(name)
        assert (new.out_rank, new.in_rank) == (old[name].out_rank + r["rows_added"], old[name].in_rank + r["cols_added"])
        assert layer_params(new) == factorized_params(new)
        growth += factorized_params(new) - factorized_params(old[name])
    assert report["parameters_after"] - report["parameters_before"] == growth > 0
    assert_three_deep(model)
    assert pool.total_deleted() == 0 and bring_back_step(model, pool, 0.25)["entries_added"] == 0
    # the same pool state and seed draw the same allocation
    again = toy()
    prune_step(again, collect_kfac(again, batches(), "cpu"), 0.3, 0.5)
    restored = BringBackPool.from_state(state)
    replay = bring_back_step(again, restored, 0.25, torch.Generator().manual_seed(0))
    assert replay["layers"] == report["layers"]


def test_brought_back_rows_and_columns_are_perturbed_copies_of_the_last():
    torch.manual_seed(0)
    layer = FactorizedConv2d(6, 5, 5, 2, 3, padding=1, output_bias=True)
    model = nn.Sequential(layer)
    pool = BringBackPool()
    pool.record("0", 0.5, 0.5, rows=3, cols=1)
    # 4 draws; room for 5-2=3 rows and 6-5=1 column forces 3 rows and 1 column
    report = bring_back_step(model, pool, 1.0, torch.Generator().manual_seed(3))
    rows, cols = report["layers"]["0"]["rows_added"], report["layers"]["0"]["cols_added"]
    assert (rows, cols) == (3, 1)
    new = model[0]
    core, in_w, out_w = new.core.weight.detach(), new.input.weight.detach(), new.output.weight.detach()

    def assert_copies(new_part, last):
        u = (new_part - last) / (NOISE * last.abs())
        assert ((u >= 0) & (u < 1)).all()

    last_col = layer.core.weight.detach()[:, -1:]
    assert_copies(core[: layer.out_rank, layer.in_rank :], last_col)
    assert_copies(in_w[layer.in_rank :], layer.input.weight.detach()[-1:])
    assert_copies(out_w[:, layer.out_rank :], layer.output.weight.detach()[:, -1:])
    assert_copies(core[layer.out_rank :], core[layer.out_rank - 1 : layer.out_rank])
    assert not torch.equal(core[-1], core[-2])  # every copy has its own draw
    assert_close(new.output.bias, layer.output.bias)
    pool.record("1", 0.5, 0.5, rows=1, cols=1)
    with pytest.raises(MicronetError, match="not a factorized layer"):
        bring_back_step(model, pool, 1.0)


def test_allocation_respects_room_and_draws_again_elsewhere():
    pool = BringBackPool()
    pool.record("a", 1.0, 0.0, rows=10, cols=0)
    pool.record("b", 1e-9, 1e-9, rows=0, cols=2)
    added = pool.allocate(0.5, {"a": (1, 0), "b": (100, 100)}, torch.Generator().manual_seed(0))
    assert added["a"] == (1, 0) and sum(added["b"]) == 5
    assert pool.allocate(1.0, {"a": (0, 0), "b": (0, 0)}) == {"a": (0, 0), "b": (0, 0)}
    pool.record("a", 0.0, 0.5, rows=1, cols=1)  # scores move halfway (momentum 0.5)
    assert (pool.row_score["a"], pool.col_score["a"]) == (0.5, 0.25)


# ---- checkpoints, counter, BN folding ------------------------------------------------------------------------


def test_checkpoint_rebuilds_a_pruned_grown_and_quantized_model(tmp_path):
    model = toy()
    pool = BringBackPool()
    prune_step(model, collect_kfac(model, batches(), "cpu"), 0.3, 0.5, pool)
    bring_back_step(model, pool, 0.25, torch.Generator().manual_seed(0))
    x = batches(1, 4)[0][0]
    path = tmp_path / "prune.pt"
    atomic_save(make_checkpoint(model, "pyramidnet", ARGS), path)
    assert safe_load(path)["factorization"] == factorization_plan(model)
    loaded, _ = load_model(path)
    assert factorization_plan(loaded) == factorization_plan(model)
    assert_close(loaded.eval()(x), model(x), atol=0, rtol=0)

    # quantize folds each block's BN into the output rotation before it; the reload order must still fit
    quantize_model(model, foldable_batchnorms(model, (3, 16, 16)), [x], weight_bits=9, activation_bits=12)
    assert model.layer1[0].conv1.output.bias is not None
    atomic_save(make_checkpoint(model, "pyramidnet", ARGS), path)
    loaded, _ = load_model(path)
    assert_close(loaded.eval()(x), model(x), atol=0, rtol=0)


def test_factorization_plan_errors_name_the_layer():
    model = toy()
    plan = {"layer1.0.conv9": {"kind": "conv", "in_channels": 16, "out_channels": 21, "in_rank": 3,
                               "out_rank": 3, "input_bias": False, "output_bias": False}}
    with pytest.raises(MicronetError, match="layer1.0.conv9"):
        apply_factorization_plan(model, plan)
    with pytest.raises(MicronetError, match="is a linear"):
        apply_factorization_plan(model, {"conv1": {**plan["layer1.0.conv9"], "kind": "linear"}})
    with pytest.raises(MicronetError, match="lacks"):
        apply_factorization_plan(model, {"conv1": {"kind": "conv"}})


def test_counter_sees_three_layers_and_folds_each_bn_into_the_output_rotation():
    model = toy()
    prune_step(model, collect_kfac(model, batches(), "cpu"), 0.3, 0.5)
    rows = count(model, (3, 16, 16)).layers
    plan = factorization_plan(model)
    for name, spec in plan.items():
        kind = spec["kind"]
        mine = [r for r in rows if r.name.split("+")[0].rsplit(".", 1)[0] == name]
        assert [r.kind for r in mine] == [kind] * 3
        assert [r.name.split("+")[0] for r in mine] == [f"{name}.input", f"{name}.core", f"{name}.output"]
        layer = model.get_submodule(name)
        widths = [r.output_shape[1] for r in mine]
        assert widths == [layer.in_rank, layer.out_rank, spec["out_channels"]]
        assert [r.input_shape[1] for r in mine] == [spec["in_channels"], layer.in_rank, layer.out_rank]
    pairs = set(foldable_batchnorms(model, (3, 16, 16)))
    expected = {("conv1.output", "bn1")} | {
        (f"layer{s}.0.conv{i}.output", f"layer{s}.0.bn{i + 1}") for s in (1, 2, 3) for i in (1, 2, 3)
    }
    assert pairs == expected


# ---- several processes ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_net() -> nn.Module:
    """Full-rank factors with distinct eigenvalues, so eigenbases (and s in them) compare across runs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4)).eval()


def _worker(rank: int, world: int, port: int, data, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = [(x[rank::world], y[rank::world]) for x, y in data]  # each process its own examples
        stats = collect_kfac(small_net(), shard, "cpu", fisher="empirical")
        if rank == world - 1:
            torch.save({n: (f.A, f.G, f.s) for n, f in stats.layers.items()} | {
                "counts": (stats.examples, stats.correction_examples)}, out)
    finally:
        dist.destroy_process_group()


def test_statistics_of_three_processes_equal_one_process_over_the_same_examples(tmp_path):
    data = batches(2, 12, shape=(3, 8, 8), classes=4)
    out = str(tmp_path / "stats.pt")
    # fork: the workers inherit the imports instead of paying for them again (set_num_threads(1) in each)
    mp.start_processes(_worker, args=(3, _free_port(), data, out), nprocs=3, join=True, start_method="fork")
    got = torch.load(out, weights_only=True)
    single = collect_kfac(small_net(), data, "cpu", fisher="empirical")
    assert got.pop("counts") == (24, 12)
    assert set(got) == set(single.layers) == {"0", "5"}
    for name, f in single.layers.items():
        A, G, s = got[name]
        assert_close(A, f.A, atol=1e-6, rtol=1e-5)
        assert_close(G, f.G, atol=1e-7, rtol=1e-5)
        assert_close(s, f.s, atol=1e-7, rtol=1e-3)


def test_bring_back_noise_is_a_param_and_wave_draws_it_once_per_layer_and_side():
    """prune.back_noise scales the perturbation; prune.back_noise_shared draws it once for all of a layer's new
    rows (Wave: Pruning/utils/prune_utils.py L420-L428, ones(n) * one perturbed last row: identical copies)."""
    torch.manual_seed(0)
    layer = FactorizedConv2d(6, 5, 5, 2, 3, padding=1, output_bias=True)
    model = nn.Sequential(layer)
    pool = BringBackPool()
    pool.record("0", 1.0, 0.0, rows=3, cols=0)  # every draw goes to a row
    bring_back_step(model, pool, 1.0, torch.Generator().manual_seed(3), noise=0.5, shared_noise=True)
    core, out_w = model[0].core.weight.detach(), model[0].output.weight.detach()
    new_rows = core[layer.out_rank :]
    assert len(new_rows) == 3 and all(torch.equal(new_rows[0], r) for r in new_rows)
    assert all(torch.equal(out_w[:, layer.out_rank], out_w[:, c]) for c in range(layer.out_rank, out_w.shape[1]))
    last = layer.core.weight.detach()[-1]
    u = (new_rows[0] - last) / (0.5 * last.abs())
    assert ((u >= 0) & (u < 1)).all() and u.max() > 0.02  # the 0.5 scale, not NOISE's 0.01
    zero = nn.Sequential(FactorizedConv2d(6, 5, 5, 2, 3, padding=1))
    pool.record("0", 1.0, 0.0, rows=2, cols=0)
    bring_back_step(zero, pool, 1.0, torch.Generator().manual_seed(3), noise=0.0)
    assert torch.equal(zero[0].core.weight[-1], zero[0].core.weight[-3])  # no noise: exact copies of the last
