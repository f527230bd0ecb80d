"""`DualHeadDistillationTrainer`: Dual-Head Knowledge Distillation (DHKD) and the baselines that show head collapse."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ..validation import check_number
from .distillation_losses import LOGIT_LOSSES, hinton_kd_loss

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
        if self.gradient_alignment and self.mode in ("ce", "logit"):
            raise ValueError(
                f"DualHeadDistillationConfig: gradient_alignment needs two loss terms; mode={self.mode!r} has one."
            )


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
        if teacher_model is None and args.mode != "ce":
            raise ValueError(f"DualHeadDistillationTrainer: mode={args.mode!r} needs a teacher_model.")
        if teacher_model is not None and model is not None:
            n_s = getattr(getattr(model, "config", None), "num_labels", None)
            n_t = getattr(getattr(teacher_model, "config", None), "num_labels", None)
            if n_s is not None and n_t is not None and n_s != n_t:
                raise ValueError(
                    f"DualHeadDistillationTrainer: teacher has num_labels={n_t} but the student has {n_s}; "
                    "distillation needs the same label space."
                )
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher_model
        if self.teacher is not None:
            self.teacher.requires_grad_(False).eval()
            self.teacher.to(self.accelerator.device)
        # compute_loss returns a per-batch mean: the Trainer must still divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._loss_terms: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ------------------------------------------------------------------------------------------------ loss
    def _alpha_now(self) -> float:
        args: DualHeadDistillationConfig = self.args
        if args.logit_loss_until is not None and self.state.max_steps:
            if self.state.global_step >= args.logit_loss_until * self.state.max_steps:
                return 0.0
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
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)
        teacher_logits = None
        if self.teacher is not None and self.args.mode != "ce":
            with torch.no_grad():
                teacher_logits = self.teacher(**model_inputs).logits.detach()
        prob_part, distill_part, terms = self.loss_terms(outputs, teacher_logits, labels)
        parts = [p for p in (prob_part, distill_part) if p is not None]
        loss = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if self.args.gradient_alignment and model.training and torch.is_grad_enabled() and len(parts) == 2:
            loss, conflict = self._aligned_surrogate(model, prob_part, distill_part, loss)
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

    @staticmethod
    def _aligned_surrogate(
        model: nn.Module, prob_part: torch.Tensor, distill_part: torch.Tensor, loss: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-sided PCGrad, folded into a surrogate loss so the Trainer's own backward applies it.

        g_ce = ∇ prob_part, g_kd = ∇ distill_part over the whole flattened parameter vector. If g_kd·g_ce < 0,
        g_kd ← g_kd − (g_kd·g_ce)/‖g_ce‖²·g_ce. The surrogate Σ_p ⟨p, g_p⟩ has exactly g = g_ce + g_kd as its
        gradient and the true loss as its value, so GA scaling, DDP reduction and clipping work unchanged.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        g_ce = torch.autograd.grad(prob_part, params, retain_graph=True, allow_unused=True)
        g_kd = torch.autograd.grad(distill_part, params, allow_unused=True)
        g_ce = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_ce)]
        g_kd = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_kd)]
        dot = sum((a * b).sum() for a, b in zip(g_kd, g_ce))
        conflict = (dot < 0).float()
        if dot < 0:
            sq = sum((b * b).sum() for b in g_ce).clamp_min(1e-20)
            g_kd = [a - (dot / sq) * b for a, b in zip(g_kd, g_ce)]
        surrogate = sum((p * (a + b).detach()).sum() for p, a, b in zip(params, g_ce, g_kd))
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
