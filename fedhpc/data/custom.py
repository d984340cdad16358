"""`data.name: python`: a loader of your own, `data.loader: "package.module:function"`.

The function is imported (the run's working folder is on the import path) and called as

    function(cfg: DataConfig, *, num_clients: int, seed: int, **data.loader_args) -> FederatedData

on every rank, so it must build the same data from the same seed (draw from `numpy.random.
default_rng(seed)`, never from global state). The returned `FederatedData` must hold:
- `num_classes` >= 1; `train_y`, `test_y`, `global_test_y`: int64 `[N]` labels in [0, num_classes);
- `train_x`, `test_x`, `global_test_x`: tensors with one row per label and the same row shape:
  float32 images `[N, 3, S, S]` with S = `data.image_size` for a timm model, int64 token ids
  `[N, T]` for a Hugging Face model (`model.family: hf`);
- either empty `client_train` / `client_test` (the default): fedhpc splits the pools with
  `data.partition` (every partitioner) and picks `data.unseen_fraction` unseen clients; or
  `num_clients` index arrays into each pool, `groups` `[num_clients]` (-1: no groups) and the
  sorted `unseen` ids, a split of your own;
- optionally `train_domain` / `test_domain` / `global_test_domain` (int64 domain id per row) and
  `domain_names`, for `partition.kind: domain` and per-domain accuracy.
`check_federated_data` checks all of it and names the first field that is wrong.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

import numpy as np
import torch

from .config import DataConfig
from .federated import FederatedData
from .pooled import federate_tensors

__all__ = ["load_python", "import_loader", "check_federated_data"]


def import_loader(spec: str):
    """The function named by `package.module:function`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"data.loader must look like 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path:  # the console script's sys.path[0] is its bin folder, not the run's
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"data.loader: cannot import module '{module_name}' ({err}); "
                         "put it on PYTHONPATH or in the folder you run from") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"data.loader: module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise ValueError(f"data.loader: '{spec}' is not a function")
    return fn


def _fail(spec: str, field: str, what: str):
    raise ValueError(f"data.loader '{spec}': FederatedData.{field} {what}")


