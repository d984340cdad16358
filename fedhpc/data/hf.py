"""`data.name: hf`: a table of samples on disk, Hugging Face style.

`data.root` is one of
- a folder written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` whose `train`
  and `test` (or `validation`) splits are used); reading it needs the `datasets` package;
- a `.parquet`, `.csv`, `.json` or `.jsonl` file (parquet needs `pyarrow`; CSV and JSON are read
  with the standard library: a JSON file is a list of records, a mapping of columns, or one
  record per line, as `Dataset.to_json` writes);
- a folder holding `train.<ext>` and `test.<ext>` (or `validation.<ext>`) of one of those kinds.
A single table is split into a training and a test pool by a seeded `data.test_fraction`.

`data.columns` names the input column (`input`; empty: the first of image, img, text, sentence
that exists), the label column (`label`) and optionally a domain column (`domain`, for
`partition.kind: domain`). Labels that are all integers are class ids (`num_classes` = largest + 1,
or the names of a `datasets` ClassLabel); any other labels are class names, numbered in sorted
order. Images (a `datasets` Image feature, encoded bytes, or file paths relative to the table's
folder) are decoded with PIL as `data.name: folder` does; text is tokenized with the model's own
tokenizer (`model.family: hf`) to `model.seq_len` tokens, padded and truncated. Every partitioner
applies.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import DataConfig
from .federated import FederatedData
from .folder import carve_test, decode_images
from .pooled import ImagePools, cap_indices, federate_pools, federate_tensors
from ..rng import make_rng

__all__ = ["load_hf", "read_tables", "tokenize", "TABLE_SUFFIXES"]

TABLE_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl")
INPUT_COLUMNS = ("image", "img", "text", "sentence")
"""Input columns tried in order when `data.columns.input` is empty."""
TEST_SPLITS = ("test", "validation")
WHAT = ("a folder saved with datasets' save_to_disk, a .parquet / .csv / .json / .jsonl file, "
        "or a folder holding train.<ext> and test.<ext>")


@dataclass
class Table:
    """One split: its column names, row count, a reader of (column, rows) -> values, and the
    folder that relative image paths start from."""
    columns: list[str]
    num_rows: int
    read: Callable[[str, np.ndarray], list]
    base: Path
    class_names: dict[str, list[str]]
    """Column -> class names, where `datasets` stores a ClassLabel feature."""


def _records_table(records: list[dict] | dict[str, list], base: Path, where: str) -> Table:
    if isinstance(records, dict):
        columns = {str(k): list(v) for k, v in records.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"data.root: {where}: columns of unequal lengths {sorted(lengths)}")
    else:
        if not all(isinstance(r, dict) for r in records):
            raise ValueError(f"data.root: {where}: expected one record (a mapping) per row")
        names = list(dict.fromkeys(k for r in records for k in r))
        columns = {k: [r.get(k) for r in records] for k in names}
    rows = len(next(iter(columns.values()))) if columns else 0
    return Table(list(columns), rows, lambda col, ix: [columns[col][i] for i in ix], base, {})


def _read_json(path: Path) -> Table:
    text = path.read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"data.root: {path} is not JSON or JSON lines ({err.msg}, line {err.lineno})") from None
    if not isinstance(records, (list, dict)):
        raise ValueError(f"data.root: {path} must hold a list of records or a mapping of columns")
    return _records_table(records, path.parent, str(path))


def _read_csv(path: Path) -> Table:
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    return _records_table(records, path.parent, str(path))


def _arrow_table(table, base: Path) -> Table:
    return Table(list(table.column_names), table.num_rows,
                 lambda col, ix: table.column(col).take(np.asarray(ix, dtype=np.int64)).to_pylist(), base, {})


def _read_parquet(path: Path) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"data.root: reading {path} needs pyarrow: pip install pyarrow (or datasets)") from None
    return _arrow_table(pq.read_table(path), path.parent)


def _read_file(path: Path) -> Table:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".csv":
        return _read_csv(path)
    return _read_json(path)


def _dataset_table(ds, base: Path) -> Table:
    names = {col: list(feature.names) for col, feature in ds.features.items() if hasattr(feature, "names")}
    return Table(list(ds.column_names), len(ds), lambda col, ix: list(ds.select(np.asarray(ix, dtype=np.int64))[col]),
                 base, names)


def _read_saved(root: Path) -> dict[str, Table]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data.root: {root} is a save_to_disk folder; reading it needs the datasets "
                         "package: pip install datasets") from None
    datasets.disable_progress_bars()
    saved = datasets.load_from_disk(str(root))
    if isinstance(saved, datasets.DatasetDict):
        return {name: _dataset_table(split, root / name) for name, split in saved.items()}
    return {"train": _dataset_table(saved, root)}


def read_tables(root_text: str) -> dict[str, Table]:
    """Split name -> table; "train" always, "test" or "validation" when the source has one."""
    if not root_text:
        raise FileNotFoundError(f"data.root is empty: set it to {WHAT}")
    root = Path(root_text)
    if not root.exists():
        raise FileNotFoundError(f"data.root: '{root}' does not exist (expected {WHAT})")
    if root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        tables = _read_saved(root)
    elif root.is_file():
        if root.suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(f"data.root: '{root}' is not a {' / '.join(TABLE_SUFFIXES)} file (expected {WHAT})")
        tables = {"train": _read_file(root)}
    else:
        files = {p.stem: p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES}
        if "train" not in files:
            raise FileNotFoundError(f"data.root: no train{{{','.join(TABLE_SUFFIXES)}}} in folder '{root}' "
                                    f"(expected {WHAT})")
        tables = {name: _read_file(files[name]) for name in ("train", *TEST_SPLITS) if name in files}
    if "train" not in tables:
        raise ValueError(f"data.root: '{root}' has splits {sorted(tables)}, none named train")
    return tables


def _label_ids(train: list, test: list, names: list[str] | None, column: str) -> tuple[np.ndarray, np.ndarray, int]:
    values = train + test
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        raise ValueError(f"data.columns.label: column '{column}' has empty values")

    def integer(v):
        if isinstance(v, (bool, np.bool_)):
            return int(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [integer(v) for v in values]
    if all(i is not None for i in ints):
        ids = np.asarray(ints, dtype=np.int64)
        if ids.min() < 0:
            raise ValueError(f"data.columns.label: column '{column}' holds negative class ids ({ids.min()})")
        num_classes = max(int(ids.max()) + 1, len(names or []))
    else:
        classes = sorted({str(v) for v in values})
        index = {c: i for i, c in enumerate(classes)}
        ids = np.asarray([index[str(v)] for v in values], dtype=np.int64)
        num_classes = len(classes)
    return ids[:len(train)], ids[len(train):], num_classes


def _domain_ids(train: list, test: list) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    names = sorted({str(v) for v in train + test})
    index = {n: i for i, n in enumerate(names)}
    ids = np.asarray([index[str(v)] for v in train + test], dtype=np.int64)
    return ids[:len(train)], ids[len(train):], tuple(names)


def tokenize(texts: list[str], *, tokenizer: str, seq_len: int) -> torch.Tensor:
    """`[N, seq_len]` int64 token ids from the model's own tokenizer, padded and truncated."""
    from transformers import AutoTokenizer

    from ..models.backbone import resolve_hf_path

    tok = AutoTokenizer.from_pretrained(resolve_hf_path(tokenizer))
    if tok.pad_token is None:  # e.g. GPT-2: pad with the end-of-text token (masked by the model call)
        tok.pad_token = tok.eos_token
    ids = tok([str(t) for t in texts], padding="max_length", truncation=True, max_length=seq_len,
              return_tensors="pt")["input_ids"]
    return ids.to(torch.int64)


