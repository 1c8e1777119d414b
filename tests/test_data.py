"""Episode sampler properties, sinusoid tasks, and the Omniglot reader on fake zips."""

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from metatl.data import EpisodeSampler, SinusoidTasks, TensorClassPool
from metatl.data import omniglot as omni


def pool(n_classes=10, per_class=8):
    x = torch.arange(n_classes * per_class, dtype=torch.float32).view(-1, 1)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    return TensorClassPool(x, y), x, y


def test_episode_structure_and_label_remapping():
    p, x, y = pool()
    s = EpisodeSampler(p, ways=5, shots=2, queries=3)
    ep = s.sample(torch.Generator().manual_seed(0))
    assert ep.support_x.shape == (10, 1) and ep.query_x.shape == (15, 1)
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_y.tolist() == sum([[c] * 3 for c in range(5)], [])
    # every remapped class is one original class, distinct across the episode
    orig = lambda v: y[v.long().flatten()]  # x values are indices into y  # noqa: E731
    s_orig, q_orig = orig(ep.support_x), orig(ep.query_x)
    mapping = {}
    for lab, o in zip(torch.cat([ep.support_y, ep.query_y]), torch.cat([s_orig, q_orig])):
        assert mapping.setdefault(int(lab), int(o)) == int(o)
    assert len(set(mapping.values())) == 5
    # support and query are disjoint
    assert not set(ep.support_x.flatten().tolist()) & set(ep.query_x.flatten().tolist())


def test_same_seed_same_episodes_other_seed_other_episodes():
    p, _, _ = pool()
    s = EpisodeSampler(p, ways=3, shots=1, queries=2)
    a = s.sample_batch(4, torch.Generator().manual_seed(7))
    b = s.sample_batch(4, torch.Generator().manual_seed(7))
    c = s.sample_batch(4, torch.Generator().manual_seed(8))
    assert all(torch.equal(u.support_x, v.support_x) and torch.equal(u.query_x, v.query_x) for u, v in zip(a, b))
    assert not all(torch.equal(u.support_x, v.support_x) for u, v in zip(a, c))


def episode_one_class_at_a_time(pool, ways, shots, queries, generator):
    """The sampler's episode written out plainly: the classes, then per class its examples from
    ``pool.get`` (support first), as many draws from ``generator`` and in the same order."""
    classes = torch.randperm(len(pool), generator=generator)[:ways].tolist()
    xs = [pool.get(c, torch.randperm(pool.counts[c], generator=generator)[: shots + queries]) for c in classes]
    labels = torch.arange(ways)
    return (
        torch.cat([x[:shots] for x in xs]),
        labels.repeat_interleave(shots),
        torch.cat([x[shots:] for x in xs]),
        labels.repeat_interleave(queries),
    )


