"""Real photos people took, through training (--photos, the partial-label loss, resume), the CLI
and the service: the CC0 photos in tests/data/photos (README there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import post_image, quiet, running_server, small_config
from PIL import Image

from fmnist.cli import main
from fmnist.config import resolve_train
from fmnist.data import CLASS_NAMES, BatchSampler, Normalization
from fmnist.data.photos import ACCEPTED, accepted_mask, find_photos_dir, list_photos
from fmnist.inference import photo_sets
from fmnist.inference.photo_sets import load_photo_set, photo_view
from fmnist.run import load_network
from fmnist.training.loop import train
from fmnist.training.photos import PhotoMix, label_weights, set_accuracy, set_loss

PHOTOS = Path(__file__).parent / "data" / "photos"
LABELLED = sorted(p for p in PHOTOS.glob("*.jpg") if p.stem != "blank-floor")
BLANK = PHOTOS / "blank-floor.jpg"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_set_loss_of_one_class_sets_is_cross_entropy(smoothing):
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert torch.allclose(set_loss(logits, F.one_hot(labels, 10).bool(), smoothing), expected, atol=1e-6)


def test_the_set_loss_of_a_larger_set_is_minus_log_of_its_summed_probability():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    accepted = torch.zeros(4, 10, dtype=torch.bool)
    accepted[:, [2, 6]] = True  # a long sleeve: Pullover or Shirt
    p = logits.softmax(1)
    assert torch.allclose(set_loss(logits, accepted), -(p[:, 2] + p[:, 6]).log().mean(), atol=1e-6)
    assert set_accuracy(torch.eye(10)[[2, 6, 0, 9]], accepted) == 0.5


@pytest.mark.parametrize("balance, shares", [(0.0, [0.75, 0.25]), (0.5, [0.634, 0.366]), (1.0, [0.5, 0.5])])
def test_photo_balance_draws_each_label_in_proportion_to_its_count_to_the_power_1_minus_b(balance, shares):
    labels = ["t-shirt"] * 300 + ["outwear"] * 100  # 3^(1-B) to 1
    sampler = BatchSampler(400, 64, seed=0, device=torch.device("cpu"), weights=label_weights(labels, balance))
    drawn = torch.cat([sampler.next() for _ in range(500)])
    assert (drawn < 300).float().mean().item() == pytest.approx(shares[0], abs=0.01)
    assert drawn.unique().numel() == 400  # every photo still drawn


def test_a_weighted_sampler_goes_on_where_it_left_off():
    weights = label_weights(["a"] * 7 + ["b"] * 3, 1.0)
    straight = BatchSampler(10, 4, seed=3, device=torch.device("cpu"), weights=weights)
    resumed = BatchSampler(10, 4, seed=3, device=torch.device("cpu"), weights=weights)
    for _ in range(3):
        assert torch.equal(straight.next(), resumed.next())
    state = resumed.state_dict()
    again = BatchSampler(10, 4, seed=99, device=torch.device("cpu"), weights=weights)
    again.load_state_dict(state)
    assert all(torch.equal(straight.next(), again.next()) for _ in range(10))


def test_labels_map_to_their_accepted_classes_and_classless_labels_are_left_out(photo_folder):
    assert [CLASS_NAMES[i] for i in np.flatnonzero(accepted_mask("longsleeve"))] == ["Pullover", "Shirt"]
    assert [CLASS_NAMES[i] for i in np.flatnonzero(accepted_mask("shoes"))] == ["Sandal", "Sneaker", "Ankle boot"]
    assert not accepted_mask("hat").any() and set(ACCEPTED) >= {"polo", "blouse", "hoodie", "blazer"}
    files = list_photos(photo_folder, "train")
    assert "hat" not in files.labels and len(files) == len(LABELLED) + 1  # + the blank floor
    assert len(list_photos(photo_folder, "test")) == 0


def test_prepared_photos_are_cached_and_nothing_found_is_left_out(photo_folder, tmp_path):
    first = load_photo_set(photo_folder, "train")
    assert len(first) == len(LABELLED) and first.refused == 1 and first.images.dtype == np.uint8
    assert len(list((tmp_path / "cache" / "fmnist" / "photos").glob("*.npz"))) == 1
    again = load_photo_set(photo_folder, "train")
    assert np.array_equal(again.images, first.images) and again.labels == first.labels
    assert np.array_equal(again.accepted, first.accepted) and again.refused == 1


def test_other_views_of_each_photo_are_prepared_drawn_the_same_each_time_and_cached(photo_folder, tmp_path,
                                                                                     monkeypatch):
    one = load_photo_set(photo_folder, "train")
    three = load_photo_set(photo_folder, "train", views=3)
    assert one.views is None and np.array_equal(three.images, one.images) and three.labels == one.labels
    assert three.views.shape == (len(one), 2, 28, 28) and three.views.dtype == np.uint8
    assert all(view.min() == 0 and view.max() >= 160 for view in three.views.reshape(-1, 28, 28))  # light on black
    differ = [not np.array_equal(view, first) for views, first in zip(three.views, one.images, strict=True)
              for view in views]
    assert sum(differ) >= len(differ) - 1  # another framing, light and colour: another image
    assert len(list((tmp_path / "cache" / "fmnist" / "photos").glob("*.npz"))) == 2
    monkeypatch.setattr(photo_sets, "PER_WORKER", 1)  # prepared on threads this time
    fresh = load_photo_set(photo_folder, "train", views=3, use_cache=False)
    assert np.array_equal(fresh.views, three.views)  # drawn from a fixed seed: any run, the same views
    assert np.array_equal(fresh.images, three.images) and fresh.files == three.files


def test_a_view_keeps_only_what_the_camera_saw():
    """However it is turned and framed, a view of an even grey picture is even: none of the
    rotated frame's empty corners is kept."""
    picture = Image.new("RGB", (300, 400), (120, 140, 160))
    for seed in range(40):
        view = np.asarray(photo_view(picture, np.random.default_rng(seed)))
        spread = view.max((0, 1)).astype(int) - view.min((0, 1))  # per colour channel
        assert view.shape[0] >= 0.3 * 0.7 * 0.8 * 400 and spread.max() <= 2, seed


