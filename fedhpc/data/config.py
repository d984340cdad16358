"""Config of the federated data: which data set, how it is split over clients."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["PartitionConfig", "PlantedConfig", "ColumnsConfig", "DataConfig"]


@dataclass(kw_only=True)
class PartitionConfig:
    kind: Literal["iid", "dirichlet", "pathological", "grouped", "domain"] = "dirichlet"
    """How training samples are split over clients (planted data ignores this: each client
    draws from its own teacher)."""
    alpha: float = 0.5
    """Dirichlet concentration for `dirichlet` (per class over clients) and `grouped`
    (inside each group); smaller is more skewed."""
    classes_per_client: int = 2
    """Number of classes each client holds under `pathological`."""
    num_groups: int = 4
    """Latent client groups under `grouped` (each owns a disjoint class subset: SC-Dir)."""
    min_samples: int = 2
    """Every client gets at least this many training samples."""
    within_domain: Literal["dirichlet", "iid"] = "dirichlet"
    """How a domain's samples are split over its clients under `domain`: Dirichlet(`alpha`)
    label skew, or uniformly at random."""

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.classes_per_client < 1:
            raise ValueError(f"classes_per_client must be >= 1, got {self.classes_per_client}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if self.within_domain not in ("dirichlet", "iid"):
            raise ValueError(f"within_domain must be 'dirichlet' or 'iid', got {self.within_domain!r}")


@dataclass(kw_only=True)
class PlantedConfig:
    num_clusters: int = 4
    """Planted client clusters; each shares a low-rank perturbation of the teacher."""
    num_classes: int = 10
    """Classes the teacher labels."""
    samples_per_client: int = 64
    """Samples drawn per client (train and local test together)."""
    latent_dim: int = 16
    """Dimension of the latent code from which images are decoded."""
    cluster_strength: float = 0.7
    """Scale of the per-cluster low-rank perturbation of the teacher (Frobenius norms): relative to
    the root ||W_root|| for the latent teacher; relative to the frozen weight ||W0|| for the backbone
    teacher, whose root part is 0.5 ||W0|| (fedhpc.models.teacher.ROOT_STRENGTH), so there 0.7 is 1.4x
    the root. 0.7 with `client_strength` 0.15 gives label agreement ~0.85 inside a cluster and ~0.47
    across clusters."""
    client_strength: float = 0.15
    """Scale of the per-client low-rank perturbation, on the same footing as `cluster_strength`
    (backbone teacher: 0.15 ||W0||, 0.3x the root part)."""
    perturbation_rank: int = 2
    """Rank of each planted perturbation."""
    global_test_size: int = 1000
    """Size of the global test set (labelled by the root teacher)."""
    teacher: Literal["backbone", "latent"] = "backbone"
    """Who labels the samples. `backbone`: the run's own frozen backbone carrying planted
    root + cluster + client LoRA parts and head (fedhpc.models.teacher), so the student can fit
    it exactly and clusters live in LoRA space. `latent`: a linear teacher on the latent code
    (this module's own; independent of the model)."""
    depth_profile: list[int] = field(default_factory=list)
    """Backbone teacher only: heterogeneity that depends on depth. One entry per block that
    carries target modules, shallow to deep: 1 = every client shares the block (root part only),
    g > 1 = g groups nested in the planted clusters (g divides num_clusters; cluster c is in group
    c // (num_clusters // g)) with parts of `cluster_strength`, 0 = one part per client, of
    `client_strength`.
    The head keeps root + cluster + client parts, and the true grouping of every block is stored
    (`FederatedData.layer_groups`). Empty (default): root + cluster + client parts on every target.
    E.g. [1, 1, 2, 2, 4, 0]: a shared trunk, 2 super-clusters, 4 clusters, a per-client last block."""
    teacher_blocks: list[int] = field(default_factory=list)
    """Backbone teacher only: the blocks (0-based among those carrying target modules, shallow to
    deep) whose target modules carry the teacher's planted LoRA parts; the other blocks and the head
    carry none (a student with the initial head fits it by LoRA alone). Empty (default): every block
    and the head. E.g. [4, 5]: only the two deepest of six blocks (Fed-HeLLo's FIM benchmark)."""
    root_rank: int = 0
    """Backbone teacher only: rank of the root (shared) part on every target module and the head
    (0: `perturbation_rank`). Capped at each matrix's min(d_out, d_in), so a large value (e.g. 4096)
    plants a full-rank update that no rank-r LoRA can represent (FedGaLore's setting, algorithms.md §7)."""
    label_skew: float = 0.0
    """Backbone teacher only: Dirichlet α of a label-skewed split (0: none). After labelling, all
    clients' training samples are pooled and dealt again by class with Dirichlet(α) shares (the
    `dirichlet` partition, at least 2 per client), and each client's local test split follows its
    training mix; samples keep their labels. Meant with cluster_strength = client_strength = 0 (one
    teacher, label skew only: 0.1 strong, 0.5 moderate)."""

    quantity_skew: float = 0.0
    """Unequal client sizes (0: every client keeps all its training samples). Client k keeps the
    first n_k = max(2, round(n_train * exp(σ g_k) / max_j exp(σ g_j))) of its training samples, σ =
    this value, g_k ~ N(0, 1) from its own stream: the largest client keeps all, σ = 1 spreads sizes
    over about e^4. Local test splits keep their size. Either teacher."""

    def __post_init__(self):
        for name in ("num_clusters", "num_classes", "samples_per_client", "latent_dim",
                     "perturbation_rank", "global_test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cluster_strength", "client_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        bad = [g for g in self.depth_profile if g < 0 or (g > 1 and self.num_clusters % g)]
        if bad:
            raise ValueError(f"depth_profile entries must be 0 (per client), 1 (shared) or a divisor of "
                             f"num_clusters={self.num_clusters}; got {bad}")
        if self.depth_profile and self.teacher != "backbone":
            raise ValueError("depth_profile needs teacher=backbone (the latent teacher has no blocks)")
        if any(b < 0 for b in self.teacher_blocks) or len(set(self.teacher_blocks)) < len(self.teacher_blocks):
            raise ValueError(f"teacher_blocks must be distinct block indices >= 0, got {self.teacher_blocks}")
        if self.teacher_blocks and self.teacher != "backbone":
            raise ValueError("teacher_blocks needs teacher=backbone (the latent teacher has no blocks)")
        if self.quantity_skew < 0:
            raise ValueError(f"quantity_skew must be >= 0, got {self.quantity_skew}")
        if self.root_rank < 0 or self.label_skew < 0:
            raise ValueError(f"root_rank and label_skew must be >= 0, got {self.root_rank}, {self.label_skew}")
        if (self.root_rank or self.label_skew) and self.teacher != "backbone":
            raise ValueError("root_rank and label_skew need teacher=backbone")


@dataclass(kw_only=True)
class ColumnsConfig:
    input: str = ""
    """Column of the inputs: images (decoded with PIL) or text (tokenized with the model's
    tokenizer). Empty: the first of image, img, text, sentence that the table has."""
    label: str = "label"
    """Column of the labels: integer class ids, or class names (numbered in sorted order)."""
    domain: str = ""
    """Optional column of each sample's domain (for `partition.kind: domain`); empty: none."""


@dataclass(kw_only=True)
class DataConfig:
    name: Literal["planted", "digits", "cifar100", "domainnet", "hf", "folder", "python"] = "planted"
    """Data set: `planted` (synthetic, known clusters), `digits` (scikit-learn's bundled
    8x8 digits), `cifar100` (local `cifar-100-python` folder), `domainnet` (local folder);
    your own: `hf` (a `datasets` save_to_disk folder or parquet / CSV / JSON files, fedhpc/data/hf.py),
    `folder` (an ImageFolder tree, fedhpc/data/folder.py), `python` (`loader`, fedhpc/data/custom.py)."""
    root: str = ""
    """Folder (or file, for `hf`) holding the data set on disk (cifar100, domainnet, hf, folder)."""
    columns: ColumnsConfig = field(default_factory=lambda: ColumnsConfig())
    """`hf` only: which columns hold the input, the label and (optionally) the domain."""
    loader: str = ""
    """`python` only: `package.module:function` returning a `FederatedData` (contract in
    fedhpc/data/custom.py); the run's working folder is on the import path."""
    loader_args: dict[str, Any] = field(default_factory=dict)
    """`python` only: keyword arguments passed to the loader."""
    image_size: int = 32
    """Images are resized to `image_size` x `image_size` (3 channels)."""
    test_fraction: float = 0.2
    """Fraction of each client's samples held out as its local test split."""
    unseen_fraction: float = 0.0
    """Fraction of clients held out of training: evaluated at the end, zero-shot and after
    local fine-tuning."""
    max_samples: int = 0
    """Cap on the training pool size before partitioning (0: no cap); keeps quick runs quick."""
    domains: list[str] = field(default_factory=list)
    """DomainNet domains to load (empty: all six)."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    planted: PlantedConfig = field(default_factory=PlantedConfig)

    def __post_init__(self):
        if self.name == "python" and ":" not in self.loader:
            raise ValueError(f"loader must name 'package.module:function' for name=python, got {self.loader!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be in [0, 1), got {self.unseen_fraction}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {self.max_samples}")
