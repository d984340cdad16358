"""Planted benchmark: synthetic federated data whose client clusters are known.

Every sample has a latent code z ~ N(0, I_m). An image is a fixed random linear decoding
of z (a smooth layout plus a fine periodic texture) plus a little noise, so a linear
read-out of the pixels recovers z, and so do the features of a random-init ViT. A text
sample is `seq_len` tokens drawn i.i.d. from softmax(E z / tau) over the vocabulary (for a
Hugging Face model, seq_len - 2 of them between its [CLS] and [SEP]), so the bag of tokens reveals z (one table E for every position: order carries nothing, and
sampling costs O(N V) rather than O(N T V)). Client k labels z with its own teacher

    y = argmax_j (W_k z + b_k)_j,   W_k = W_root + s_c P_{c(k)} + s_l P_k,

where P_c (one per cluster) and P_k (one per client) are random rank-p matrices scaled to
||W_root||_F, s_c = `cluster_strength`, s_l = `client_strength`, and the bias b_k balances
the teacher's classes on a reference sample of z. Clients of a cluster share P_c, so their
label functions agree far more than across clusters; `groups` holds c(k). The global test
set is labelled by the root teacher (W_root, b_root).

Each random piece has its own stream (rng.make_rng): the root, each cluster's and each
client's perturbation, and each client's samples, so client k's data never depends on the
number of ranks. The partition config does not apply: a client's labels come from its
teacher, not from a split of a shared pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig, PlantedConfig
from .federated import FederatedData
from .partition import balanced_groups, choose_unseen
from ..rng import make_rng

__all__ = ["TextShape", "Teachers", "plant_teachers", "teacher_labels", "image_decoder",
           "render_images", "token_table", "render_tokens", "load_planted", "quantity_sizes", "TOKEN_OFFSET"]

TOKEN_OFFSET = 1000
"""Smallest token id used: ids below it are left to a BERT vocabulary's special tokens."""
IMAGE_NOISE = 0.1
"""Pixel noise std; the decoded signal has unit variance per channel."""
TOKEN_TEMPERATURE = 0.5
"""tau in softmax(E z / tau); in a sweep 0.5 let a bag of 32 tokens predict the label best
(1.0 is too flat, 0.25 repeats the same few tokens)."""
TOKEN_CHUNK = 1 << 22
"""Most CDF entries (rows x vocabulary) held at once while drawing tokens."""
BASE_MAP_SIZE = 4
"""The smooth part of a decoder pattern is a random BASE_MAP_SIZE^2 map, upsampled."""
TEXTURE_PERIOD = 4
"""Period in pixels of the tiled part of a decoder pattern; divides ViT patch sizes 4, 8, 16, 32."""
TEXTURE_SHARE = 0.5
"""Fraction of the signal variance carried by the tiled texture."""
CALIBRATION_SAMPLES = 4096
"""Reference codes z on which every teacher's class frequencies are balanced."""
CALIBRATION_STEPS = 10
CALIBRATION_RATE = 1.0
CALIBRATION_FLOOR = 0.9
"""A teacher whose least frequent class is below this fraction of its share after the fast steps
is balanced again by `_solve_balance` (the fast steps oscillate at small latent_dim, e.g. 4, and can
leave a class empty; at latent_dim 8-16 every teacher tried ends above 0.96 and is left as it is)."""
SMOOTHING = 0.02
"""Temperature of `_solve_balance`'s smoothed argmax, relative to the std of the teacher's logits."""


@dataclass(frozen=True)
class TextShape:
    seq_len: int
    """Tokens per sample."""
    vocab_size: int
    """Token ids are in [TOKEN_OFFSET, TOKEN_OFFSET + vocab_size)."""
    frame: tuple[int, int] | None = None
    """(first, last): the model's special tokens around every sample, e.g. BERT's [CLS] ... [SEP],
    so a planted sample looks like tokenized text to the model (its classifier reads position 0);
    the planted tokens fill the seq_len - 2 positions between. None: planted tokens only."""

    def __post_init__(self):
        if self.seq_len < (3 if self.frame else 1):
            raise ValueError(f"seq_len must be >= {3 if self.frame else 1}, got {self.seq_len}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")


@dataclass(frozen=True)
class Teachers:
    root_weight: np.ndarray
    """`[K, m]` W_root."""
    root_bias: np.ndarray
    """`[K]` balancing bias of the root teacher."""
    weight: np.ndarray
    """`[num_clients, K, m]` W_k."""
    bias: np.ndarray
    """`[num_clients, K]` b_k."""
    clusters: np.ndarray
    """`[num_clients]` c(k)."""


