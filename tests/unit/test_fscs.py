"""iFSL's FS-CS task around ASNet: the N-way lists (the official class draw, presence, determinism, the 1-way
lists untouched), the N-way forward (batched ways = separate ways; one way = the 1-way forward), ER and the
per-class mIoU on hand cases, the report row, the weak-label objective, the load-time refusals, and
`fssmeta episodes / train / evaluate` with `episodes.ways: 2` under both supervisions."""

from __future__ import annotations

import base64
import io
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fssmeta.checkpoint import read_checkpoint
from fssmeta.cli import main
from fssmeta.config import Config, ConfigError, EvalConfig
from fssmeta.data.ways import check_way_episodes, sample_way_episodes, way_labels
from fssmeta.decoding import RequestError
from fssmeta.episode import Episode, FSCSEpisode, SegOutput
from fssmeta.evaluation import scoring_transform
from fssmeta.fscs import add_way_metrics, evaluate_ways, fscs_markdown
from fssmeta.losses import resize_logits
from fssmeta.models import build_model, get_method
from fssmeta.models.asnet import presence_loss
from fssmeta.params import load_config
from fssmeta.predict_ways import check_way_supports, class_labels, segment_ways
from fssmeta.runs import fresh_model
from fssmeta.served import segment_record
from fssmeta.stages import train_meta
from fssmeta.train import train_step
from tests.cli_data import tiny_cli_data
from tests.mlflow_helpers import BASE_CLASSES, encode, local_mlflow, png_base64, save_model
from tests.unit.test_models import PASCAL_FOLD0_BASE, make_episode, make_model, tiny_cfg

CLASSES = 5


def one_class_images(per_class: int = 12) -> tuple[list[tuple[str, list[int]]], dict[str, set[int]]]:
    """A pool whose images each hold exactly one class: presence is then "the way's class is the query's"."""
    entries = [(f"c{c}_{i}", [c]) for c in range(1, CLASSES + 1) for i in range(per_class)]
    return entries, {key: set(classes) for key, classes in entries}


def test_way_lists_follow_the_official_class_draw():
    entries, contents = one_class_images()
    one = sample_way_episodes(entries, contents, 1, 1, 4000, seed=0)
    rate = statistics.fmean(p for ep in one for p in ep["presence"])
    assert abs(rate - 0.5) < 0.03  # 1 way: the support class is the query's with probability 1/2
    two = sample_way_episodes(entries, contents, 2, 2, 4000, seed=0)
    check_way_episodes(two, entries, contents, 2, 2)
    # Drawn without replacement with weight 1/2 on the query's class and 1/8 on each of the 4 others: way 1
    # is the query's class with probability 1/2, way 2 with (1/2) (1/2) / (7/8) = 2/7.
    first = statistics.fmean(ep["presence"][0] for ep in two)
    second = statistics.fmean(ep["presence"][1] for ep in two)
    assert abs(first - 0.5) < 0.03 and abs(second - 2 / 7) < 0.03
    assert all(ep["query_class"] in ep["classes"] or not any(ep["presence"]) for ep in two)
    assert two == sample_way_episodes(entries, contents, 2, 2, 4000, seed=0)  # deterministic per seed
    assert two != sample_way_episodes(entries, contents, 2, 2, 4000, seed=1)
    # Presence is read from the query's whole content (any pixel count), not only its drawn class.
    contents = {**contents, "c1_0": {1, 2}}
    with pytest.raises(Exception, match="presence"):
        check_way_episodes(two, entries, contents, 2, 2)


def test_way_labels_rename_each_way_and_keep_ignore():
    mask = np.array([[0, 3, 7], [255, 7, 9]], dtype=np.uint8)
    assert way_labels(mask, [7, 3]).tolist() == [[0, 2, 1], [255, 1, 0]]


def way_episode(batch: int = 2) -> FSCSEpisode:
    first, second = make_episode(1, batch, seed=0), make_episode(1, batch, seed=1)
    return FSCSEpisode(torch.stack([first.support_imgs, second.support_imgs], 1),
                       torch.stack([first.support_masks, second.support_masks], 1), first.query_img,
                       first.query_mask, torch.stack([first.class_id, second.class_id], 1),
                       torch.tensor([[True, False], [False, False]])[:batch])