def test_views_join_the_photos_drawn_into_batches(photo_folder):
    photos = load_photo_set(photo_folder, "train", views=3)
    norm = Normalization(mean=0.0, std=1.0)
    mix = PhotoMix(photos, norm, per_batch=4, seed=0, device=torch.device("cpu"))
    assert len(mix.images) == 3 * len(photos) and len(mix.accepted) == 3 * len(photos)
    assert torch.equal(mix.accepted[len(photos):2 * len(photos)], torch.as_tensor(photos.accepted))
    assert torch.equal(mix.raw, torch.as_tensor(photos.images))  # the flag's bank: the photos as taken


def test_the_photos_folder_is_required_and_named_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FMNIST_PHOTOS", raising=False)
    assert main(["train", "--preset", "photo", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmnist: error: --photos is needed") and "clothing-dataset-small" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
    monkeypatch.setenv("FMNIST_PHOTOS", str(tmp_path))
    with pytest.raises(Exception, match="no train/ folder"):
        find_photos_dir(None)


def test_training_with_photos_resumes_bit_for_bit(photo_folder, shared_synthetic_dir, tmp_path):
    """8 steps straight, and 4 then 4 more after a resume: the photo sampler's place is in the
    checkpoint, so both give the same weights; model.json has the photos' validation figure."""
    flags = dict(photos=str(photo_folder), photo_share=0.25, checkpoint_every=4, tta=True)
    straight = train(small_config(shared_synthetic_dir, tmp_path / "straight", steps=8, **flags),
                     progress=False, log=quiet)
    train(small_config(shared_synthetic_dir, tmp_path / "halves", steps=4, **flags), progress=False, log=quiet)
    train(resolve_train(resume=str(tmp_path / "halves"), steps=8), progress=False, log=quiet)
    a, meta = load_network(straight.run_dir)
    b, _ = load_network(tmp_path / "halves")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert 0.0 <= meta.metrics["photo_val_accuracy"] <= 1.0
    assert meta.calibration["ood"]["threshold"] > 0


def test_a_folder_of_real_photos_through_the_cli(tiny_run, capsys):
    """Every labelled photo answered, the blank floor on a line of its own, exit 0."""
    code = main(["predict", "--model", str(tiny_run), *map(str, LABELLED + [BLANK]), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    answer = json.loads(out)
    entries = answer["predictions"]
    assert answer["trained_on_photos"] is False  # tiny_run trained on the images alone
    assert [e["file"] for e in entries] == [str(p) for p in LABELLED + [BLANK]]
    assert all(len(e["top"]) == 3 and isinstance(e["in_distribution"], bool) for e in entries[:-1])
    assert "no object found" in entries[-1]["error"]


def test_real_photos_through_the_service(tiny_run):
    pytest.importorskip("fastapi")
    with running_server(tiny_run) as server:
        for path in LABELLED:
            status, answer = post_image(server, path.read_bytes(), "/v1/predict")
            assert status == 200 and len(answer["top"]) == 3, (path.name, answer)
        status, answer = post_image(server, BLANK.read_bytes(), "/v1/predict")
        assert status == 422 and "no object found" in answer["detail"]
