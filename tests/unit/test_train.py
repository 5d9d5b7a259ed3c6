"""The training loop driven by a tiny model (detectron2 style): steps, evaluation, checkpoints, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fssmeta.checkpoint import CheckpointError, read_checkpoint, resume, save_checkpoint
from fssmeta.config import OptimConfig
from fssmeta.episode import Episode, SegOutput
from fssmeta.losses import episode_losses, segmentation_loss
from fssmeta.train import build_optimizer, build_scheduler, evaluate, fit, train_step


class TinySeg(nn.Module):
    """Query pixels -> 2 classes through a 1x1 conv, with dropout so the RNG state matters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.drop = nn.Dropout2d(0.3)

    def forward(self, episode: Episode, memory=None) -> SegOutput:
        logits = self.conv(self.drop(episode.query_img))
        return SegOutput(logits, [logits * 0.5] if self.training else [], {"l2": 1e-3 * self.conv.weight.square().sum()})


class Episodes(Dataset):
    """Episodes whose foreground is where the red channel is positive; content depends on the epoch."""

    def __init__(self, n: int = 8) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Episode:
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        img = torch.randn(3, 8, 8, generator=g)
        mask = (img[0] > 0).long()
        mask[0, 0] = 255
        return Episode(img[None], mask[None], img, mask, torch.tensor(1 + i % 2))


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = TinySeg()
    cfg = OptimConfig(lr=0.5, power=0.9)
    optimizer = build_optimizer(model.parameters(), cfg)
    loader = DataLoader(Episodes(), batch_size=2)
    return model, optimizer, build_scheduler(optimizer, cfg, total_steps=4 * len(loader)), loader


def test_losses_sum_main_aux_and_extra():
    model, *_ = make()
    model.train()
    ep = next(iter(DataLoader(Episodes(), batch_size=2)))
    losses = episode_losses(model, ep)
    assert set(losses) == {"ce", "aux", "l2"} and all(torch.isfinite(v) for v in losses.values())
    out = SegOutput(torch.zeros(1, 2, 2, 2), [], {})
    target = torch.tensor([[[0, 1], [255, 1]]])
    assert segmentation_loss(out, target)["ce"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_poly_schedule_stores_the_effective_lr():
    model, optimizer, scheduler, _ = make()
    assert optimizer.param_groups[0]["lr"] == 0.5
    for _ in range(8):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 - 8 / 16) ** 0.9)


def test_training_lowers_the_loss_and_evaluates():
    model, optimizer, scheduler, loader = make()
    before = evaluate(model, loader, num_classes=2).miou()
    result = fit(model, train_loader=loader, loss_fn=episode_losses, optimizer=optimizer, scheduler=scheduler,
                 epochs=4, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    after = evaluate(model, loader, num_classes=2)
    assert after.miou() > before and after.miou() > 0.8
    assert model.training  # evaluate restores the mode it found
    assert result.step == 16


def test_nan_loss_stops_with_a_clear_message():
    model, optimizer, scheduler, loader = make()
    batch = next(iter(loader))
    bad = batch._replace(query_img=batch.query_img * float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(ce=nan.*train.optim.lr"):
        train_step(model, bad, episode_losses, optimizer, scheduler)


def test_resume_continues_bit_identically(tmp_path):
    model, optimizer, scheduler, loader = make()
    fit(model, train_loader=loader, loss_fn=episode_losses, optimizer=optimizer, scheduler=scheduler, epochs=3,
        checkpoint_dir=tmp_path / "straight", progress=False)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler, loader = make()
    fit(model, train_loader=loader, loss_fn=episode_losses, optimizer=optimizer, scheduler=scheduler, epochs=1,
        checkpoint_dir=tmp_path / "split", progress=False)
    torch.manual_seed(999)  # disturb the RNG: the checkpoint must restore it
    model, optimizer, scheduler, loader = make(seed=5)  # different init: the checkpoint must overwrite it
    start = resume(tmp_path / "split" / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler)
    result = fit(model, train_loader=loader, loss_fn=episode_losses, optimizer=optimizer, scheduler=scheduler,
                 epochs=3, start=start, checkpoint_dir=tmp_path / "split", progress=False)
    assert result.step == 12 and len(result.history) == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert (tmp_path / "split" / "best.pt").is_file()


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model, *_ = make()
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="junk.pt: not a safe fssmeta checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "ok.pt", model=nn.Conv2d(3, 4, 1))
    with pytest.raises(CheckpointError, match=r"ok.pt: checkpoint does not match the model .* missing: conv.weight, "
                                              r"conv.bias; unexpected: weight, bias$"):
        resume(tmp_path / "ok.pt", model=model)
    wider = TinySeg()
    wider.conv = nn.Conv2d(3, 3, 1)
    save_checkpoint(tmp_path / "wide.pt", model=wider)
    with pytest.raises(CheckpointError, match=r"shape: conv.weight \(3, 3, 1, 1\) vs \(2, 3, 1, 1\)"):
        resume(tmp_path / "wide.pt", model=model)


def test_two_optimizers_step_and_checkpoint_as_one():
    """A method with two optimisers (SCCAN's shape) and LR groups (HDMNet's): one set for the loop."""
    from fssmeta.models.method import OptimizerSpec
    from fssmeta.train import OptimizerSet, SchedulerSet, build_optimization

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    specs = [OptimizerSpec("heads", [{"params": list(model[0].parameters()), "lr_scale": 10.0}],
                           OptimConfig(lr=0.01, power=0.0)),
             OptimizerSpec("attention", [{"params": list(model[1].parameters())}],
                           OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01, power=0.9))]
    optimizer, scheduler = build_optimization(specs, total_steps=4)
    assert isinstance(optimizer, OptimizerSet) and isinstance(scheduler, SchedulerSet)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.1), pytest.approx(1e-3)]
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(5, 3)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # constant
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.75 ** 0.9)  # poly
    state = optimizer.state_dict()
    assert set(state) == {"heads", "attention"} and "exp_avg" in next(iter(state["attention"]["state"].values()))
    fresh, fresh_scheduler = build_optimization(specs, total_steps=4)
    fresh.load_state_dict(state)
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    assert fresh.state_dict()["attention"]["state"][0]["step"] == state["attention"]["state"][0]["step"]
    with pytest.raises(ValueError, match=r"state for \['heads'\], expected \['attention', 'heads'\]"):
        fresh.load_state_dict({"heads": state["heads"]})


def test_amp_modes_decide_where_bf16_autocast_runs():
    from fssmeta.config import Config
    from fssmeta.train import amp_enabled, cpu_computes_bf16

    cfg = Config.model_validate({"train": {"amp": False}, "eval": {"amp": True}})
    assert (cfg.train.amp, cfg.eval.amp) == ("off", "cuda")  # earlier configs' booleans
    with pytest.raises(ValueError, match="amp"):
        Config.model_validate({"eval": {"amp": "bf16"}})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [amp_enabled(cuda, m) for m in ("off", "cuda", "all", True, False)] == [False, True, True, True, False]
    assert not amp_enabled(cpu, "cuda") and not amp_enabled(cpu, True)
    assert amp_enabled(cpu, "all") == cpu_computes_bf16()

    seen = []

    def loss_fn(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return {"ce": model(batch).float().pow(2).mean()}

    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast does not leak into an fp32 step
        train_step(model, torch.randn(3, 4), loss_fn, optimizer, amp="cuda")
    train_step(model, torch.randn(3, 4), loss_fn, optimizer, amp="all")
    assert seen == [False, cpu_computes_bf16()]