def teacher_labels(weight: np.ndarray, bias: np.ndarray, z: np.ndarray) -> np.ndarray:
    """argmax(W z + b) for z `[N, m]`: weight `[K, m]` gives `[N]`, `[C, K, m]` gives `[C, N]`."""
    return np.argmax(z @ np.swapaxes(weight, -1, -2) + bias[..., None, :], axis=-1).astype(np.int64)


def _low_rank(rng: np.random.Generator, shape: tuple[int, int], rank: int, norm: float) -> np.ndarray:
    p = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    return p * (norm / np.linalg.norm(p))


CALIBRATION_BLOCK = 64
"""Teachers calibrated at once: each teacher's bias depends on that teacher alone, so blocks give
the same bits as one pass, and the `[block, CALIBRATION_SAMPLES, K]` logits stay small (all
10⁴ teachers at once held 3.3 GB of float64 logits)."""


def _balancing_bias(weight: np.ndarray, z: np.ndarray) -> np.ndarray:
    """`[T, K]` biases that make each teacher's argmax classes (near-)uniform on z: lower
    the logits of frequent classes and raise rare ones for CALIBRATION_STEPS steps; a teacher
    still below CALIBRATION_FLOOR is solved exactly (`_solve_balance`). CALIBRATION_BLOCK
    teachers at a time."""
    if len(weight) > CALIBRATION_BLOCK:
        return np.concatenate([_balancing_bias(weight[lo:lo + CALIBRATION_BLOCK], z)
                               for lo in range(0, len(weight), CALIBRATION_BLOCK)])
    logits = torch.from_numpy(z @ np.swapaxes(weight, -1, -2))
    num_teachers, num_classes = weight.shape[:2]
    bias = torch.zeros((num_teachers, num_classes), dtype=torch.float64)

    def class_counts():
        labels = (logits + bias[:, None, :]).argmax(dim=-1)
        return torch.zeros_like(bias).scatter_add_(1, labels, torch.ones_like(labels, dtype=bias.dtype))

    for _ in range(CALIBRATION_STEPS):
        bias -= CALIBRATION_RATE * torch.log((class_counts() + 1) / (len(z) + num_classes) * num_classes)
    unbalanced = class_counts().min(dim=1).values < CALIBRATION_FLOOR * len(z) / num_classes
    for t in torch.nonzero(unbalanced).flatten().tolist():
        bias[t] = _solve_balance(logits[t])
    return bias.numpy()


def _solve_balance(logits: torch.Tensor) -> torch.Tensor:
    """`[K]` bias that balances one teacher's argmax classes over the `[N, K]` logits, as the convex
    problem it is: min_b E_z[max_j (l_j + b_j)] - mean_j b_j, whose (sub)gradient is the class
    frequencies minus 1/K (the dual of semi-discrete optimal transport to uniform classes). The max is
    smoothed to a log-sum-exp at temperature SMOOTHING x std(logits) and solved by L-BFGS from b = 0;
    one teacher at a time, so a teacher's bias never depends on which others are calibrated with it."""
    temperature = SMOOTHING * logits.std()
    bias = torch.zeros(logits.shape[1], dtype=logits.dtype, requires_grad=True)
    solver = torch.optim.LBFGS([bias], max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                               line_search_fn="strong_wolfe")

    def objective():
        solver.zero_grad()
        value = temperature * torch.logsumexp((logits + bias) / temperature, dim=1).mean() - bias.mean()
        value.backward()
        return value

    solver.step(objective)
    return bias.detach()


