"""The student: a Deep Averaging Network over n-gram ids (EmbeddingBag -> Linear -> ReLU -> Linear)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from sparse_distill.dan_config import (  # noqa: F401 - re-exported: the folder format is part of this module's API
    LABEL_MAP,
    STUDENT_CONFIG,
    STUDENT_WEIGHTS,
    TABLE_DTYPES,
    DanConfig,
    read_dan_config,
)
from sparse_distill.data import DataError, LabelMap, atomic_write_text, write_dir_atomically

if TYPE_CHECKING:
    from sparse_distill.table_kernels import BagGradient, BagPlan

logger = logging.getLogger(__name__)


class Int8EmbeddingBag(nn.Module):
    """An n-gram table stored as int8 rows, each with its own float32 scale and offset (PyTorch's fused row-wise
    format: d bytes of codes, then 4 bytes of scale and 4 of bias per row). A quarter of the float32 bytes to store,
    map and gather; inference only."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean") -> None:
        super().__init__()
        if mode not in ("mean", "sum"):
            raise ValueError(f"int8 tables support mean or sum pooling, not {mode!r}")
        self.mode = mode
        self.embedding_dim = embedding_dim
        self.register_buffer("packed", torch.zeros(num_embeddings, embedding_dim + 8, dtype=torch.uint8))

    @classmethod
    def from_float(cls, weight: torch.Tensor, mode: str = "mean") -> Int8EmbeddingBag:
        """Quantise a float table row by row (min/max range per row)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        if mode not in ("mean", "sum"):
            raise ValueError(f"int8 tables support mean or sum pooling, not {mode!r}")
        module.mode, module.embedding_dim = mode, weight.shape[1]
        module.register_buffer("packed", torch.ops.quantized.embedding_bag_byte_prepack(weight.detach().float()))
        return module

    def dequantize(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `ids` (default: the whole table) as float32, shape (len(ids), dim): for checks and explanations;
        inference gathers the int8 rows directly. (`numpy_student` reads the same layout without torch.)"""
        packed = self.packed if ids is None else self.packed[ids]
        codes = packed[:, : self.embedding_dim].float()
        scale_bias = packed[:, self.embedding_dim :].contiguous().view(torch.float32)
        return codes * scale_bias[:, :1] + scale_bias[:, 1:]

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # The fused kernel sums (mode 0); the mean divides by the bag sizes, and an empty bag stays zero.
        summed = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            self.packed, ids, offsets, False, 0, False, None, None, False
        )
        if self.mode == "sum":
            return summed
        sizes = torch.diff(offsets, append=torch.tensor([ids.numel()], dtype=offsets.dtype, device=offsets.device))
        return summed / sizes.clamp(min=1).unsqueeze(1).to(summed.dtype)


# A fused table update (`RowwiseAdam.update_from_bag`): takes the table's factored gradient, steps the table.
TableUpdate = Callable[["BagGradient"], None]


class _TableBag(torch.autograd.Function):
    """A sum- or mean-pooled embedding bag whose backward gives the table's gradient summed per distinct row (a
    coalesced sparse tensor, from the compiled `table_kernels.bag_gradient`), where EmbeddingBag's writes a row per
    n-gram occurrence (316k rows of d floats for 512 IMDB reviews) that every optimizer then has to sum. The forward
    is EmbeddingBag's own; the gradient is the same up to float rounding. With `update` (a row-wise optimizer fused
    into the backward, see `DanStudent.table_updated_in_backward`) the table is stepped here and gets no gradient."""

    @staticmethod
    def forward(  # noqa: ANN205 (torch's signature)
        ctx,
        weight: torch.Tensor,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        mean: bool,
        position: np.ndarray,
        update: TableUpdate | None,
        plan: BagPlan | None,
    ):
        ctx.save_for_backward(ids, offsets)
        ctx.mean, ctx.position, ctx.shape, ctx.update, ctx.plan = mean, position, weight.shape, update, plan
        return F.embedding_bag(ids, weight, offsets, mode="mean" if mean else "sum")

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor):  # noqa: ANN205 (torch's signature)
        from sparse_distill.table_kernels import PARALLEL_LOCK, bag_gradient

        ids, offsets = ctx.saved_tensors
        pooled = grad_pooled.detach().float().contiguous().numpy()
        with PARALLEL_LOCK:
            grad = bag_gradient(ids.numpy(), offsets.numpy(), pooled, ctx.mean, ctx.position, ctx.plan)
        if ctx.update is not None:
            ctx.update(grad)  # the optimizer steps the table here; it gets no .grad
            return None, None, None, None, None, None, None
        with PARALLEL_LOCK:
            summed = grad.summed()
        table_grad = torch.sparse_coo_tensor(
            torch.from_numpy(grad.rows).unsqueeze(0), torch.from_numpy(summed), ctx.shape, is_coalesced=True
        )
        return table_grad, None, None, None, None, None, None