def test_nway_forward_batches_the_ways_and_one_way_is_the_episode_forward():
    model = make_model("asnet").eval()
    episode = way_episode()
    with torch.no_grad():
        out = model(episode)
        per_way = [model(Episode(episode.support_imgs[:, n], episode.support_masks[:, n], episode.query_img,
                                 episode.query_mask, episode.class_ids[:, n])) for n in range(2)]
        log_probs = model.way_log_probs(episode)
    assert out.logits.shape == (2, 3, 65, 65) and out.presence.shape == (2, 2) and out.presence.dtype == torch.bool
    assert log_probs.shape[:4] == (2, 1, 2, 2)
    # Ways batched (the query's features repeated per way, as official) = each way on its own.
    for n, alone in enumerate(per_way):
        torch.testing.assert_close(out.logits[:, 1 + n], alone.logits[:, 1])
        assert torch.equal(out.presence[:, n], alone.presence[:, 0])
    merged_bg = torch.stack([resize_logits(log_probs[:, 0, n, :1], (65, 65)) for n in range(2)]).mean(0)[:, 0]
    torch.testing.assert_close(out.logits[:, 0], merged_bg)  # background: the mean of the ways' log-probs
    one_way = FSCSEpisode(*(t[:, :1] for t in episode[:2]), episode.query_img, episode.query_mask,
                          episode.class_ids[:, :1], episode.presence[:, :1])
    with torch.no_grad():
        assert torch.equal(model(one_way).logits, per_way[0].logits)  # N = 1: today's forward exactly


class FixedOutput(nn.Module):
    """Returns the logits and presence it was given, whatever the episode."""

    def __init__(self, logits: torch.Tensor, presence: torch.Tensor) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.outputs = iter(zip(logits, presence, strict=True))

    def forward(self, episode: FSCSEpisode) -> SegOutput:
        logits, presence = next(self.outputs)
        return SegOutput(logits[None], [], {}, presence[None])


def test_er_and_per_class_miou_on_a_hand_case():
    # Two 2-way episodes on a 1x4 query. Episode 1: classes (3, 5), only 3 present; episode 2: (5, 4), none.
    truth = torch.tensor([[[1, 1, 0, 255]], [[0, 0, 0, 0]]])
    pred = torch.tensor([[[1, 2, 0, 2]], [[0, 1, 1, 0]]])  # as argmax labels 0..2
    logits = F.one_hot(pred, 3).permute(0, 3, 1, 2).float()  # (episodes, 3, 1, 4)
    said = torch.tensor([[True, True], [False, False]])  # episode 1: class 5 wrongly present; episode 2 right
    episodes = [FSCSEpisode(torch.zeros(1, 2, 1, 3, 1, 4), torch.zeros(1, 2, 1, 1, 4, dtype=torch.long),
                            torch.zeros(1, 3, 1, 4), truth[i : i + 1], torch.tensor([ids]), torch.tensor([present]))
                for i, (ids, present) in enumerate([([3, 5], [True, False]), ([5, 4], [False, False])])]
    iou, exact = evaluate_ways(FixedOutput(logits, said), episodes, 20, score_logits=lambda x, size: x)
    assert exact.value() == 0.5
    # class 3: I 1, U 2 (episode 1); class 5: I 0, U 1 (ep. 1: pixel 2; the 255 pixel is out) + 2 (ep. 2: 1, 2);
    # class 4: I 0, U 0 (episode 2: never predicted, never there): IoU 0, as official I / max(U, 1).
    assert iou.per_class_iou() == {3: 0.5, 4: 0.0, 5: 0.0}
    assert iou.miou() == pytest.approx(0.5 / 3)