def plant_teachers(cfg: PlantedConfig, *, num_clients: int, seed: int,
                   hosted: np.ndarray | None = None) -> Teachers:
    """Every client's teacher; with `hosted` (client ids) only those clients' biases are
    calibrated (the others' are NaN): a client's teacher never depends on which others are built."""
    shape, rank = (cfg.num_classes, cfg.latent_dim), cfg.perturbation_rank
    root = make_rng(seed, "planted-root").standard_normal(shape)
    scale = np.linalg.norm(root)
    cluster_shift = [cfg.cluster_strength * _low_rank(make_rng(seed, "planted-cluster", c), shape,
                                                      rank, scale) for c in range(cfg.num_clusters)]
    clusters = balanced_groups(num_clients, cfg.num_clusters, make_rng(seed, "planted-clusters"))
    weight = np.stack([
        root + cluster_shift[clusters[k]]
        + cfg.client_strength * _low_rank(make_rng(seed, "planted-client", k), shape, rank, scale)
        for k in range(num_clients)])
    reference = make_rng(seed, "planted-calibration").standard_normal((CALIBRATION_SAMPLES, cfg.latent_dim))
    if hosted is None:
        bias = _balancing_bias(np.concatenate([root[None], weight]), reference)
        return Teachers(root_weight=root, root_bias=bias[0], weight=weight, bias=bias[1:], clusters=clusters)
    hosted = np.asarray(hosted, dtype=np.int64)
    calibrated = _balancing_bias(np.concatenate([root[None], weight[hosted]]), reference)
    bias = np.full((num_clients, cfg.num_classes), np.nan)
    bias[hosted] = calibrated[1:]
    return Teachers(root_weight=root, root_bias=calibrated[0], weight=weight, bias=bias, clusters=clusters)


def _unit_power(patterns: np.ndarray) -> np.ndarray:
    """Scale `[m, 3, S, S]` patterns so z @ G has unit variance per channel for z ~ N(0, I)."""
    power = np.square(patterns).sum(axis=0).mean(axis=(1, 2))
    return patterns / np.sqrt(power)[None, :, None, None]


