"""distill: the KD loss falls, runs are deterministic, resume is exact, every loss term is used."""

import copy

import pytest
import torch
from conftest import tiny_vit
from torch.utils.data import Dataset

import vitslim
from vitslim.errors import VitslimError
from vitslim.io.image_dataset import UNLABELLED
from vitslim.train import Training, distill

DISTILL_GEOMETRY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
FAST = dict(lr=3e-3, batch_size=8, progress=False)


class RandomImages(Dataset):
    """Seeded random images with labels; the indices in ``unreadable`` decode to None."""

    def __init__(self, count=32, seed=0, unreadable=()):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, 5, (count,), generator=generator).tolist()
        self.unreadable = set(unreadable)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return (None if index in self.unreadable else self.images[index]), self.labels[index]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and a busy shared machine slows two a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(RandomImages(8))


def _kl(student, teacher, data):
    images = torch.stack([image for image, _ in data if image is not None])
    with torch.no_grad():
        log_s = torch.log_softmax(vitslim.describe(student).output(images), -1)
        log_t = torch.log_softmax(vitslim.describe(teacher).output(images), -1)
    return float(torch.nn.functional.kl_div(log_s, log_t, reduction="batchmean", log_target=True))


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_kd_loss_falls_toward_the_teacher_and_unreadable_images_are_skipped():
    teacher = tiny_vit(0, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    student = tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    data = RandomImages(unreadable={3})
    before = _kl(student, teacher, data)
    teacher_before = copy.deepcopy(teacher.state_dict())
    returned = distill(student, teacher, data, Training(epochs=4, **FAST), warmup_fraction=0.1)
    assert returned is student and not student.training
    assert _kl(student, teacher, data) < 0.5 * before
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_two_runs_with_one_seed_give_identical_weights_and_another_seed_does_not():
    teacher = tiny_vit(0, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    start = tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    runs = [distill(copy.deepcopy(start), teacher, RandomImages(), Training(epochs=2, seed=seed, **FAST)) for seed in (7, 7, 8)]
    assert _same_weights(runs[0], runs[1])
    assert not _same_weights(runs[0], runs[2])


def test_resume_after_an_interruption_ends_with_the_uninterrupted_weights(tmp_path):
    teacher = tiny_vit(0, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    start = tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    data = RandomImages(count=24)
    steps = {"n": 0}

    def crash_in_epoch_three(model):  # 3 steps per epoch: step 8 is the middle of epoch 3
        steps["n"] += 1
        if steps["n"] == 8:
            raise KeyboardInterrupt
        return torch.zeros(())

    reference = distill(copy.deepcopy(start), teacher, data, Training(epochs=4, **FAST), extra_loss=lambda m: torch.zeros(()))
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(start), teacher, data, Training(epochs=4, checkpoints=tmp_path, **FAST), extra_loss=crash_in_epoch_three)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002"]
    assert sorted(p.name for p in (tmp_path / "epoch-0002").iterdir()) == ["optimizer.safetensors", "state.json", "student.safetensors"]
    with pytest.raises(VitslimError, match="other settings.*lr"):
        distill(copy.deepcopy(start), teacher, data, Training(epochs=4, checkpoints=tmp_path, resume=True, **{**FAST, "lr": 1e-3}), extra_loss=lambda m: torch.zeros(()))
    resumed = distill(copy.deepcopy(start), teacher, data, Training(epochs=4, checkpoints=tmp_path, resume=True, **FAST), extra_loss=lambda m: torch.zeros(()))
    assert _same_weights(resumed, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0004"]


def test_label_term_pulls_the_student_toward_the_labels():
    teacher = tiny_vit(0, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    start = tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    data = RandomImages()
    batches = [(data.images[i:i + 8], torch.tensor(data.labels[i:i + 8])) for i in range(0, 32, 8)]  # an iterable of batches
    runs = {weight: distill(copy.deepcopy(start), teacher, batches, Training(epochs=3, **FAST), label_weight=weight) for weight in (0.0, 2.0)}
    with torch.no_grad():
        ce = {weight: float(torch.nn.functional.cross_entropy(model(data.images), torch.tensor(data.labels))) for weight, model in runs.items()}
    assert ce[2.0] < ce[0.0] - 0.1  # random labels: 1.48 vs 1.64 here
    with pytest.raises(VitslimError, match="needs labels"):
        distill(copy.deepcopy(start), teacher, [b[0] for b in batches], Training(epochs=1, **FAST), label_weight=1.0)
    unlabelled = [(images, torch.full((len(images),), UNLABELLED)) for images, _ in batches]  # as a plain image folder gives them
    with pytest.raises(VitslimError, match="training images are unlabelled"):
        distill(copy.deepcopy(start), teacher, unlabelled, Training(epochs=1, **FAST), label_weight=1.0)
    distill(copy.deepcopy(start), teacher, unlabelled, Training(epochs=1, **FAST))  # distillation alone needs no labels


def test_extra_loss_is_added_to_the_objective():
    teacher = tiny_vit(0, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    start = tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    penalty = lambda model: model.head.weight.square().sum()  # noqa: E731
    runs = [distill(copy.deepcopy(start), teacher, RandomImages(), Training(epochs=2, **FAST), extra_loss=extra) for extra in (None, penalty)]
    assert runs[1].head.weight.norm() < 0.8 * runs[0].head.weight.norm()


@pytest.mark.parametrize("data, training, kwargs, message", [
    ("dataset", {"epochs": -1}, {}, "Training.epochs must be"),
    ("dataset", {"epochs": 1, "lr": 0.0}, {}, "learning rate.* must be above 0"),
    ("empty", {"epochs": 1}, {}, "holds no images"),
    ("no-batches", {"epochs": 1}, {}, "holds no batches"),
    ("unreadable", {"epochs": 1}, {}, "no readable images"),
    ("dataset", {"epochs": 1, "resume": True}, {}, "needs Training.checkpoints"),
    ("dataset", {"epochs": 1}, {"temperature": 0.0}, "temperature must be above 0"),
    ("iterable-dataset", {"epochs": 1}, {}, "IterableDataset"),
    ("bad-batches", {"epochs": 1}, {}, "a training batch must be"),
    ("list-of-samples", {"epochs": 1}, {}, "pass single .* samples as a torch Dataset"),
])
def test_bad_inputs_are_clear_errors(data, training, kwargs, message):
    data = {"dataset": RandomImages(8), "empty": RandomImages(0), "no-batches": [], "bad-batches": ["images"], "list-of-samples": [RandomImages(8)[0]],
            "unreadable": RandomImages(8, unreadable=range(8)), "iterable-dataset": Stream()}[data]
    with pytest.raises(VitslimError, match=message):
        distill(tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY),
                tiny_vit(0, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY),
                data, Training(progress=False, **training), **kwargs)


def test_a_teacher_with_other_classes_or_inputs_is_refused():
    with pytest.raises(VitslimError, match="same classes"):
        distill(tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY),
                tiny_vit(0, name="vit_tiny_patch16_224", **(DISTILL_GEOMETRY | {"num_classes": 7})),
                RandomImages(8), Training(epochs=1, progress=False))
    with pytest.raises(VitslimError, match="different inputs"):
        distill(tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY),
                tiny_vit(0, name="vit_tiny_patch16_224", **(DISTILL_GEOMETRY | {"img_size": 32})),
                RandomImages(8), Training(epochs=1, progress=False))


def test_zero_epochs_returns_the_student_untouched_in_eval_mode():
    teacher = tiny_vit(0, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY)
    student = tiny_vit(1, name="vit_tiny_patch16_224", **DISTILL_GEOMETRY).train()
    before = copy.deepcopy(student)
    assert not distill(student, teacher, RandomImages(8), Training(epochs=0, progress=False)).training
    assert _same_weights(student, before)
