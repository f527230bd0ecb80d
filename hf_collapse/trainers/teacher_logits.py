"""Offline teacher logits for distillation: run the teacher once, train the student many epochs without it.

`precompute_teacher_logits(teacher, dataset)` returns the dataset with a `teacher_logits` column (or, with
`top_k`, the columns `teacher_logits_topk_values` / `teacher_logits_topk_indices`); `DualHeadDistillationTrainer`
uses those columns instead of running a teacher.

When it does not apply: the cached logits are the teacher's output for the stored input. With data augmentation that
changes the input each epoch (random crops, flips, mixup), the teacher would have seen a different image than the
student does, so cache logits per augmented view or keep the live teacher.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = [
    "TEACHER_LOGITS",
    "TEACHER_TOPK_VALUES",
    "TEACHER_TOPK_INDICES",
    "TEACHER_COLUMNS",
    "TeacherColumnsCollator",
    "TeacherLogitsDataset",
    "has_teacher_logits",
    "precompute_teacher_logits",
    "teacher_logits_from_batch",
]

TEACHER_LOGITS = "teacher_logits"
TEACHER_TOPK_VALUES = "teacher_logits_topk_values"
TEACHER_TOPK_INDICES = "teacher_logits_topk_indices"
TEACHER_COLUMNS = (TEACHER_LOGITS, TEACHER_TOPK_VALUES, TEACHER_TOPK_INDICES)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TeacherLogitsDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items are the wrapped dataset's items plus the cached teacher columns."""

    def __init__(self, dataset: Any, columns: dict[str, torch.Tensor]) -> None:
        n = len(dataset)
        for name, values in columns.items():
            if values.shape[0] != n:
                raise ValueError(f"{name} has {values.shape[0]} rows for a dataset of {n} items")
        self.dataset = dataset
        self.columns = columns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], **{name: values[i] for name, values in self.columns.items()}}


def _teacher_inputs(teacher: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    accepted = inspect.signature(teacher.forward).parameters
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
        if k not in ("labels", "label", *TEACHER_COLUMNS) and (takes_any or k in accepted)
    }


@torch.no_grad()
def precompute_teacher_logits(
    teacher: nn.Module,
    dataset: Any,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float16,
    top_k: int | None = None,
    data_collator: Any = None,
    device: str | torch.device | None = None,
) -> Any:
    """Run `teacher` over `dataset` once (in order, eval mode) and attach its logits to every item.

    Args:
        teacher: any classifier whose output has `.logits` `(batch, num_labels)`.
        dataset: a `datasets.Dataset` or a map-style torch dataset of dicts (`pixel_values` / `input_ids`, ...).
        batch_size: teacher batch size.
        dtype: storage dtype of the logits: `torch.float16` (half the memory; the loss casts back to float32),
            `torch.bfloat16` or `torch.float32` (bit-identical to the live teacher).
        top_k: keep only the k largest logits per item (values and class indices). The trainer fills the other
            classes with the smallest kept value, an upper bound of the dropped ones: an approximation, exact only
            when `top_k` is the number of classes.
        data_collator: batches the items (default: transformers' `default_data_collator`; pass a padding collator
            for variable-length text).
        device: where the teacher runs (default: the teacher's device).

    Returns:
        For a `datasets.Dataset`: a new `datasets.Dataset` with the column(s) added. Otherwise a
        `TeacherLogitsDataset` wrapping `dataset`.
    """
    from transformers import default_data_collator

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there is nothing to run the teacher on")
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=data_collator or default_data_collator
    )
    chunks = []
    try:
        for batch in loader:
            logits = teacher(**_teacher_inputs(teacher, batch, device)).logits.float()  # (B, C)
            if not torch.isfinite(logits).all():
                raise ValueError("the teacher produced NaN or infinite logits; check its weights and inputs")
            chunks.append(logits.cpu())
    finally:
        teacher.train(was_training)
    logits = torch.cat(chunks)  # (N, C)
    if top_k is not None:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= logits.shape[-1]:
            raise ValueError(f"top_k must be an integer in [1, {logits.shape[-1]}], got {top_k!r}")
        values, indices = logits.topk(top_k, dim=-1)
        columns = {TEACHER_TOPK_VALUES: values.to(dtype), TEACHER_TOPK_INDICES: indices.to(torch.int16 if
                   logits.shape[-1] < 2**15 else torch.int32)}  # fmt: skip
    else:
        columns = {TEACHER_LOGITS: logits.to(dtype)}
    if hasattr(dataset, "add_column") and hasattr(dataset, "column_names"):
        import datasets

        dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
        # numpy keeps the storage dtype in Arrow (float16 stays half precision; a list of floats would be float64)
        as_numpy = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in columns.items()}
        return datasets.concatenate_datasets([dataset, datasets.Dataset.from_dict(as_numpy)], axis=1)
    return TeacherLogitsDataset(dataset, columns)


class TeacherColumnsCollator:
    """Wraps a data collator so the cached teacher columns bypass it.

    Padding collators (`DataCollatorWithPadding`, the default of a `Trainer` given a tokenizer) pad every field of
    the items and fail on a per-item logits vector. The wrapped collator sees the items without the teacher columns;
    those are stacked `(B, C)` / `(B, k)` and added to its batch. Items without teacher columns pass through
    unchanged, so wrapping is harmless for any dataset.
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[Any]) -> Any:
        first = features[0] if features else None
        present = [c for c in TEACHER_COLUMNS if isinstance(first, dict) and c in first]
        if not present:
            return self.collator(features)
        batch = self.collator([{k: v for k, v in f.items() if k not in present} for f in features])
        for c in present:
            batch[c] = torch.stack([torch.as_tensor(f[c]) for f in features])
        return batch


def has_teacher_logits(dataset: Any) -> bool:
    """Whether `dataset` carries cached teacher logits (a `datasets.Dataset` column or a `TeacherLogitsDataset`)."""
    if isinstance(dataset, TeacherLogitsDataset):
        return True
    return any(c in (getattr(dataset, "column_names", None) or ()) for c in TEACHER_COLUMNS)


def teacher_logits_from_batch(batch: dict[str, Any], num_labels: int | None) -> torch.Tensor | None:
    """Dense float32 teacher logits `(B, C)` from the cached columns of a batch, or None when it has none."""
    if TEACHER_LOGITS in batch:
        return torch.as_tensor(batch[TEACHER_LOGITS]).float()
    if TEACHER_TOPK_VALUES in batch:
        values = torch.as_tensor(batch[TEACHER_TOPK_VALUES]).float()  # (B, k)
        indices = torch.as_tensor(batch[TEACHER_TOPK_INDICES]).long()  # (B, k)
        if num_labels is None:
            raise ValueError("top-k teacher logits need the student's config.num_labels to rebuild dense logits")
        dense = values.min(dim=-1, keepdim=True).values.expand(-1, num_labels).clone()
        return dense.scatter_(-1, indices, values)
    return None
