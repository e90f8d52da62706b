from __future__ import annotations

import numpy as np
import torch

from crossmodal.features import ModalityInputs, extract_features, text_variants
from crossmodal.models.text import create_text_tower
from crossmodal.pipeline import open_dataset


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