@pytest.mark.parametrize("queries", [0, 3])
def test_a_batch_of_episodes_gathered_at_once_equals_one_class_at_a_time(queries):
    """``sample_batch`` gathers a meta-batch's examples in one call (Omniglot's rotated classes:
    one gather and one rotation per angle); the episodes are those of the plain per-class loop,
    rotations included, and each is its own slice."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 6, 5, 5), dtype=torch.uint8, generator=g)
    names = [f"a/c{i}" for i in range(7)]
    for p in (omni.OmniglotClasses(images, names, names[1:6]), pool(n_classes=9, per_class=6)[0]):
        batch = EpisodeSampler(p, ways=4, shots=2, queries=queries).sample_batch(5, torch.Generator().manual_seed(3))
        reference = torch.Generator().manual_seed(3)
        for ep in batch:
            expected = episode_one_class_at_a_time(p, 4, 2, queries, reference)
            assert all(
                torch.equal(a, b) for a, b in zip((ep.support_x, ep.support_y, ep.query_x, ep.query_y), expected)
            )
    x = omni.OmniglotClasses(images, names, names[1:6]).get_many([(6, torch.tensor([4, 0])), (3, torch.tensor([2]))])
    assert torch.equal(x[:2, 0], torch.rot90(images[2, [4, 0]], 2, dims=(1, 2)).float() / 255)
    assert torch.equal(x[2:, 0], torch.rot90(images[1, [2]], 3, dims=(1, 2)).float() / 255)


def test_sampler_rejects_impossible_episodes_with_a_fix():
    p, _, _ = pool(n_classes=4, per_class=5)
    with pytest.raises(ValueError, match="only 4.*lower `ways`"):
        EpisodeSampler(p, ways=5, shots=1, queries=1)
    with pytest.raises(ValueError, match="smallest class.*lower `shots` or `queries`"):
        EpisodeSampler(p, ways=2, shots=3, queries=3)


def test_from_dataset():
    data = [(torch.full((2,), float(i)), i % 3) for i in range(12)]
    p = TensorClassPool.from_dataset(data)
    assert len(p) == 3 and p.counts == [4, 4, 4]


def test_sinusoid_tasks_follow_the_maml_distribution():
    tasks = SinusoidTasks(shots=5, queries=7)
    g = torch.Generator().manual_seed(0)
    amps, phases = [], []
    for _ in range(500):
        ep, (a, phi) = tasks.sample_task(g)
        assert ep.support_x.shape == (5, 1) and ep.query_y.shape == (7, 1)
        assert torch.allclose(ep.support_y, a * torch.sin(ep.support_x - phi), atol=1e-5)
        assert ep.support_x.abs().max() <= 5
        amps.append(a)
        phases.append(phi)
    assert 0.1 <= min(amps) and max(amps) <= 5.0 and 0 <= min(phases) and max(phases) <= np.pi
    assert abs(np.mean(amps) - 2.55) < 0.2 and abs(np.mean(phases) - np.pi / 2) < 0.2


def _png(rng):
    ink = rng.random((105, 105)) > 0.9
    im = Image.fromarray(~ink).convert("1")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def fake_omniglot(root, n_alphabets=2, n_chars=3, drawers=20, seed=0):
    """Zips shaped like the official ones, with random strokes."""
    rng = np.random.default_rng(seed)
    (root / "omniglot").mkdir(parents=True, exist_ok=True)
    char_id = 1
    for part in omni.PARTS:
        with zipfile.ZipFile(root / "omniglot" / f"{part}.zip", "w") as z:
            for a in range(n_alphabets):
                for c in range(1, n_chars + 1):
                    for d in range(1, drawers + 1):
                        z.writestr(f"{part}/Alpha{part[7]}{a}/character{c:02d}/{char_id:04d}_{d:02d}.png", _png(rng))
                    char_id += 1
    return root


def test_omniglot_reader_on_a_fake_zip(tmp_path, monkeypatch):
    root = fake_omniglot(tmp_path / "data")
    monkeypatch.setattr(
        omni, "ACCEPTED", {p: (omni.file_digests(root / "omniglot" / f"{p}.zip")["sha256"],) for p in omni.PARTS}
    )
    monkeypatch.setattr(omni, "N_CHARACTERS", 12)
    images, names = omni.load_images(root, image_size=28)
    assert images.shape == (12, 20, 28, 28) and images.dtype == torch.uint8
    assert names[0] == "Alphab0/character01" and len(set(names)) == 12
    # ink is high, background low, after resizing
    assert images.float().mean() < 128
    import os

    key = omni.file_digests(root / "omniglot" / "images_background.zip")["sha256"][:8]
    cached = list((omni.user_cache_dir()).glob(f"omniglot_28px_{key}_*.pt"))
    assert len(cached) == 1 and str(cached[0]).startswith(os.environ["XDG_CACHE_HOME"])
    images2, names2 = omni.load_images(root, image_size=28)  # from the cache
    assert torch.equal(images, images2) and names == names2
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # a truncated cache is rebuilt, with a warning
    with pytest.warns(UserWarning, match="unreadable.*decoding the zips again"):
        images3, _ = omni.load_images(root, image_size=28)
    assert torch.equal(images, images3)
    assert torch.equal(omni.load_images(root, image_size=28)[0], images)  # the new cache reads
    classes = omni.OmniglotClasses(images, names, names[:3])
    assert len(classes) == 12  # 3 characters x 4 rotations
    x0 = classes.get(0, torch.arange(2))
    x1 = classes.get(1, torch.arange(2))
    assert x0.shape == (2, 1, 28, 28) and 0 <= x0.min() and x0.max() <= 1
    assert torch.equal(torch.rot90(x0, 1, dims=(2, 3)), x1)


def test_omniglot_missing_and_corrupt_files_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--download"):
        omni.load_images(tmp_path, 28)
    (tmp_path / "omniglot").mkdir()
    for p in omni.PARTS:
        (tmp_path / "omniglot" / f"{p}.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an accepted checksum.*download it again"):
        omni.load_images(tmp_path, 28)
    monkeypatch.setattr(
        omni, "ACCEPTED", {p: (omni.file_digests(tmp_path / "omniglot" / f"{p}.zip")["md5"],) for p in omni.PARTS}
    )
    with pytest.raises(ValueError, match="not a readable zip"):
        omni.load_images(tmp_path, 28)


def test_vinyals_and_maml_splits_partition_the_characters():
    names = [f"A/c{i:04d}" for i in range(1623)]
    train, val, test = (omni.split_characters(names, "maml", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert not (set(train) & set(val)) and not (set(train) | set(val)) & set(test)
    vin = [omni.split_characters(names, "vinyals", s) for s in ("train", "val", "test")]
    assert [len(v) for v in vin] == [1028, 172, 423]
    assert len(set(sum(vin, []))) == 1623
    assert omni.split_characters(names, "vinyals", "trainval") == vin[0] + vin[1]  # the papers' 1200
    with pytest.raises(ValueError, match="vinyals"):
        omni.split_characters(names, "other", "train")


@pytest.mark.data
def test_real_omniglot(omniglot_dir):
    images, names = omni.load_images(omniglot_dir, 28)
    assert images.shape == (1623, 20, 28, 28)
    for split, sizes in (("vinyals", (1028, 172, 423)), ("maml", (1100, 100, 423))):
        for subset, n in zip(("train", "val", "test"), sizes):
            assert len(omni.OmniglotClasses(images, names, omni.split_characters(names, split, subset))) == 4 * n
    from metatl.config import from_dict
    from metatl.data import build_sampler

    for subset, n in (("train", 1028), ("trainval", 1200)):  # data.train_subset reaches the Omniglot pool
        cfg = from_dict(
            {
                "data": {"name": "omniglot", "data_dir": str(omniglot_dir), "train_subset": subset},
                "train": {"val_every": 0},
            }
        ).data
        assert len(build_sampler(cfg, "train").pool) == 4 * n


def test_the_sinusoid_draws_its_tasks_and_an_episode_sampler_does_not(tmp_path):
    from metatl.engine.plots import plt, task_plots

    class Learner:  # records the inner steps asked for; its prediction after s steps is s * x
        steps = []

        def adapt(self, support_x, support_y, steps):
            self.steps.append(steps)
            return lambda x: steps * x

    tasks = SinusoidTasks(shots=4, queries=3)
    fig, ax = plt.subplots()
    tasks.draw_task(ax, Learner(), torch.Generator().manual_seed(5))
    ep, (a, phi) = tasks.sample_task(torch.Generator().manual_seed(5))  # the task it drew
    truth, support, *predictions = ax.get_lines()
    x = truth.get_xdata()
    assert x.min() == -5 and x.max() == 5 and np.allclose(truth.get_ydata(), a * np.sin(x - phi), atol=1e-5)
    assert np.allclose(support.get_xdata(), ep.support_x.flatten()) and np.allclose(
        support.get_ydata(), ep.support_y.flatten()
    )
    assert Learner.steps == [0, 1, 10] and [line.get_label() for line in predictions] == [
        "pre-update",
        "1 grad step",
        "10 grad steps",
    ]
    assert np.allclose(predictions[2].get_ydata(), 10 * x)
    plt.close(fig)
    path = task_plots(Learner(), tasks, tmp_path / "sinusoid_tasks.png", n_tasks=2, seed=1)
    assert path.read_bytes()[:4] == b"\x89PNG" and len(Learner.steps) == 3 + 2 * 3
    assert not hasattr(EpisodeSampler(pool()[0], ways=2, shots=1, queries=1), "draw_task")  # engine/run.py asks this
