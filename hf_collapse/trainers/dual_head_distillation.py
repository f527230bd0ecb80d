"""`DualHeadDistillationTrainer`: Dual-Head Knowledge Distillation (DHKD) and the baselines that show head collapse."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ..validation import check_finite_fields, check_number
from .distillation_losses import LOGIT_LOSSES, hinton_kd_loss
from .teacher_logits import TEACHER_COLUMNS, TeacherColumnsCollator, has_teacher_logits, teacher_logits_from_batch

__all__ = ["DualHeadDistillationConfig", "DualHeadDistillationTrainer", "MODES"]

MODES = ("dhkd", "kd", "naive", "logit", "ce")


@dataclass
class DualHeadDistillationConfig(TrainingArguments):
    r"""Training arguments of [`DualHeadDistillationTrainer`] (a `TrainingArguments` subclass).

    The total loss is `gamma·CE(main) + alpha·L_distill (+ beta·KD(main) in dhkd)`, as in the official code.

    Modes (the paper's method and its baselines):

    | mode    | main head                         | aux head                 |
    |---------|-----------------------------------|--------------------------|
    | `ce`    | gamma·CE                          | unused                   |
    | `kd`    | gamma·CE + alpha·KD_T             | unused                   |
    | `logit` | alpha·L_logit                     | unused                   |
    | `naive` | gamma·CE + alpha·L_logit          | unused (head collapse)   |
    | `dhkd`  | gamma·CE + beta·KD_T              | alpha·L_logit            |
    """

    mode: str = field(default="dhkd", metadata={"help": f"One of {MODES}; see the class docstring."})
    alpha: float = field(
        default=1.0,
        metadata={"help": "Weight of the mode's distillation term (Hinton KD in kd; the logit loss in logit/naive/dhkd)."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Weight of CE on the main head (unused in logit mode)."})
    beta: float = field(default=0.0, metadata={"help": "Extra Hinton KD on the main head in dhkd mode."})
    temperature: float = field(default=2.0, metadata={"help": "Temperature T of the logit-level loss."})
    kd_temperature: float = field(default=4.0, metadata={"help": "Temperature of Hinton KD."})
    logit_loss: str = field(
        default="binary_kl_norm", metadata={"help": f"Logit-level loss, one of {tuple(LOGIT_LOSSES)}."}
    )
    gradient_alignment: bool = field(
        default=False,
        metadata={
            "help": "One-sided PCGrad: if the distillation gradient conflicts with the CE gradient (negative dot "
            "product over all parameters), project it onto CE's normal plane. Costs a second backward pass."
        },
    )
    logit_loss_until: float | None = field(
        default=None,
        metadata={"help": "Fraction of training after which alpha becomes 0 (the paper's ImageNet recipe)."},
    )
    alpha_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of training over which alpha rises linearly from 0 to its value, as logit-distillation "
            "recipes (e.g. DKD) warm up the distillation term so that early, large logit gradients cannot derail "
            "training. 0 (default) uses the full alpha from the first step."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"DualHeadDistillationConfig: mode must be one of {MODES}, got {self.mode!r}.")
        if self.logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"DualHeadDistillationConfig: logit_loss must be one of {tuple(LOGIT_LOSSES)}.")
        owner = "DualHeadDistillationConfig"
        for name in ("alpha", "gamma", "beta"):
            setattr(self, name, check_number(owner, name, getattr(self, name), minimum=0.0))
        for name in ("temperature", "kd_temperature"):
            setattr(self, name, check_number(owner, name, getattr(self, name), minimum=0.0, exclusive_minimum=True))
        self.logit_loss_until = check_number(owner, "logit_loss_until", self.logit_loss_until, minimum=0.0,
                                             maximum=1.0, allow_none=True)  # fmt: skip
        self.alpha_warmup_ratio = check_number(owner, "alpha_warmup_ratio", self.alpha_warmup_ratio, minimum=0.0,
                                               maximum=1.0)  # fmt: skip
        if self.gradient_alignment and self.mode in ("ce", "logit"):
            raise ValueError(
                f"DualHeadDistillationConfig: gradient_alignment needs two loss terms; mode={self.mode!r} has one."
            )
        check_finite_fields("DualHeadDistillationConfig", self)  # TrainingArguments itself lets learning_rate=nan through


class DualHeadDistillationTrainer(Trainer):
    """Distils `teacher_model` into `model` with DHKD (or a baseline, see `DualHeadDistillationConfig.mode`).

    The student must return `aux_logits` in `dhkd` mode (e.g. `DualHeadForImageClassification`); the single-head
    modes accept any classifier. The teacher is frozen, put in eval mode, moved to the student's device, and never
    given to the optimizer or wrapped in DDP. Every loss term is logged on its own (`loss_ce`, `loss_kd`,
    `loss_logit`, ...).
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | None = None,
        args: DualHeadDistillationConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, DualHeadDistillationConfig):
            raise TypeError("DualHeadDistillationTrainer needs args=DualHeadDistillationConfig(...).")
        if teacher_model is None and args.mode != "ce" and not has_teacher_logits(kwargs.get("train_dataset")):
            raise ValueError(
                f"DualHeadDistillationTrainer: mode={args.mode!r} needs a teacher_model, or a train_dataset with cached "
                "teacher logits (hf_collapse.precompute_teacher_logits)."
            )
        if teacher_model is not None and model is not None:
            n_s = getattr(getattr(model, "config", None), "num_labels", None)
            n_t = getattr(getattr(teacher_model, "config", None), "num_labels", None)
            if n_s is not None and n_t is not None and n_s != n_t:
                raise ValueError(
                    f"DualHeadDistillationTrainer: teacher has num_labels={n_t} but the student has {n_s}; "
                    "distillation needs the same label space."
                )
        super().__init__(model=model, args=args, **kwargs)
        # cached teacher logits must not reach a padding collator (it would try to pad them)
        self.data_collator = TeacherColumnsCollator(self.data_collator)
        self.teacher = teacher_model
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval()
            self.teacher.to(self.accelerator.device)
        # Have the Trainer count the labels of the whole accumulated batch (num_items_in_batch): compute_loss divides
        # by that count, so an unequal last micro-batch weighs each sample as the equivalent large batch does.
        # Classification labels are never shifted, so every label is one item.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = False
        self._loss_terms: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # gradient alignment over an accumulated batch: running sums of the two gradients (see _aligned_surrogate)
        self._accumulated_grads: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def _set_signature_columns_if_needed(self) -> None:
        # the cached teacher columns are not arguments of the student's forward; keep them in the batches
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *TEACHER_COLUMNS]

    # ------------------------------------------------------------------------------------------------ loss
    def _alpha_now(self) -> float:
        """The distillation weight at the current optimizer step (warm-up and `logit_loss_until` applied)."""
        args: DualHeadDistillationConfig = self.args
        max_steps, step = self.state.max_steps, self.state.global_step
        if not max_steps:  # outside train() (e.g. evaluate() alone): the configured weight
            return args.alpha
        if args.logit_loss_until is not None and step >= args.logit_loss_until * max_steps:
            return 0.0
        if args.alpha_warmup_ratio > 0:
            # step + 1: the first update already carries a small share of the term, as in DKD's min(epoch/warmup, 1)
            return args.alpha * min(1.0, (step + 1) / (args.alpha_warmup_ratio * max_steps))
        return args.alpha

    def loss_terms(
        self, student_out: Any, teacher_logits: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Split the loss into (probability-level part, distillation part, named terms for logging).

        The split is the one gradient alignment projects: the first part is CE (+ beta·KD in dhkd), the second
        the mode's distillation term.
        """
        args: DualHeadDistillationConfig = self.args
        logits = student_out["logits"]
        terms: dict[str, torch.Tensor] = {}
        prob_part = distill_part = None
        if args.mode != "logit":
            if labels is None:
                raise ValueError(f"mode={args.mode!r} needs `labels` in the batch.")
            terms["loss_ce"] = F.cross_entropy(logits.float(), labels.view(-1))
            prob_part = args.gamma * terms["loss_ce"]
        alpha = self._alpha_now()
        logit_loss = LOGIT_LOSSES[args.logit_loss]
        if args.mode == "kd":
            terms["loss_kd"] = hinton_kd_loss(logits, teacher_logits, args.kd_temperature)
            distill_part = alpha * terms["loss_kd"]
        elif args.mode in ("logit", "naive"):
            terms["loss_logit"] = logit_loss(logits, teacher_logits, args.temperature)
            distill_part = alpha * terms["loss_logit"]
        elif args.mode == "dhkd":
            aux = student_out.get("aux_logits") if hasattr(student_out, "get") else None
            if aux is None:
                raise ValueError(
                    "mode='dhkd' needs a student that returns `aux_logits` (e.g. DualHeadForImageClassification); "
                    "use mode='naive' for a single-head student."
                )
            terms["loss_logit_aux"] = logit_loss(aux, teacher_logits, args.temperature)
            distill_part = alpha * terms["loss_logit_aux"]
            if args.beta > 0:
                terms["loss_kd"] = hinton_kd_loss(logits, teacher_logits, args.kd_temperature)
                prob_part = prob_part + args.beta * terms["loss_kd"]
        return prob_part, distill_part, terms

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = inputs.get("labels")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in TEACHER_COLUMNS}
        outputs = model(**model_inputs)
        teacher_logits = None
        if self.args.mode != "ce":
            num_labels = getattr(getattr(self.accelerator.unwrap_model(model), "config", None), "num_labels", None)
            teacher_logits = teacher_logits_from_batch(inputs, num_labels)
            if teacher_logits is None:
                if self.teacher is None:
                    raise ValueError(
                        f"mode={self.args.mode!r} needs a teacher_model or a dataset with cached teacher logits "
                        "(hf_collapse.precompute_teacher_logits)."
                    )
                with torch.no_grad():
                    teacher_logits = self.teacher(**model_inputs).logits.detach()
            teacher_logits = teacher_logits.to(outputs["logits"].device)
        prob_part, distill_part, terms = self.loss_terms(outputs, teacher_logits, labels)
        parts = [p for p in (prob_part, distill_part) if p is not None]
        if num_items_in_batch is not None and model.training:
            # the loss terms are batch means; turn them into sums over this micro-batch divided by the number of
            # items in the whole accumulated (and, under DDP, global) batch
            scale = outputs["logits"].shape[0] / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                scale = scale * self.accelerator.num_processes  # DDP averages the gradients over processes
            parts = [p * scale for p in parts]
            self.loss_is_scaled_for_ga = True
        else:
            self.loss_is_scaled_for_ga = False  # a batch mean: the Trainer divides by the accumulation steps
        loss = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if self.args.gradient_alignment and model.training and torch.is_grad_enabled() and len(parts) == 2:
            loss, conflict = self._aligned_surrogate(model, parts[0], parts[1], loss)
            if conflict is not None:
                terms["grad_conflict"] = conflict
        split = "train" if model.training else "eval"
        if terms:
            names = list(terms)
            values = torch.stack([terms[n].detach().float() for n in names])
            # under DDP every rank sees its own shard: log the mean over ranks, as the Trainer does for `loss`
            values = self.accelerator.gather(values[None]).mean(0) if self.accelerator.num_processes > 1 else values
            for name, value in zip(names, values.tolist()):
                self._loss_terms[split][name].append(value)
        if return_outputs:
            return loss, outputs
        return loss

    def _aligned_surrogate(
        self, model: nn.Module, prob_part: torch.Tensor, distill_part: torch.Tensor, loss: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One-sided PCGrad over the whole accumulated (and global) batch, folded into a surrogate loss.

        With G_ce and G_kd the gradients of the two parts summed over the micro-batches of one optimizer step (and
        averaged over processes), the update direction is G_ce + G_kd − min(0, G_kd·G_ce)/‖G_ce‖²·G_ce. Every
        micro-batch contributes its own g_ce + g_kd; the last one of the step also carries the projection term,
        computed from the running sums, so any split of the batch gives the large-batch update. The surrogate
        Σ_p ⟨p, g_p⟩ has exactly that gradient and the true loss as its value, so the Trainer's own backward,
        clipping and DDP reduction apply unchanged.

        Returns the surrogate and, at the last micro-batch of a step, whether the two gradients conflicted.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        g_ce = torch.autograd.grad(prob_part, params, retain_graph=True, allow_unused=True)
        g_kd = torch.autograd.grad(distill_part, params, allow_unused=True)
        g_ce = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_ce)]
        g_kd = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_kd)]
        if self._accumulated_grads is None:
            self._accumulated_grads = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])
        sum_ce, sum_kd = self._accumulated_grads
        for acc, g in zip(sum_ce + sum_kd, g_ce + g_kd):
            acc.add_(g)
        step = [a + b for a, b in zip(g_ce, g_kd)]
        conflict = None
        if self.accelerator.sync_gradients:  # last micro-batch of the optimizer step
            flat_ce, flat_kd = torch.cat([t.flatten() for t in sum_ce]), torch.cat([t.flatten() for t in sum_kd])
            if self.accelerator.num_processes > 1:
                both = self.accelerator.reduce(torch.stack([flat_ce, flat_kd]), reduction="mean")
                flat_ce, flat_kd = both[0], both[1]
            dot = flat_kd @ flat_ce
            conflict = (dot < 0).float()
            if dot < 0:
                coef = dot / (flat_ce @ flat_ce).clamp_min(1e-20)
                step = [s - coef * c for s, c in zip(step, sum_ce)]
            self._accumulated_grads = None
        surrogate = sum((p * g.detach()).sum() for p, g in zip(params, step))
        return loss.detach() + surrogate - surrogate.detach(), conflict

    # ------------------------------------------------------------------------------------------------- log
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for name, values in self._loss_terms[split].items():
            if values:
                logs[f"{prefix}{name}"] = sum(values) / len(values)
        self._loss_terms[split].clear()
        super().log(logs, start_time)