def test_report_row_and_metrics_carry_er_and_miou():
    fscs = {"ways": 2, "er_mean": 0.625, "er_std": 0.05, "miou_mean": 0.4, "miou_std": 0.02, "seeds": []}
    result = {"miou_mean": 0.5, "miou_std": 0.0, "fbiou_mean": 0.6, "fbiou_std": 0.0, "seeds": [], "fscs": fscs}
    collected = {"asnet": {"protocol": {}, "results": {"fold0": {"1shot": result}}},
                 "baseline": {"protocol": {}, "results": {"fold0": {"1shot": {**result, "fscs": None}}}}}
    table = fscs_markdown(collected, (1,))
    assert "| asnet | 2 | 1 | 62.5 ± 5.0 / 40.0 ± 2.0 | **62.5** | **40.0** |" in table
    assert "baseline" not in table
    row = add_way_metrics({"miou": 0.5, "fold0": {"miou": 0.5}}, {"fold0": result})
    assert row == {"miou": 0.5, "er_2way": 0.625, "miou_2way": 0.4,
                   "fold0": {"miou": 0.5, "er_2way": 0.625, "miou_2way": 0.4}}


def test_presence_objective_is_official_and_trains_without_masks():
    torch.manual_seed(0)
    weak = {"support_masking": "none", "mask_attention": False}
    model = build_model(tiny_cfg("asnet", asnet={**get_method("asnet").tiny["asnet"], **weak}), shot=1,
                        base_classes=PASCAL_FOLD0_BASE)
    full = way_episode()  # one way: the first query holds the support class, the second does not
    episode = FSCSEpisode(full.support_imgs[:, :1], full.support_masks[:, :1], full.query_img, full.query_mask,
                          full.class_ids[:, :1], torch.tensor([[True], [False]]))
    with torch.no_grad():
        shared = model.way_log_probs(episode)[:, 0]  # (B, N = 1, 2, h, w), the official forward's output
        official = F.nll_loss(shared.mean(dim=[-1, -2]).squeeze(1), episode.presence.long().squeeze(-1))
        assert presence_loss(model, episode)["presence_nll"] == official
        poisoned = episode._replace(support_masks=1 - episode.support_masks.clamp(max=1))
        assert presence_loss(model, poisoned)["presence_nll"] == official  # no support mask reaches it
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for present in (True, False):  # a few Adam steps move every label's loss down: the objective's sign
        model.load_state_dict(state)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        labelled = episode._replace(presence=torch.full((2, 1), present))
        losses = [train_step(model, labelled, get_method("asnet").training_loss("presence"), optimizer)["presence_nll"]
                  for _ in range(3)]
        assert losses[-1] < losses[0] - 0.05, (present, losses)