def special_frame(tokenizer: str) -> tuple[int, int] | None:
    """(first, last) special token ids the model's tokenizer puts around a text (BERT: [CLS], [SEP];
    GPT-2: none, so None): planted text wears the same frame (`TextShape.frame`)."""
    from transformers import AutoTokenizer

    from ..models.backbone import resolve_hf_path

    ids = AutoTokenizer.from_pretrained(resolve_hf_path(tokenizer))("")["input_ids"]
    return (ids[0], ids[-1]) if len(ids) == 2 else None


def _input_kind(values: list, column: str) -> str:
    from PIL import Image

    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, (Image.Image, bytes, bytearray)) or (isinstance(sample, dict) and
                                                                ("bytes" in sample or "path" in sample)):
        return "image"
    if isinstance(sample, str):
        return "path-or-text"
    raise ValueError(f"data.columns.input: column '{column}' holds {type(sample).__name__} values; "
                     "expected images, image file paths or text")


def load_hf(cfg: DataConfig, *, num_clients: int, seed: int, modality: str = "image", seq_len: int = 32,
            tokenizer: str = "", **_) -> FederatedData:
    tables = read_tables(cfg.root)
    train_table = tables["train"]
    test_name = next((n for n in TEST_SPLITS if n in tables), None)
    columns = cfg.columns
    input_column = columns.input or next((c for c in INPUT_COLUMNS if c in train_table.columns), "")
    for key, column in (("input", input_column), ("label", columns.label), ("domain", columns.domain)):
        if key == "domain" and not column:
            continue
        for name, table in tables.items():
            if name in ("train", test_name) and column not in table.columns:
                what = f"'{column}' is not" if column else "none of " + ", ".join(INPUT_COLUMNS) + " is"
                raise ValueError(f"data.columns.{key}: {what} a column of the {name} split "
                                 f"(columns: {', '.join(table.columns)})")
    if train_table.num_rows < 2:
        raise ValueError(f"data.root: the train split has {train_table.num_rows} rows; it needs at least 2")

    # Which rows of which table form each pool; max_samples caps them before any image is decoded.
    if test_name is None:
        train_rows, test_rows = carve_test(train_table.num_rows, test_fraction=cfg.test_fraction, seed=seed)
        test_table = train_table
    else:
        test_table = tables[test_name]
        train_rows, test_rows = np.arange(train_table.num_rows), np.arange(test_table.num_rows)
    keep_train, keep_test = cap_indices(len(train_rows), len(test_rows), max_samples=cfg.max_samples,
                                        rng=make_rng(seed, "cap"))
    train_rows, test_rows = train_rows[keep_train], test_rows[keep_test]

    def both(column):
        return train_table.read(column, train_rows), test_table.read(column, test_rows)

    train_y, test_y, num_classes = _label_ids(*both(columns.label), train_table.class_names.get(columns.label),
                                              columns.label)
    train_domain = test_domain = None
    domain_names: tuple[str, ...] = ()
    if columns.domain:
        train_domain, test_domain, domain_names = _domain_ids(*both(columns.domain))
    train_in, test_in = both(input_column)
    kind = _input_kind(train_in, input_column)
    if kind == "path-or-text":
        first = next(v for v in train_in if v is not None)
        kind = "image" if (train_table.base / first).is_file() or Path(first).is_file() else "text"
    if kind == "image":
        if modality != "image":
            raise ValueError(f"data.columns.input: column '{input_column}' holds images; they need an image "
                             "model (model.family=timm)")
        pools = ImagePools(name="hf", num_classes=num_classes,
                           train_images=decode_images(train_in, image_size=cfg.image_size, base=train_table.base),
                           train_labels=train_y,
                           test_images=decode_images(test_in, image_size=cfg.image_size, base=test_table.base),
                           test_labels=test_y, domain_names=domain_names, train_domain=train_domain,
                           test_domain=test_domain)
        return federate_pools(pools, cfg, num_clients=num_clients, seed=seed)
    if modality != "text" or not tokenizer:
        raise ValueError(f"data.columns.input: column '{input_column}' holds text; it needs a Hugging Face "
                         "model to tokenize it (model.family=hf)")
    test_x = tokenize(test_in, tokenizer=tokenizer, seq_len=seq_len)
    test_y_t = torch.from_numpy(test_y)
    data = FederatedData(name="hf", num_classes=num_classes,
                         train_x=tokenize(train_in, tokenizer=tokenizer, seq_len=seq_len),
                         train_y=torch.from_numpy(train_y), test_x=test_x, test_y=test_y_t,
                         global_test_x=test_x, global_test_y=test_y_t, domain_names=domain_names,
                         train_domain=train_domain, test_domain=test_domain, global_test_domain=test_domain)
    return federate_tensors(data, cfg, num_clients=num_clients, seed=seed)
