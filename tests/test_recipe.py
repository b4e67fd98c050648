"""The recipe vocabulary against hand-computed cases: optimizers and their no-decay groups, every schedule,
mixing with the matching loss, uniform / class-similarity smoothing, teacher targets, the angle loss, SRIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from micronet import recipe
from micronet.config import LossConfig, MixingConfig, OptimConfig, ScheduleConfig
from micronet.errors import MicronetError


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.Flatten(),
                         nn.LazyLinear(5))


def lr_per_step(cfg: OptimConfig, steps_per_epoch: int) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer, scheduler = recipe.start_round(model, cfg, steps_per_epoch, 0)
    lrs = []
    for epoch in range(cfg.epochs):
        if epoch in recipe.round_starts(cfg) and epoch:
            optimizer, scheduler = recipe.start_round(model, cfg, steps_per_epoch, epoch)
        for _ in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return lrs


# ---- optimizers -------------------------------------------------------------------------------------------------


def test_sgd_nesterov_and_adamw_decoupled_decay():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    sgd = recipe.make_optimizer(model, OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.5))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    # zero loss gradient: only the decay acts. SGD's L2 goes through the gradient: 2 - 0.1*0.5*2*(1+0.9 nesterov)
    model.weight.grad = torch.zeros_like(model.weight)
    sgd.step()
    assert model.weight.item() == pytest.approx(2 - 0.1 * 1.0 * 1.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
    adamw = recipe.make_optimizer(model, OptimConfig(optimizer="adamw", lr=0.1, betas=(0.9, 0.99), weight_decay=0.5))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.99)
    model.weight.grad = torch.zeros_like(model.weight)
    adamw.step()
    assert model.weight.item() == pytest.approx(2 * (1 - 0.1 * 0.5))  # fastai's true_wd: p *= 1 - lr*wd


def test_no_decay_group_holds_exactly_the_norm_parameters_and_biases():
    model = net()
    model(torch.zeros(1, 3, 5, 5))
    groups = recipe.parameter_groups(model, 1e-4, decay_norm_and_bias=False)
    decayed, exempt = ({id(p) for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert exempt == {id(model[1].weight), id(model[1].bias), id(model[2].bias), id(model[4].bias)}
    assert decayed == {id(model[0].weight), id(model[2].weight), id(model[4].weight)}
    assert len(recipe.parameter_groups(model, 1e-4, decay_norm_and_bias=True)) == 1


# ---- schedules ---------------------------------------------------------------------------------------------------


def test_per_epoch_schedules():
    m = recipe.epoch_multiplier
    assert m(ScheduleConfig(kind="constant"), 5, 10, 0.1) == 1.0
    step = ScheduleConfig(kind="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [round(m(step, e, 200, 0.1), 6) for e in (0, 99, 100, 149, 150)] == [1, 1, 0.1, 0.1, 0.01]
    cosine = ScheduleConfig(kind="cosine")
    assert m(cosine, 0, 10, 0.1) == 1.0 and m(cosine, 5, 10, 0.1) == pytest.approx(0.5)
    floor = ScheduleConfig(kind="cosine", eta_min=0.01)  # halfway: 0.1 + 0.9 * 0.5 of lr 0.1
    assert m(floor, 5, 10, 0.1) == pytest.approx(0.55)
    pyramid = ScheduleConfig(kind="pyramid")
    assert m(pyramid, 449, 1800, 0.5) == 1.0 and m(pyramid, 450, 1800, 0.5) == pytest.approx(0.1)
    assert m(pyramid, 900, 1800, 0.5) == pytest.approx(0.01 * 0.2)
    table = ScheduleConfig(kind="table", table={1: 1.0, 26: 0.1, 51: 0.01, 66: 0.001})  # UCI's epochs are 1-based
    assert [m(table, e, 75, 0.07) for e in (0, 24, 25, 49, 50, 64, 65, 74)] == [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_linear_warmup_then_cosine_as_dnw():
    dnw = ScheduleConfig(kind="cosine", warmup_epochs=5)
    values = [recipe.epoch_multiplier(dnw, e, 100, 0.256) for e in range(100)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert values[5] == 1.0 and values[5 + 95 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))


def test_sgdr_rounds_restart_with_a_fresh_optimizer():
    cfg = OptimConfig(epochs=8, lr=0.1, schedule=ScheduleConfig(kind="sgdr", rounds=2, eta_min=0.001))
    assert recipe.round_starts(cfg) == [0, 4]
    lrs = lr_per_step(cfg, steps_per_epoch=2)
    expected_round = [0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert lrs == pytest.approx([lr for lr in expected_round for _ in range(2)] * 2)
    model = nn.Linear(2, 2)
    model.weight.grad = torch.ones_like(model.weight)
    optimizer, _ = recipe.start_round(model, cfg, 2, 0)
    optimizer.step()
    assert optimizer.state  # momentum buffers ...
    fresh, scheduler = recipe.start_round(model, cfg, 2, 4)
    assert not fresh.state and fresh.param_groups[0]["lr"] == pytest.approx(0.1)  # ... gone at the restart
    resumed, _ = recipe.start_round(model, cfg, 2, 6)  # resuming mid-round lands on the round's own epoch 2
    assert resumed.param_groups[0]["lr"] == pytest.approx(expected_round[2])


def test_onecycle_is_torch_onecycle_with_fastai_defaults():
    cfg = OptimConfig(epochs=10, lr=5e-3, optimizer="adamw", betas=(0.9, 0.99), schedule=ScheduleConfig(
        kind="onecycle", pct_start=0.3, div_factor=25, final_div_factor=1e4, momentum_range=(0.85, 0.95)))
    model = nn.Linear(2, 2)
    optimizer, scheduler = recipe.start_round(model, cfg, 10, 0)
    lrs, betas = [], []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    peak = int(0.3 * 100) - 1  # torch: the warm phase ends at step pct_start * total - 1
    assert lrs[0] == pytest.approx(5e-3 / 25) and lrs[peak] == pytest.approx(5e-3)
    assert lrs[-1] == pytest.approx(5e-3 / 25 / 1e4, rel=1e-3) and max(lrs) == pytest.approx(5e-3)
    assert betas[0] == pytest.approx(0.95) and betas[peak] == pytest.approx(0.85) and betas[-1] == pytest.approx(0.95)
    halfway_up = lrs[peak // 2]  # cosine annealing between the ends
    assert 5e-3 / 25 < halfway_up < 5e-3


def test_scheduler_state_round_trips_for_resume():
    cfg = OptimConfig(epochs=4, lr=0.1, schedule=ScheduleConfig(kind="onecycle"))
    model = nn.Linear(2, 2)
    optimizer, scheduler = recipe.start_round(model, cfg, 5, 0)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    saved = (optimizer.state_dict(), scheduler.state_dict(), optimizer.param_groups[0]["lr"])
    again, again_scheduler = recipe.start_round(model, cfg, 5, 1)
    again.load_state_dict(saved[0])
    again_scheduler.load_state_dict(saved[1])
    again.step()
    again_scheduler.step()
    optimizer.step()
    scheduler.step()
    assert again.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


# ---- targets and loss ------------------------------------------------------------------------------------------


def test_hard_labels_are_exactly_torch_cross_entropy():
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    criterion = recipe.Criterion(LossConfig(label_smoothing=0.1), MixingConfig(), num_classes=5)
    images, targets = criterion.prepare(torch.zeros(6, 3, 4, 4), labels)
    assert targets is None and criterion.hard
    assert torch.equal(criterion(logits, labels, targets), F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_cutmix_loss_is_lambda_weighted_cross_entropy_with_lambda_from_the_box():
    np.random.seed(0)
    images = torch.arange(4 * 1 * 8 * 8, dtype=torch.float32).reshape(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    criterion = recipe.Criterion(LossConfig(), MixingConfig(kind="cutmix", alpha=1.0), num_classes=4)
    mixed, targets = criterion.prepare(images.clone(), labels)
    partner = images.flip(0)  # timm pairs image i with image n-1-i
    from_partner = (mixed == partner) & (mixed != images)
    lam = 1 - from_partner[0].float().mean().item()  # the pasted box's share of the image
    assert 0 < lam < 1 and torch.equal(mixed[~from_partner], images[~from_partner])
    assert targets[0].tolist() == pytest.approx([lam, 0, 0, 1 - lam])
    logits = torch.randn(4, 4)
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels.flip(0))
    assert criterion(logits, labels, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mixup_per_sample_draws_one_lambda_per_image():
    np.random.seed(1)
    images, labels = torch.rand(6, 3, 4, 4), torch.arange(6)
    criterion = recipe.Criterion(LossConfig(), MixingConfig(kind="mixup", alpha=0.4, per_sample=True), num_classes=6)
    mixed, targets = criterion.prepare(images.clone(), labels)
    lams = [targets[i, i].item() for i in range(6)]
    assert len(set(round(x, 6) for x in lams)) > 1  # not one lambda for the batch
    for i, lam in enumerate(lams):
        assert torch.allclose(mixed[i], lam * images[i] + (1 - lam) * images[5 - i], atol=1e-6)


def test_weighted_label_smoothing_by_class_similarity_three_classes():
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    s = recipe.class_similarity(weight)
    c = 1 / math.sqrt(2)  # |cos| between rows: (0,1): c, (0,2): 0, (1,2): c
    row0 = torch.softmax(torch.tensor([c, 0.0]), 0)
    assert s[0].tolist() == pytest.approx([0.0, row0[0].item(), row0[1].item()])
    assert s[1].tolist() == pytest.approx([0.5, 0.0, 0.5]) and s.diagonal().abs().sum() == 0
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    criterion = recipe.Criterion(LossConfig(similarity_smoothing=0.3), MixingConfig(), num_classes=3)
    criterion.start_epoch(model)
    _, targets = criterion.prepare(torch.zeros(1, 2), torch.tensor([0]))
    assert targets[0].tolist() == pytest.approx([0.7, 0.3 * row0[0].item(), 0.3 * row0[1].item()])


def test_teacher_soft_targets_and_angle_loss():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).train()
    teacher[1].weight.requires_grad_(True)
    images, labels = torch.randn(2, 1, 2, 2), torch.tensor([0, 2])
    criterion = recipe.Criterion(LossConfig(logit_scale=5.0, teacher_mode="eval"), MixingConfig(), num_classes=3,
                                 teacher=teacher)
    _, targets = criterion.prepare(images, labels)
    assert not teacher.training and not teacher[1].weight.requires_grad
    assert torch.allclose(targets, torch.softmax(5 * teacher(images), 1))
    cos = torch.tensor([[0.2, -0.1, 0.5], [0.9, 0.0, -0.3]])
    expected = -(targets * F.log_softmax(5 * cos, 1)).sum(1).mean()
    assert criterion(cos, labels, targets).item() == pytest.approx(expected.item())
    # without a teacher, the margin is subtracted at the label before scaling (CosFace)
    angle = recipe.Criterion(LossConfig(logit_scale=5.0, margin=0.2), MixingConfig(), num_classes=3)
    _, onehot = angle.prepare(images, labels)
    shifted = cos - 0.2 * F.one_hot(labels, 3)
    assert angle(cos, labels, onehot).item() == pytest.approx(F.cross_entropy(5 * shifted, labels).item())


def test_mixing_needs_an_even_batch_and_classes():
    with pytest.raises(MicronetError, match="number of classes"):
        recipe.Criterion(LossConfig(), MixingConfig(kind="cutmix"))
    criterion = recipe.Criterion(LossConfig(), MixingConfig(kind="cutmix"), num_classes=3)
    with pytest.raises(MicronetError, match="even batch"):
        criterion.prepare(torch.zeros(3, 1, 4, 4), torch.tensor([0, 1, 2]))


# ---- SRIP ---------------------------------------------------------------------------------------------------------


def test_srip_is_the_mean_squared_spectral_norm_of_wtw_minus_i_on_1x1_convs():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 3, 1, bias=False),
                          nn.Conv2d(3, 3, 1, groups=3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1))  # W^T W - I = diag(3, 0)
        model[2].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).reshape(3, 2, 1, 1))  # M = 0
        model[3].weight.fill_(1.0)  # depthwise 1x1: W (3, 1), M = [[3 - 1]] = 2
    generator = torch.Generator().manual_seed(0)
    penalty = recipe.srip_penalty(model, generator)
    # one power step on diag(3, 0) from any start with a nonzero first component finds sigma = 3 exactly
    assert penalty.item() == pytest.approx((9 + 0 + 4) / 3)
    penalty.backward()
    assert model[1].weight.grad.abs().sum() > 0 and model[0].weight.grad is None  # 3x3 convs are left alone
    with pytest.raises(MicronetError, match="no 1x1"):
        recipe.srip_penalty(nn.Sequential(nn.Conv2d(2, 2, 3)))


def test_per_sample_mixup_batched_equals_timm_loop():
    from timm.data import Mixup

    images = torch.rand(8, 3, 4, 4)
    np.random.seed(5)
    ours, ours_targets = recipe.make_mixer(MixingConfig(kind="mixup", alpha=0.4, per_sample=True), 8)(
        images.clone(), torch.arange(8))
    np.random.seed(5)
    timm = Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, mode="elem", label_smoothing=0.0, num_classes=8)
    theirs, theirs_targets = timm(images.clone(), torch.arange(8))
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(ours_targets, theirs_targets)


def test_recipes_that_contradict_themselves_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="onecycle warms up itself"):
        ScheduleConfig(kind="onecycle", warmup_epochs=2)
    with pytest.raises(MicronetError, match="replace the labels"):
        recipe.Criterion(LossConfig(label_smoothing=0.1), MixingConfig(), num_classes=3, teacher=nn.Linear(2, 3))


# ---- the teams' recipes name their source -------------------------------------------------------------------

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

RECIPE_FILES = sorted((Path(__file__).resolve().parents[1] / "micronet/assets/recipes").glob("*.yaml"))
TEAM_REPOSITORY = {  # /work/shared/docs/submissions.md §0: the repository and commit read for each pipeline
    "wave": "mhariat/MicroNet", "kaist": "Kthyeon/KAIST-AI-NeurIPS2019-MicroNet-2nd-place-solution",
    "fastai-wrn": "divyanshj16/micronet", "uci": "logichen/UCI-CIFAR-100", "dnw": "mitchellnw/micro-net-dnw",
}
CITATION = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)@(?P<commit>[0-9a-f]{7,40}):(?P<path>[^#\s]+)(?P<line>#L\d+(-L\d+)?)?")


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_value_cites_where_it_is_in_the_teams_code(path):
    """Each value of assets/recipes/<pipeline>.yaml has a `sources` entry: repo@commit:path#Lnn in the team's
    repository, or a sentence that starts "not found" and says where the value comes from instead."""
    recipe = yaml.safe_load(path.read_text())
    values, sources = recipe["values"], recipe.get("sources") or {}
    assert set(sources) == set(values), (f"{path.name}: no source for {sorted(set(values) - set(sources))}, "
                                         f"a source for no value: {sorted(set(sources) - set(values))}")
    for key, source in sources.items():
        assert isinstance(source, str) and source.strip(), f"{path.name}: {key} has an empty source"
        if source.startswith("not found"):
            assert "submissions.md" in source or "@" in source, f"{path.name}: {key}: say where it comes from"
            continue
        cited = CITATION.match(source)
        assert cited, f"{path.name}: {key}: {source!r} is neither repo@commit:path#Lnn nor 'not found ...'"
        assert cited["repo"] == TEAM_REPOSITORY[recipe["pipeline"]], f"{path.name}: {key} cites {cited['repo']}"
        assert cited["line"] or "no line" in source, f"{path.name}: {key}: {source!r} names no line"