class MemberLinear(nn.Module):
    """`members` independent linear layers applied at once: input `[members, n, in]`, output `[members, n, out]`
    (one batched matmul). Each member's weights are initialised as `nn.Linear`'s."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))
        bound = 1 / in_features**0.5  # nn.Linear's default: uniform within 1/sqrt(fan_in), weights and bias alike
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class DanStudent(nn.Module):
    """Deep Averaging Network: pooled n-gram embeddings, then two dense layers. With `config.members` > 1, that many
    DANs side by side, each on its own share of the table's columns, averaged (see `head`)."""

    def __init__(self, config: DanConfig, *, init_table: bool = True) -> None:
        """`init_table=False`: the table is left uninitialised, for a model about to receive loaded weights (on the
        meta device, `nn.init.normal_` would import torch._dynamo, about a second of start-up for nothing)."""
        super().__init__()
        if config.layers < 1:
            raise ValueError(f"layers must be >= 1, got {config.layers}")
        if config.members < 1 or config.dim % config.members:
            raise ValueError(f"dim {config.dim} does not split into {config.members} equal members")
        self.config = config
        # sparse=True: the backward pass yields gradients for the looked-up rows only, which SparseAdam consumes.
        # EmbeddingBag has no sparse max mode: max pooling gathers rows sparsely and reduces them itself.
        mode = "sum" if config.pooling == "max" else config.pooling
        self.embedding: nn.Module
        if config.table_dtype == "int8":
            self.embedding = Int8EmbeddingBag(config.vocab_size, config.dim, mode=mode)
        else:
            dtype = torch.float16 if config.table_dtype == "float16" else torch.float32
            # A given `_weight` skips EmbeddingBag's own initialisation.
            empty = None if init_table else torch.empty(config.vocab_size, config.dim, dtype=dtype)
            self.embedding = nn.EmbeddingBag(
                config.vocab_size, config.dim, mode=mode, sparse=True, dtype=dtype, _weight=empty
            )
            if init_table:
                nn.init.normal_(self.embedding.weight, std=config.init_std)
        self.dropout = nn.Dropout(config.dropout)
        # One member keeps plain Linear layers (and the keys and shapes of every student saved before members).
        k = config.members
        linear = (lambda i, o: nn.Linear(i, o)) if k == 1 else (lambda i, o: MemberLinear(k, i, o))
        self.fc1 = linear(config.dim // k, config.hidden)
        # Extra hidden layers (for the depth ablation) sit between fc1 and fc2, so one-layer students keep their keys.
        self.extra = nn.ModuleList(linear(config.hidden, config.hidden) for _ in range(config.layers - 1))
        self.fc2 = linear(config.hidden, config.num_classes)
        # Training on a CPU: the table's gradient from the compiled kernel (see `_TableBag`); False: EmbeddingBag's.
        self.fused_table_grad = True
        # The kernel's table-long row numbering, all -1 between steps (made on first use; not part of the state).
        self._position: np.ndarray | None = None
        # Set while training with an optimizer fused into the backward (`table_updated_in_backward`).
        self._table_update: TableUpdate | None = None

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of bags: `ids` flat row ids, `offsets` each bag's start."""
        return self.head(self.pool(ids, offsets))

    def pool(self, ids: torch.Tensor, offsets: torch.Tensor, plan: BagPlan | None = None) -> torch.Tensor:
        """The pooled n-gram vector of each bag (float32), `[bags, dim]`. `plan`: the batch's `table_kernels.bag_plan`
        when made ahead (training's prefetch thread makes it), for the compiled backward."""
        if self.config.pooling == "max":
            return self._max_pool(ids, offsets)
        if self._table_bag_applies(ids):
            if self._position is None or len(self._position) != self.config.vocab_size:
                self._position = np.full(self.config.vocab_size, -1, np.int64)
            weight = self.embedding.weight
            mean = self.config.pooling == "mean"
            return _TableBag.apply(weight, ids, offsets, mean, self._position, self._table_update, plan)
        return self.embedding(ids, offsets).float()

    @contextmanager
    def table_updated_in_backward(self, optimizer: torch.optim.Optimizer) -> Iterator[bool]:
        """While inside, the backward pass steps the table with `optimizer` (one with `update_from_bag`: the row-wise
        ones) instead of giving it a gradient: the summed per-row gradient is never written (see `sparse_optim`).
        Yields whether it applies: not for other optimizers, max pooling, or a table off the CPU (they keep the
        gradient and `optimizer.step()`). Only inside, so that no other backward (an explanation's) moves the table."""
        update = getattr(optimizer, "update_from_bag", None)
        applies = (
            update is not None
            and getattr(optimizer, "fused", False)
            and self.config.pooling != "max"
            and self.compiled_table_backward()
        )
        self._table_update = update if applies else None
        try:
            yield applies
        finally:
            self._table_update = None

    def compiled_table_backward(self) -> bool:
        """Whether the table's gradient can come from `_TableBag`'s compiled backward: a float32 table on the CPU
        (not an int8 one, nor a GPU's)."""
        weight = getattr(self.embedding, "weight", None)
        return (
            self.fused_table_grad
            and weight is not None
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
        )

    def _table_bag_applies(self, ids: torch.Tensor) -> bool:
        """Whether this call takes `_TableBag`'s compiled backward: `compiled_table_backward`, and a gradient wanted."""
        return (
            self.compiled_table_backward()
            and self.embedding.weight.requires_grad
            and torch.is_grad_enabled()
            and ids.dtype == torch.int64
        )

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits of pooled document vectors (float32, shape (n, dim)): the dense layers alone (`head`; used by the
        explanations, in eval mode, where dropout is off)."""
        return self.head(pooled)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The dense layers: pooled vectors to logits. With several members, the log of the mean of their
        probabilities (a softmax of it gives the ensemble's distribution)."""
        logits = self.member_logits(pooled)
        if self.config.members == 1:
            return logits[:, 0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return torch.logsumexp(log_probs, dim=1) - math.log(self.config.members)

    def member_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each member's logits, `[n, members, classes]` (one member: the student's own; training runs them in bf16
        autocast on a GPU). Member k reads columns `[k * dim / members, (k + 1) * dim / members)`."""
        x = self.dropout(pooled)
        # [members, n, dim / members]; nn.Linear (one member) and MemberLinear both map the last axis.
        hidden = torch.relu(self.fc1(x.reshape(len(x), self.config.members, -1).transpose(0, 1)))
        for layer in self.extra:
            hidden = torch.relu(layer(hidden))
        return self.fc2(hidden).transpose(0, 1)

    def table_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the n-gram table as float32 (an int8 table dequantised row by row), shape (len(ids), dim)."""
        if isinstance(self.embedding, Int8EmbeddingBag):
            return self.embedding.dequantize(ids)
        return self.embedding.weight[ids].float()

    def _max_pool(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        vectors = F.embedding(ids, self.embedding.weight, sparse=True).float()
        lengths = torch.diff(offsets, append=torch.tensor([ids.numel()], dtype=offsets.dtype, device=offsets.device))
        doc = torch.repeat_interleave(torch.arange(len(offsets), device=ids.device), lengths)
        pooled = torch.zeros(len(offsets), self.config.dim, dtype=torch.float32, device=vectors.device)
        # include_self=False: an empty document stays all zeros, as in EmbeddingBag.
        return pooled.scatter_reduce(0, doc[:, None].expand_as(vectors), vectors, "amax", include_self=False)

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("embedding.")]

    def param_counts(self) -> dict[str, int]:
        """Total, sparse (embedding table) and dense parameter counts."""
        sparse = self.config.vocab_size * self.config.dim
        dense = sum(p.numel() for p in self.dense_parameters())
        return {"total": sparse + dense, "sparse": sparse, "dense": dense}


def save_student(model: DanStudent, label_map: LabelMap, vocab_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a self-contained model folder: weights (safetensors), shape, label map and vocabulary.

    The folder is written beside the target and renamed into place, so a reader never sees a half-written model.
    """

    def write(tmp: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / STUDENT_WEIGHTS))
        atomic_write_text(tmp / STUDENT_CONFIG, json.dumps(asdict(model.config), indent=2))
        label_map.save(tmp / LABEL_MAP)
        for name in ("vocab.parquet", "vocab.json", "vocab.lookup.npz"):
            if name.endswith(".npz") and not (Path(vocab_dir) / name).exists():
                continue  # built on first load when missing
            shutil.copy2(Path(vocab_dir) / name, tmp / name)

    return write_dir_atomically(out_dir, write)


def load_student(model_dir: str | Path, mmap: bool = True) -> tuple[DanStudent, LabelMap]:
    """Load a student and its label map from a model folder (weights memory-mapped by safetensors)."""
    model_dir = Path(model_dir)
    config = read_dan_config(model_dir)
    try:
        state = load_file(str(model_dir / STUDENT_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own (SafetensorError) for a truncated file
        raise DataError(f"{model_dir / STUDENT_WEIGHTS}: not a readable safetensors file ({e})") from e
    if mmap:
        # Built on the meta device, the module allocates and initialises nothing (a 4 GB table took ~15 s); the
        # memory-mapped tensors are then assigned as its parameters, so pages load on first use and are shared.
        with torch.device("meta"):
            model = DanStudent(config, init_table=False)
        model.load_state_dict(state, assign=True)
    else:
        model = DanStudent(config)
        model.load_state_dict(state)
    model.eval()
    return model, LabelMap.load(model_dir / LABEL_MAP)


def quantize_student(model_dir: str | Path, out_dir: str | Path, table_dtype: str) -> Path:
    """Write a copy of a float32 student whose n-gram table is stored as float16 or int8 (row-wise scale and offset).

    The dense layers stay float32. Smaller on disk and in memory, and the gather reads fewer bytes; the accuracy
    change is worth measuring on held-out data (`sparse-distill quantize --eval FILE` does).
    """
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"table_dtype must be one of {TABLE_DTYPES}, not {table_dtype!r}")
    model, label_map = load_student(model_dir)
    if model.config.table_dtype != "float32":
        raise ValueError(f"{model_dir}: the table is already {model.config.table_dtype}; quantise a float32 student")
    if table_dtype == "int8" and model.config.pooling == "max":
        raise ValueError(f"{model_dir}: int8 tables support mean or sum pooling, not max")
    config = DanConfig(**{**asdict(model.config), "table_dtype": table_dtype})
    with torch.device("meta"):
        out = DanStudent(config, init_table=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding.")}
    weight = model.embedding.weight.detach()
    if table_dtype == "int8":
        state["embedding.packed"] = Int8EmbeddingBag.from_float(weight).packed
    else:
        state["embedding.weight"] = weight.to(torch.float16 if table_dtype == "float16" else torch.float32)
    out.load_state_dict(state, assign=True)
    logger.info("%s: table stored as %s -> %s", model_dir, table_dtype, out_dir)
    return save_student(out.eval(), label_map, model_dir, out_dir)


def merge_members(models: list[DanStudent]) -> DanStudent:
    """One student of `len(models)` members from single-member students of one shape (trained apart, e.g. with
    their own seeds): their tables side by side as one table's columns, their dense layers stacked. It predicts the
    mean of their probabilities, and costs one table of their summed width to store and to gather."""
    first = models[0].config
    if any(m.config != first for m in models) or first.members != 1 or first.table_dtype != "float32":
        raise ValueError("members must be float32 single-member students of one shape")
    config = DanConfig(**{**asdict(first), "dim": first.dim * len(models), "members": len(models)})
    with torch.device("meta"):
        merged = DanStudent(config, init_table=False)
    states = [m.state_dict() for m in models]
    state = {"embedding.weight": torch.cat([s["embedding.weight"] for s in states], dim=1)}
    for key in states[0]:
        if key != "embedding.weight":
            state[key] = torch.stack([s[key] for s in states])
    merged.load_state_dict(state, assign=True)
    return merged.train(models[0].training)


def split_member(model: DanStudent, index: int) -> DanStudent:
    """Member `index` of a student of several members, as a single-member student (the inverse of
    `merge_members`)."""
    k = model.config.members
    if not 0 <= index < k or model.config.table_dtype != "float32":
        raise ValueError(f"member {index} of a {model.config.table_dtype} student of {k}: not a float32 member")
    width = model.config.dim // k
    config = DanConfig(**{**asdict(model.config), "dim": width, "members": 1})
    with torch.device("meta"):
        single = DanStudent(config, init_table=False)
    state = model.state_dict()
    one = {"embedding.weight": state["embedding.weight"][:, index * width : (index + 1) * width].clone()}
    one.update({key: value[index].clone() for key, value in state.items() if key != "embedding.weight"})
    single.load_state_dict(one, assign=True)
    return single


def init_table_from_vectors(model: DanStudent, vectors: np.ndarray) -> None:
    """Initialise the n-gram table from one vector per row (e.g. each n-gram's text encoded by the teacher).

    Fewer vectors than rows set the first rows only: the n-grams' rows come first, and the subword buckets after them
    keep their random init (a bucket is no one text to encode). Vectors wider than the table are projected onto their
    top principal components; every column is then scaled to the table's init std, so the dense layers see inputs
    of the usual size.
    """
    if model.config.table_dtype != "float32":
        raise ValueError("only a float32 table can be initialised")
    rows, dim = model.embedding.weight.shape
    if vectors.shape[0] > rows:
        raise ValueError(f"{vectors.shape[0]} vectors for a table of {rows} rows")
    x = torch.from_numpy(np.asarray(vectors, np.float32))
    x = x - x.mean(0, keepdim=True)
    if x.shape[1] > dim:
        # pca_lowrank draws a random projection: a fixed seed, apart from the global stream, makes the table (and the
        # components' signs) the same whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, _, v = torch.pca_lowrank(x, q=dim, center=False)
        x = x @ v[:, :dim]
    elif x.shape[1] < dim:
        raise ValueError(f"vectors have {x.shape[1]} columns, fewer than the table's {dim}")
    x = x / x.std(0, keepdim=True).clamp_min(1e-8) * model.config.init_std
    with torch.no_grad():
        model.embedding.weight[: len(x)].copy_(x)