@pytest.mark.parametrize(("overrides", "message"), [
    (["episodes.ways=2"], "episodes.ways: 2-way FS-CS lists need .* bam does not .*asnet"),
    (["train.task=fscs", "model.method=hsnet"], "train.task: fscs .* hsnet does not"),
    (["train.supervision=presence", "model.method=pfenet"], "train.supervision: presence .* pfenet has none"),
    (["train.supervision=presence", "model.method=asnet", "model.asnet.mask_attention=false"], "set train.task: fscs"),
    (["train.supervision=presence", "model.method=asnet", "train.task=fscs"], "model.asnet.mask_attention: True"),
    (["train.supervision=presence", "model.method=asnet", "train.task=fscs", "model.asnet.mask_attention=false",
      "model.asnet.support_masking=hybrid"], "model.asnet.support_masking: 'hybrid'"),
    (["train_base.supervision=presence"], "train_base: task / supervision"),
    (["episodes.ways=0"], "episodes.ways"),
    (["train.supervision=tags"], "train.supervision"),
])
def test_what_a_method_cannot_run_is_refused_at_load(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.integration  # imports Ray (the unit tier imports no Ray, MLflow or DVC)
def test_weak_labels_select_on_er_in_both_trainers():
    """`best.pt` (`fit`) and Ray Train's best checkpoint are chosen on one metric: ER under weak labels."""
    from fssmeta.integrations.ray_train import selection
    from fssmeta.stages import selection_key

    weak = load_config(None, ["train.supervision=presence", "model.method=asnet", "train.task=fscs",
                              "model.asnet.mask_attention=false", "model.asnet.support_masking=none"])
    masks = load_config(None, ["model.method=asnet", "train.task=fscs"])
    assert (selection_key(weak), selection(weak)) == ("val_er", ("val_er", "max"))
    assert (selection_key(masks), selection(masks)) == ("val_miou", ("val_miou", "max"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny synthetic dataset with 1-shot fold-0 lists, 2-way lists beside the 1-way ones."""
    root = tmp_path_factory.mktemp("fscs")
    return root, tiny_cli_data(root, "asnet", (1,), **{
        "episodes.ways": 2, "synthesize.train_images": 40, "synthesize.test_images": 60,
        "synthesize.val_images": 40, "episodes.test_episodes": 4, "episodes.val_episodes": 2, "eval.episodes": 4,
        "train.episodes_per_epoch": 4, "train.batch_size": 2, "train.val_episodes": 2})


def test_episodes_stage_adds_way_lists_and_keeps_the_1way_lists(data):
    root, args = data
    assert main(["episodes", *args, "--set", "episodes.ways=1", "--set", f"episodes.out={root / 'one_way'}"]) == 0
    written = sorted(p.name for p in (root / "episodes" / "fold0").iterdir())
    assert written == ["test_1shot_image_seed0.json", "test_2way_1shot_image_seed0.json",
                       "val_1shot_image_seed1000.json", "val_1way_1shot_image_seed1000.json"]
    for name in ("test_1shot_image_seed0.json", "val_1shot_image_seed1000.json"):  # unchanged byte for byte
        assert (root / "episodes" / "fold0" / name).read_bytes() == (root / "one_way" / "fold0" / name).read_bytes()
    assert not list((root / "one_way" / "fold0").glob("*way*"))
    listed = json.loads((root / "episodes" / "fold0" / "test_2way_1shot_image_seed0.json").read_text())
    assert listed["ways"] == 2 and len(listed["episodes"]) == 4
    assert all(len(ep["classes"]) == 2 and len(ep["supports"]) == 2 for ep in listed["episodes"])
    # The FS-CS validation lists (train.task fscs selects on them): 1 way, as the official trainer validates,
    # from the validation pool, for each fold and the all-classes split.
    for fold in ("fold0", "all"):
        val = json.loads((root / "episodes" / fold / "val_1way_1shot_image_seed1000.json").read_text())
        assert (val["ways"], val["split"], val["pool"], len(val["episodes"])) == (1, "val", "val", 2)
        index = json.loads((root / "prepared" / "index.json").read_text())
        held = {row["key"]: {int(c) for c in row["pixels"]} for row in index["pools"]["val"]}
        for ep in val["episodes"]:
            assert ep["presence"] == [ep["classes"][0] in held[ep["query"]]]
    manifest = json.loads((root / "episodes" / "manifest.json").read_text())
    assert sorted(f["ways"] for f in manifest["files"] if "ways" in f) == [1, 1, 2]


@pytest.mark.parametrize("supervision", ["mask", "presence"])
def test_fscs_trains_and_evaluate_reports_er_beside_miou(data, supervision: str):
    root, args = data
    sets = ["--set", "train.task=fscs", "--set", f"train.supervision={supervision}",
            "--set", f"train.out={root / supervision}", "--set", f"eval.out={root / supervision / 'results'}"]
    if supervision == "presence":
        sets += ["--set", "model.asnet.mask_attention=false", "--set", "model.asnet.support_masking=none"]
    assert main(["train", *args, *sets]) == 0
    record = json.loads((root / supervision / "fold0" / "asnet-1shot" / "history.json").read_text())
    history = record["history"]
    assert ("train_presence_nll" in history[0]) == (supervision == "presence")
    # Selected on the 1-way FS-CS validation list: by mIoU, by ER with weak labels (official fs-cs).
    assert record["score_key"] == ("val_er" if supervision == "presence" else "val_miou")
    assert {"val_er", "val_miou"} <= set(history[0]) and "val_fbiou" not in history[0]
    assert record["best_score"] == max(h[record["score_key"]] for h in history)
    assert main(["evaluate", *args, *sets]) == 0
    result = json.loads((root / supervision / "results" / "fold0" / "asnet.json").read_text())
    fscs = result["results"]["fold0"]["1shot"]["fscs"]
    assert fscs["ways"] == 2 and fscs["seeds"][0]["episodes"] == 4
    assert fscs["er_mean"] in (0.0, 0.25, 0.5, 0.75, 1.0) and 0.0 <= fscs["miou_mean"] <= 1.0
    assert result["mean"]["1shot"]["fscs"] == {"ways": 2, "er": fscs["er_mean"], "miou": fscs["miou_mean"]}
    assert result["protocol"]["fscs_ways"] == 2
    assert 0.0 <= result["results"]["fold0"]["1shot"]["miou_mean"] <= 1.0  # the 1-way score beside it


def test_fscs_training_without_its_validation_lists_is_refused(data, capsys: pytest.CaptureFixture[str]):
    root, args = data
    lists = root / "no_way_lists"
    assert main(["episodes", *args, "--set", "episodes.ways=1", "--set", f"episodes.out={lists}"]) == 0
    sets = ["--set", "train.task=fscs", "--set", f"episodes.out={lists}", "--set", f"train.out={root / 'refused'}"]
    assert main(["train", *args, *sets]) == 2
    err = capsys.readouterr().err
    assert "val_1way_1shot_image_seed1000.json: no FS-CS validation list" in err and "episodes.ways=N" in err


def test_fscs_training_starts_from_an_fss_checkpoint(data, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`train.init`: the FS-CS run's first step sees the FS-S checkpoint's weights, not the fresh model's; a
    checkpoint of another method or fold, or a missing one, is refused naming the file; stage 1 refuses it."""
    root, args = data
    sets = [a for a in args[3:] if a != "--set"]
    train_meta(load_config(None, [*sets, f"train.out={tmp_path / 'fss'}"]), 0, progress=False)
    start = tmp_path / "fss" / "fold0" / "asnet-1shot" / "best.pt"
    payload = read_checkpoint(start)
    expected = payload["model"]
    seen: list[dict[str, torch.Tensor]] = []

    def observe(loss_fn):
        def watched(model: nn.Module, episode: FSCSEpisode) -> dict[str, torch.Tensor]:
            if not seen:
                seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return loss_fn(model, episode)
        return watched

    fscs = [*sets, "train.task=fscs", f"train.out={tmp_path / 'fscs'}"]
    train_meta(load_config(None, [*fscs, f"train.init={start}"]), 0, progress=False, observe=observe)
    assert seen[0].keys() == expected.keys()
    assert all(torch.equal(seen[0][k], expected[k]) for k in expected)
    fresh = fresh_model(load_config(None, fscs), 0, 1).state_dict()
    assert any(not torch.equal(fresh[k], expected[k]) for k in expected)  # so the check above could fail

    for name, changes, message in (
            ("hsnet.pt", {"model": {"method": "hsnet"}, "episodes": {"ways": 1}}, "method 'hsnet', this run 'asnet'"),
            ("fold1.pt", {"train": {"fold": 1}}, "fold 'fold1', this run 'fold0'")):
        config = {**payload["config"], **{section: {**payload["config"][section], **values}
                                          for section, values in changes.items()}}
        torch.save({**payload, "config": config}, tmp_path / name)
        run = ["--set", "train.task=fscs", "--set", f"train.init={tmp_path / name}",
               "--set", f"train.out={tmp_path / name}.runs"]
        assert main(["train", *args, *run]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name} (train.init): trained with another setting: {message}" in err
        assert not (tmp_path / f"{name}.runs" / "fold0" / "asnet-1shot" / "last.pt").exists()
    assert main(["train", *args, "--set", f"train.init={tmp_path / 'none.pt'}", "--set",
                 f"train.out={tmp_path / 'none'}"]) == 2
    assert f"{tmp_path / 'none.pt'}: checkpoint not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train_base: init: stage 1 starts from"):
        load_config(None, [f"train_base.init={start}"])


# --------------------------------------------------------------------------------------------- N-way prediction

def nway_arrays(ways: int = 2, shot: int = 1, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """A random 50x70 query and `ways` x `shot` random 40x60 supports (way-major), each with a 0/1 box mask of
    its own place."""
    rng = np.random.default_rng(seed)
    query = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    supports, masks = [], []
    for i in range(ways * shot):
        supports.append(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
        mask = np.zeros((40, 60), np.uint8)
        mask[4 + 3 * i : 26 + 3 * i, 8 + 4 * i : 40 + 4 * i] = 1
        masks.append(mask)
    return query, supports, masks


def asnet_config(**sections: object) -> Config:
    return Config(**{"model": tiny_cfg("asnet"), "eval": EvalConfig(test_size=65), **sections})


@pytest.mark.parametrize("eval_cfg", [EvalConfig(test_size=65), EvalConfig(test_size=65, canvas="mean"),
                                      EvalConfig(resolution="resized", resized_size=65)],
                         ids=["bam canvas", "mean canvas", "resized"])
def test_nway_prediction_is_the_scored_prediction(eval_cfg: EvalConfig):
    """`segment_ways` = the model's N-way forward on the evaluation's transform, resampled as evaluation scores
    it (`score_logits`), softmaxed; its presence is the forward's; swapping the ways swaps their channels."""
    cfg = asnet_config(eval=eval_cfg)
    model = make_model("asnet").eval()
    query, supports, masks = nway_arrays()
    probs, presence = segment_ways(model, cfg, 1, 2, query, supports, masks)
    assert probs.shape == (3, 50, 70) and probs.dtype == np.float32 and presence.shape == (2,)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    transform = scoring_transform(cfg)
    query_img, query_mask = transform(query, np.zeros((50, 70), np.uint8))
    pairs = [transform(image, mask) for image, mask in zip(supports, masks, strict=True)]
    episode = FSCSEpisode(torch.stack([p[0] for p in pairs]).view(1, 2, 1, 3, 65, 65),
                          torch.stack([p[1] for p in pairs]).view(1, 2, 1, 65, 65), query_img[None], query_mask[None],
                          torch.tensor([[-1, -1]]), torch.zeros(1, 2, dtype=torch.bool))
    with torch.no_grad():
        out = model(episode)
    expected = transform.score_logits(out.logits, (50, 70))[0].softmax(0).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert presence.tolist() == out.presence[0].tolist()
    assert (class_labels(probs) == expected.argmax(0)).mean() > 0.999
    swapped, swapped_presence = segment_ways(model, cfg, 1, 2, query, supports[::-1], masks[::-1])
    np.testing.assert_allclose(swapped[[0, 2, 1]], probs, atol=1e-5)  # background: the ways' mean, symmetric
    assert swapped_presence.tolist() == presence.tolist()[::-1]


def test_nway_prediction_refuses_what_it_cannot_do():
    query, supports, masks = nway_arrays()
    with pytest.raises(RequestError, match=r"ways 2: this bam model segments one class at a time; N-way .*\(asnet\)"):
        segment_ways(None, Config(), 1, 2, query, supports, masks)
    with pytest.raises(RequestError, match=r"ways 2: a 1-shot model takes 1 support image\(s\) per class, 2 in all "
                                           r".*got 3"):
        check_way_supports(1, 2, [*supports, supports[0]], [*masks, masks[0]])
    with pytest.raises(RequestError, match=r"support_masks\[1\]: the mask has no foreground pixel"):
        check_way_supports(1, 2, supports, [masks[0], np.zeros_like(masks[1])])
    with pytest.raises(RequestError, match="ways: expected a positive integer, got 0"):
        check_way_supports(1, 0, supports, masks)
    with pytest.raises(RequestError, match="this is a 1-shot model: it takes 1 support image.s., got 2"):
        check_way_supports(1, 1, supports, masks)  # one way: the 1-way messages


def decoded(value: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(value))) as image:
        return np.asarray(image)


def test_served_nway_rows_answer_labels_and_presence():
    cfg = asnet_config()
    model = make_model("asnet").eval()
    query, supports, masks = nway_arrays()
    row = {"query_img": png_base64(query), "support_imgs": [png_base64(s) for s in supports],
           "support_masks": [png_base64(m * 255) for m in masks], "ways": 2}
    out = segment_record(model, cfg, 1, row, "row 0")
    probs, presence = segment_ways(model, cfg, 1, 2, query, supports, masks)
    labels = decoded(out["labels"])
    assert np.array_equal(labels, class_labels(probs))
    assert out["presence"] == presence.tolist() and (out["height"], out["width"]) == (50, 70)
    assert out["class_fractions"] == [float((labels == n).mean()) for n in (1, 2)]
    assert np.array_equal(decoded(out["mask"]), (labels > 0).astype(np.uint8) * 255)
    assert out["foreground_fraction"] == float((labels > 0).mean())
    one_way = {**row, "support_imgs": row["support_imgs"][:1], "support_masks": row["support_masks"][:1]}
    assert "labels" not in segment_record(model, cfg, 1, {**one_way, "ways": None}, "row 0")  # null: one class
    with pytest.raises(RequestError, match=r"row 0: ways 2: a 1-shot model takes 1 support image\(s\) per class"):
        segment_record(model, cfg, 1, one_way, "row 0")


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow's, not ours
def test_nway_predict_from_a_checkpoint_and_served_from_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]):
    """`fssmeta predict --ways 2` writes the labels (palette, value n = class n), the overlay and each class's
    presence; the registered model, loaded as `mlflow models serve` loads it, answers an N-way row the same."""
    import mlflow
    import pandas as pd

    from fssmeta.integrations.registry import register_model

    mlflow_cfg = local_mlflow(tmp_path, monkeypatch, "fss-ways")
    cfg = asnet_config(mlflow=mlflow_cfg)
    checkpoint = save_model(cfg, tmp_path / "best.pt", seed=0)
    query, supports, masks = nway_arrays()
    paths = {"query": tmp_path / "q.png"}
    paths["query"].write_bytes(encode(query))
    args = ["predict", "--params", "none", "--model", str(checkpoint), "--ways", "2", "--query", str(paths["query"]),
            "--out", str(tmp_path / "out")]
    for i, (support, mask) in enumerate(zip(supports, masks, strict=True)):
        (tmp_path / f"s{i}.png").write_bytes(encode(support))
        (tmp_path / f"m{i}.png").write_bytes(encode(mask * 255))
        args += ["--support", f"{tmp_path / f's{i}.png'}:{tmp_path / f'm{i}.png'}"]
    assert main(args) == 0
    assert "q.png (70x50): classes present: " in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert (summary["method"], summary["ways"], [s["way"] for s in summary["supports"]]) == ("asnet", 2, [1, 2])
    entry = summary["queries"][0]
    with Image.open(tmp_path / "out" / "q_labels.png") as image:
        assert (image.mode, image.size) == ("P", (70, 50))
        labels = np.asarray(image)
    with Image.open(tmp_path / "out" / "q_overlay.png") as image:
        assert (image.mode, image.size) == ("RGB", (70, 50))
    torch.manual_seed(0)
    model = build_model(cfg.model, shot=1, base_classes=BASE_CLASSES).eval()  # save_model's weights
    probs, presence = segment_ways(model, cfg, 1, 2, query, supports, masks)
    assert np.array_equal(labels, class_labels(probs)) and entry["presence"] == presence.tolist()
    assert entry["class_fractions"] == [float((labels == n).mean()) for n in (1, 2)]
    assert main(args[:-2]) == 2  # one support pair short
    assert "error: ways 2: a 1-shot model takes 1 support image(s) per class, 2 in all" in capsys.readouterr().err

    register_model(cfg, checkpoint=checkpoint, metrics={"miou": 0.1}, tags={}, fold=0, shot=1,
                   base_classes=BASE_CLASSES)
    mlflow.set_tracking_uri(mlflow_cfg.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/fss-ways/1")
    row = {"query_img": png_base64(query), "support_imgs": [png_base64(s) for s in supports],
           "support_masks": [png_base64(m * 255) for m in masks], "ways": 2}
    answer = served.predict(pd.DataFrame([row, {**row, "ways": None, "support_imgs": row["support_imgs"][:1],
                                                "support_masks": row["support_masks"][:1]}]))
    assert np.array_equal(decoded(answer[0]["labels"]), labels) and answer[0]["presence"] == entry["presence"]
    assert "labels" not in answer[1] and answer[1]["height"] == 50  # a 1-way row beside it