def _check_labels(spec, data, x_name, y_name, num_rows_x):
    y = getattr(data, y_name)
    if not isinstance(y, torch.Tensor):
        _fail(spec, y_name, f"must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.int64 or y.dim() != 1:
        _fail(spec, y_name, f"must be int64 labels [N], got {y.dtype} of shape {list(y.shape)}")
    if len(y) != num_rows_x:
        _fail(spec, y_name, f"has {len(y)} labels for {num_rows_x} rows of {x_name}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
        _fail(spec, y_name, f"must lie in [0, num_classes={data.num_classes}), got [{int(y.min())}, {int(y.max())}]")


def _check_indices(spec, name, parts, num_clients, pool_size):
    if not isinstance(parts, (list, tuple)) or len(parts) != num_clients:
        _fail(spec, name, f"must hold one index array per client ({num_clients}), got "
              f"{len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__}")
    for k, ix in enumerate(parts):
        ix = np.asarray(ix)
        if ix.ndim != 1 or (len(ix) and (not np.issubdtype(ix.dtype, np.integer) or ix.min() < 0 or ix.max() >= pool_size)):
            _fail(spec, f"{name}[{k}]", f"must be integer indices into a pool of {pool_size} rows")


def check_federated_data(data, *, spec: str, num_clients: int, modality: str, image_size: int) -> None:
    """Raise a one-line ValueError naming the first field of `data` that breaks the contract."""
    if not isinstance(data, FederatedData):
        raise ValueError(f"data.loader '{spec}' returned a {type(data).__name__}, not a fedhpc.data.FederatedData")
    if not isinstance(data.num_classes, (int, np.integer)) or data.num_classes < 1:
        _fail(spec, "num_classes", f"must be an integer >= 1, got {data.num_classes!r}")
    shape = None
    for x_name, y_name in (("train_x", "train_y"), ("test_x", "test_y"), ("global_test_x", "global_test_y")):
        x = getattr(data, x_name)
        if not isinstance(x, torch.Tensor):
            _fail(spec, x_name, f"must be a torch.Tensor, got {type(x).__name__}")
        if modality == "image" and (x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != 3
                                    or tuple(x.shape[2:]) != (image_size, image_size)):
            _fail(spec, x_name, f"must be float32 images [N, 3, {image_size}, {image_size}] (data.image_size) "
                  f"for an image model, got {x.dtype} of shape {list(x.shape)}")
        if modality == "text" and (x.dtype != torch.int64 or x.dim() != 2):
            _fail(spec, x_name, f"must be int64 token ids [N, T] for a Hugging Face model, got {x.dtype} of "
                  f"shape {list(x.shape)}")
        if shape is not None and tuple(x.shape[1:]) != shape:
            _fail(spec, x_name, f"rows have shape {list(x.shape[1:])}, train_x's have {list(shape)}")
        shape = tuple(x.shape[1:])
        _check_labels(spec, data, x_name, y_name, len(x))
    if len(data.train_y) == 0:
        _fail(spec, "train_x", "is empty")
    for name, pool in (("train_domain", data.train_y), ("test_domain", data.test_y),
                       ("global_test_domain", data.global_test_y)):
        dom = getattr(data, name)
        if dom is not None and (np.asarray(dom).shape != (len(pool),) or
                                not np.issubdtype(np.asarray(dom).dtype, np.integer) or np.asarray(dom).min() < 0):
            _fail(spec, name, f"must be None or one integer domain id >= 0 per row ({len(pool)})")
    if not data.client_train:
        if data.client_test:
            _fail(spec, "client_test", "must be empty when client_train is (fedhpc then splits both)")
        return
    _check_indices(spec, "client_train", data.client_train, num_clients, len(data.train_y))
    _check_indices(spec, "client_test", data.client_test, num_clients, len(data.test_y))
    groups = np.asarray(data.groups)
    if groups.shape != (num_clients,) or not np.issubdtype(groups.dtype, np.integer) or groups.min() < -1:
        _fail(spec, "groups", f"must be [num_clients={num_clients}] integer group ids (-1: none), "
              f"got shape {list(groups.shape)}")
    unseen = np.asarray(data.unseen)
    if unseen.ndim != 1 or (len(unseen) and (not np.issubdtype(unseen.dtype, np.integer)
                                             or not np.array_equal(unseen, np.unique(unseen))
                                             or unseen.min() < 0 or unseen.max() >= num_clients)):
        _fail(spec, "unseen", f"must be sorted distinct client ids in [0, {num_clients})")
    if len(unseen) >= num_clients:
        _fail(spec, "unseen", "holds out every client; at least one must train")
    empty = [k for k in range(num_clients) if k not in set(unseen.tolist()) and len(data.client_train[k]) == 0]
    if empty:
        _fail(spec, f"client_train[{empty[0]}]", "is empty: every training client needs a sample")


def load_python(cfg: DataConfig, *, num_clients: int, seed: int, modality: str = "image", **_) -> FederatedData:
    if not cfg.loader:
        raise ValueError("data.loader must name 'package.module:function' for data.name=python")
    fn = import_loader(cfg.loader)
    try:
        inspect.signature(fn).bind(cfg, num_clients=num_clients, seed=seed, **cfg.loader_args)
    except TypeError as err:
        raise ValueError(f"data.loader '{cfg.loader}' cannot be called as fn(cfg, num_clients=, seed=, "
                         f"**data.loader_args): {err}") from None
    data = fn(cfg, num_clients=num_clients, seed=seed, **cfg.loader_args)
    check_federated_data(data, spec=cfg.loader, num_clients=num_clients, modality=modality,
                         image_size=cfg.image_size)
    if data.client_train:
        data.groups = np.asarray(data.groups, dtype=np.int64)
        data.unseen = np.asarray(data.unseen, dtype=np.int64)
        data.client_train = [np.asarray(ix, dtype=np.int64) for ix in data.client_train]
        data.client_test = [np.asarray(ix, dtype=np.int64) for ix in data.client_test]
        return data
    return federate_tensors(data, cfg, num_clients=num_clients, seed=seed)
