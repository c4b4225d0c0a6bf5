"""Local datasets (digits, CIFAR pickles, synthetic), FLOPs from real nonzeros, extra models."""
import pickle

import numpy as np
import pytest
import torch

import sparsekern as sk
from sparsekern import data
from sparsekern.flops import count_flops
from sparsekern.models import LeNet5, mlp, resnet20, vgg


def test_digits_split_is_deterministic_and_standardised():
    a, b = data.load_digits(seed=3), data.load_digits(seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape[1] == 64 and a.x_train.dtype == torch.float32 and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797
    assert abs(a.x_train.mean().item()) < 1e-4 and abs(a.x_train.std().item() - 1) < 0.05
    img = data.load_digits(image=True)
    assert img.input_shape == (1, 8, 8)
    assert set(a.y_train.unique().tolist()) == set(range(10))


def write_fake_cifar(root, n=20, classes=10, broken=None):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    key = "labels" if classes == 10 else "fine_labels"
    for name in names:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(root / name, "wb") as f:
            if name == broken:
                f.write(b"not a pickle")
            else:
                pickle.dump(batch, f)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_from_local_pickles(tmp_path, classes):
    write_fake_cifar(tmp_path / "c", classes=classes)
    s = data.load(f"cifar{classes}", root=tmp_path / "c")
    assert s.input_shape == (3, 32, 32) and s.num_classes == classes
    assert len(s.x_train) == (100 if classes == 10 else 20) and len(s.x_test) == 20


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist.*offline"):
        data.load("cifar10", root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="lacks"):
        data.load("cifar10", root=tmp_path / "empty")
    write_fake_cifar(tmp_path / "bad", broken="data_batch_3")
    with pytest.raises(data.DatasetError, match="data_batch_3 is not a readable"):
        data.load("cifar10", root=tmp_path / "bad")
    with pytest.raises(data.DatasetError, match="unknown dataset 'mnist'.*digits"):
        data.load("mnist")
    with pytest.raises(data.DatasetError, match="needs a data directory"):
        data.load("cifar100")


def test_synthetic_is_reproducible_and_learnable_sized():
    a = data.make_synthetic(n_train=256, n_test=64, dim=128, seed=1)
    b = data.make_synthetic(n_train=256, n_test=64, dim=128, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.input_shape == (128,) and len(a.y_train.unique()) > 3


def test_flops_follow_the_nonzeros():
    torch.manual_seed(0)
    dense = mlp((64, 256, 256, 10))
    x = torch.randn(1, 64)
    d = count_flops(dense, x)
    assert d.inference() == 2 * (64 * 256 + 256 * 256 + 256 * 10)
    # training: the first layer needs no dX
    assert d.training_step() == 2 * (2 * 64 * 256 + 3 * 256 * 256 + 3 * 256 * 10)
    sk.sparsify(dense, 0.1, "uniform")
    s = count_flops(dense, x)
    nnz = [m.nnz for m in dense.modules() if isinstance(m, sk.SparseLinear)]
    assert s.inference() == 2 * sum(nnz)
    assert s.inference() / d.inference() == pytest.approx(0.1, abs=1e-3)
    # RigL's amortised dense gradient every 100 steps
    extra = s.training_step(update_every=100) - s.training_step()
    assert extra == pytest.approx(2 * (64 * 256 + 256 * 256 + 256 * 10) / 100)


def test_conv_flops_count_output_positions():
    conv = sk.SparseConv2d(3, 8, 3, stride=2, padding=1, density=0.5)
    model = torch.nn.Sequential(conv)
    r = count_flops(model, torch.randn(2, 3, 9, 9))
    assert r.layers[0].positions == 5 * 5
    assert r.inference() == 2 * conv.nnz * 25


@pytest.mark.parametrize("make,shape", [(resnet20, (2, 3, 32, 32)), (lambda: LeNet5(image_size=8), (2, 1, 8, 8)),
                                        (lambda: vgg(cfg=(16, "M", 32, "M")), (2, 3, 16, 16))])
def test_models_run_and_sparsify(make, shape):
    model = make()
    x = torch.randn(*shape)
    assert model(x).shape == (2, 10)
    report = sk.sparsify(model, 0.2, "erk")
    assert report.total_nnz < report.total_numel
    assert model(x).shape == (2, 10)