def image_decoder(latent_dim: int, image_size: int, seed: int) -> np.ndarray:
    """`[m, 3 S S]` float32 patterns G: the image of z is z @ G (+ noise).

    Each pattern is a smooth layout (a random BASE_MAP_SIZE^2 map upsampled) plus a random
    texture tiled with period TEXTURE_PERIOD pixels, each carrying half of the signal. The
    texture puts the whole code into every ViT patch whose size is a multiple of the period;
    with the layout alone a frozen random-init ViT's features reveal little of z.
    """
    rng = make_rng(seed, "planted-decoder")
    maps = torch.from_numpy(rng.standard_normal((latent_dim, 3, BASE_MAP_SIZE, BASE_MAP_SIZE)))
    layout = F.interpolate(maps, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).numpy()
    texel = rng.standard_normal((latent_dim, 3, TEXTURE_PERIOD, TEXTURE_PERIOD))
    reps = -(-image_size // TEXTURE_PERIOD)
    texture = np.tile(texel, (1, 1, reps, reps))[:, :, :image_size, :image_size]
    patterns = _unit_power(np.sqrt(1 - TEXTURE_SHARE) * _unit_power(layout)
                           + np.sqrt(TEXTURE_SHARE) * _unit_power(texture))
    return (np.sqrt(1 - IMAGE_NOISE ** 2) * patterns).reshape(latent_dim, -1).astype(np.float32)


def render_images(z: np.ndarray, rng: np.random.Generator, *, decoder: np.ndarray) -> np.ndarray:
    """`[N, 3, S, S]` float32 images of latent codes `[N, m]`."""
    flat = z.astype(np.float32) @ decoder
    flat += IMAGE_NOISE * rng.standard_normal(flat.shape, dtype=np.float32)
    size = int(round((decoder.shape[1] // 3) ** 0.5))
    return flat.reshape(len(z), 3, size, size)


def token_table(latent_dim: int, vocab_size: int, seed: int) -> np.ndarray:
    """`[V, m]` E with unit-variance logits E z for z ~ N(0, I)."""
    return make_rng(seed, "planted-tokens").standard_normal((vocab_size, latent_dim)) / np.sqrt(latent_dim)


def render_tokens(z: np.ndarray, rng: np.random.Generator, *, table: np.ndarray,
                  seq_len: int, frame: tuple[int, int] | None = None) -> np.ndarray:
    """`[N, seq_len]` int64 token ids drawn from softmax(E z / tau), by inverse CDF, in
    chunks of rows so that the `[rows, V]` CDF stays small for a large vocabulary; with a
    `frame` (first, last) the drawn tokens sit between those two (`TextShape.frame`)."""
    if frame is not None:
        inner = render_tokens(z, rng, table=table, seq_len=seq_len - 2)
        column = np.ones((len(z), 1), dtype=inner.dtype)
        return np.concatenate([column * frame[0], inner, column * frame[1]], axis=1)
    vocab_size = table.shape[0]
    rows_per_chunk = max(1, TOKEN_CHUNK // vocab_size)
    chunks = []
    for lo in range(0, len(z), rows_per_chunk):
        logits = z[lo:lo + rows_per_chunk] @ table.T / TOKEN_TEMPERATURE
        cdf = np.cumsum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1)
        cdf /= cdf[:, -1:]
        # Offsetting row i by i lets one searchsorted serve every row.
        rows = np.arange(len(cdf))[:, None]
        hits = np.searchsorted((cdf + rows).ravel(), (rng.random((len(cdf), seq_len)) + rows).ravel(),
                               side="right").reshape(len(cdf), seq_len)
        chunks.append(np.minimum(hits - rows * vocab_size, vocab_size - 1))
    return np.concatenate(chunks) + TOKEN_OFFSET


def _pool(per_client: list[np.ndarray], part: slice) -> torch.Tensor:
    """One pool from the same part of every client's samples, client after client."""
    return torch.from_numpy(np.concatenate([samples[part] for samples in per_client]))


QUANTITY_MIN = 2
"""Training samples every client keeps under `quantity_skew`."""


def quantity_sizes(sigma: float, num_train: int, num_clients: int, seed: int) -> np.ndarray:
    """`[num_clients]` training sizes under `PlantedConfig.quantity_skew` = sigma: log-normal shares
    scaled so that the largest client keeps all `num_train`, at least QUANTITY_MIN each."""
    g = make_rng(seed, "planted-quantity").standard_normal(num_clients)
    share = np.exp(sigma * (g - g.max()))
    return np.clip(np.round(num_train * share).astype(np.int64), min(QUANTITY_MIN, num_train), num_train)


def load_planted(cfg: DataConfig, *, num_clients: int, seed: int,
                 text: TextShape | None = None, hosted: np.ndarray | None = None) -> FederatedData:
    """The planted federation. With `hosted` (sorted client ids: the rank's own clients) only those
    clients' samples are drawn and pooled, in client order, bit for bit what the full build gives
    them (each client's teacher and samples come from its own streams); every other client keeps
    index arrays of its true length that point past the end of the pools, so `num_examples` is
    right and touching its samples fails. `FederatedData.hosted` records the set."""
    planted = cfg.planted
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    num_test = max(1, round(cfg.test_fraction * planted.samples_per_client))
    num_train = planted.samples_per_client - num_test
    if num_train < 1:
        raise ValueError(f"planted.samples_per_client={planted.samples_per_client} leaves no "
                         f"training sample after test_fraction={cfg.test_fraction}; raise it")
    teachers = plant_teachers(planted, num_clients=num_clients, seed=seed, hosted=hosted)
    built = np.arange(num_clients) if hosted is None else np.asarray(hosted, dtype=np.int64)
    if text is None:
        render = partial(render_images, decoder=image_decoder(planted.latent_dim, cfg.image_size, seed))
    else:
        render = partial(render_tokens, table=token_table(planted.latent_dim, text.vocab_size, seed),
                         seq_len=text.seq_len, frame=text.frame)

    xs, ys = [], []
    for k in built:
        rng = make_rng(seed, "planted-samples", int(k))
        z = rng.standard_normal((planted.samples_per_client, planted.latent_dim))
        xs.append(render(z, rng))
        ys.append(teacher_labels(teachers.weight[k], teachers.bias[k], z))
    train, test = slice(None, num_train), slice(num_train, None)

    rng = make_rng(seed, "planted-global")
    z = rng.standard_normal((planted.global_test_size, planted.latent_dim))
    blocks = np.arange(num_clients)[:, None]
    if hosted is not None:  # hosted clients: their place among the built ones; others: past the pools' end
        place = np.full(num_clients, len(built) + 1, dtype=np.int64)
        place[built] = np.arange(len(built))
        blocks = place[:, None]
    client_train = list(blocks * num_train + np.arange(num_train))
    if planted.quantity_skew > 0:
        client_train = [rows[:n] for rows, n in zip(client_train, quantity_sizes(planted.quantity_skew, num_train,
                                                                                 num_clients, seed))]
    return FederatedData(
        name="planted", num_classes=planted.num_classes,
        train_x=_pool(xs, train), train_y=_pool(ys, train),
        test_x=_pool(xs, test), test_y=_pool(ys, test),
        global_test_x=torch.from_numpy(render(z, rng)),
        global_test_y=torch.from_numpy(teacher_labels(teachers.root_weight, teachers.root_bias, z)),
        client_train=client_train,
        client_test=list(blocks * num_test + np.arange(num_test)),
        groups=teachers.clusters,
        unseen=choose_unseen(num_clients, fraction=cfg.unseen_fraction, rng=make_rng(seed, "unseen")),
        hosted=None if hosted is None else built,
    )
