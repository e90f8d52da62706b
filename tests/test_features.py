from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from crossmodal.data import open_dataset
from crossmodal.features import ModalityInputs, extract_features, text_variants
from crossmodal.models.text import create_text_tower


def test_text_variants_put_the_joined_text_first(workdir):
    dataset = open_dataset("tiny_colours")
    texts, offsets = text_variants(dataset)
    assert len(offsets) == len(dataset) + 1
    assert offsets[0] == 0 and offsets[-1] == len(texts)
    caps = dataset.captions(5)
    assert texts[offsets[5] : offsets[6]] == [" ; ".join(caps), *caps]


def test_variant_sampling_stays_within_each_item(workdir):
    dataset = open_dataset("tiny_colours")
    texts, offsets = text_variants(dataset)
    feats = torch.arange(len(texts), dtype=torch.float32)[:, None]  # row number as the feature
    source = ModalityInputs("text", dataset, None, feats, None, offsets)
    items = np.arange(20)
    joined = source.batch(items, torch.device("cpu"))[:, 0].long().numpy()
    assert np.array_equal(joined, offsets[items])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        rows = source.batch(items, torch.device("cpu"), rng)[:, 0].long().numpy()
        assert np.all((rows >= offsets[items]) & (rows < offsets[items + 1]))
        seen.update((rows - offsets[items]).tolist())
    assert seen == {0, 1, 2}  # every variant of a two-caption item gets drawn


def test_frozen_text_features_are_cached_per_variant(workdir, tmp_path):
    dataset = open_dataset("tiny_colours")
    tower = create_text_tower("minilm")
    desc = {"name": "minilm"}
    small = dataset.table.select(range(6))
    from crossmodal.data import CrossModalDataset

    ds = CrossModalDataset(small, dataset.info)
    feats, offsets = extract_features(ds, "text", tower, desc, tmp_path, variants=True)
    per_item = extract_features(ds, "text", tower, desc, tmp_path)
    assert feats.shape == (offsets[-1], 384)
    assert torch.equal(per_item, feats[torch.from_numpy(offsets[:-1])])
    assert len(list(tmp_path.glob("*.npy"))) == 1  # one cache file serves both
    with torch.no_grad():
        direct = tower(**tower.tokenize([" ; ".join(ds.captions(2))]))
    torch.testing.assert_close(per_item[2:3], direct, atol=1e-5, rtol=1e-4)


def test_dataset_fingerprint_is_stable_across_rebuilds_and_follows_content(workdir):
    from crossmodal.data import create_dataset

    a = create_dataset("tiny_colours")
    b = create_dataset("tiny_colours")
    assert a.fingerprint() == b.fingerprint()  # same rows built twice: runs stay valid
    assert create_dataset("tiny_colours", seed=1).fingerprint() != a.fingerprint()  # other pixels
    assert create_dataset("tiny_colours", n=95).fingerprint() != a.fingerprint()


def test_texts_come_back_in_input_order_though_batched_by_length(workdir, tmp_path):
    """Texts run shortest first; each row must still be the features of its own text."""
    from crossmodal.data import CrossModalDataset

    dataset = open_dataset("tiny_colours")
    tower = create_text_tower("minilm")
    ds = CrossModalDataset(dataset.table.select(range(10)), dataset.info)
    texts, _ = text_variants(ds)
    assert sorted(texts, key=len) != texts  # the order really changes
    feats, _ = extract_features(ds, "text", tower, {"name": "minilm"}, None, batch_size=4, variants=True)
    with torch.no_grad():
        direct = torch.cat([tower(**tower.tokenize([t])) for t in texts])
    torch.testing.assert_close(feats, direct, atol=1e-5, rtol=1e-4)


def test_two_towers_side_by_side_match_one_at_a_time(workdir, tmp_path):
    """extract_all with both towers (two worker threads) gives each tower's own features."""
    from crossmodal.data import CrossModalDataset
    from crossmodal.features import FeatureRequest, extract_all
    from crossmodal.models.image import create_image_tower

    dataset = open_dataset("tiny_colours")
    ds = CrossModalDataset(dataset.table.select(range(24)), dataset.info)
    image = create_image_tower("tiny_pool", image_size=32)
    text = create_text_tower("minilm")
    requests = [FeatureRequest("image", image, {"name": "tiny_pool"}),
                FeatureRequest("text", text, {"name": "minilm"})]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the side-by-side path needs at least two threads
    seen: list[int] = []
    try:
        both = extract_all(ds, requests, tmp_path / "both", batch_size=4, variants=True)
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start()
        fresh.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == [2]  # threads started later (an app's request threads) keep the caller's count
    alone_image = extract_features(ds, "image", image, {"name": "tiny_pool"}, None, batch_size=24)
    alone_text, offsets = extract_features(ds, "text", text, {"name": "minilm"}, None, 64, variants=True)
    torch.testing.assert_close(both["image"][0], alone_image, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(both["text"][0], alone_text, atol=1e-5, rtol=1e-4)
    assert np.array_equal(both["text"][1], offsets)
    assert len(list((tmp_path / "both").glob("*.npy"))) == 2
    again = extract_all(ds, requests, tmp_path / "both", variants=True)  # from the cache now
    assert torch.equal(again["image"][0], both["image"][0]) and torch.equal(again["text"][0], both["text"][0])


def test_a_failing_worker_raises_and_writes_no_cache(workdir, tmp_path):
    from crossmodal.data import CrossModalDataset
    from crossmodal.features import FeatureRequest, extract_all
    from crossmodal.models.image import create_image_tower

    class Broken(torch.nn.Module):
        feature_dim = 384

        def tokenize(self, texts):
            raise RuntimeError("tokenizer exploded")

    dataset = open_dataset("tiny_colours")
    ds = CrossModalDataset(dataset.table.select(range(8)), dataset.info)
    image = create_image_tower("tiny_pool", image_size=32)
    requests = [FeatureRequest("image", image, {"name": "tiny_pool"}), FeatureRequest("text", Broken(), {})]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="tokenizer exploded"):
            extract_all(ds, requests, tmp_path, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert not list(tmp_path.glob("*.npy"))


def test_a_long_extraction_says_early_how_long_it_will_take(capsys, monkeypatch):
    from crossmodal import features

    monkeypatch.setattr(features._EstimatedBar, "after_s", 0.0)
    bar = features._EstimatedBar(total=400, desc="image features", unit="input", leave=False)
    bar.update(100)
    bar.update(100)
    bar.close()
    err = capsys.readouterr()
    text = err.out + err.err
    assert text.count("image features: about") == 1  # once
    assert "left for 300 of 400 inputs" in text
    assert [features.duration(s) for s in (20, 75, 150, 5400)] == ["20 s", "75 s", "2.5 min", "1.5 h"]
