"""DualHeadDistillationTrainer: losses vs a plain reference, modes, gradient alignment, GA, teacher handling."""

from __future__ import annotations

import pytest
import reference_dhkd as ref
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification

from hf_collapse import (
    DualHeadConfig,
    DualHeadDistillationConfig,
    DualHeadDistillationTrainer,
    DualHeadForImageClassification,
    DualHeadForSequenceClassification,
)
from hf_collapse.trainers.distillation_losses import binary_kl_loss, binary_kl_norm_loss, hinton_kd_loss

NUM_LABELS = 4


class ImageData(Dataset):
    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 12, 12, generator=g)
        self.y = torch.randint(0, NUM_LABELS, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class TextData(Dataset):
    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (n, 6), generator=g)
        self.y = torch.randint(0, NUM_LABELS, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.y[i]}


def resnet_cfg(**kw):
    return ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **kw)


def bert_cfg(**kw):
    return BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw,
    )  # fmt: skip


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                per_device_train_batch_size=8, max_steps=2, logging_steps=1, seed=0, disable_tqdm=True)  # fmt: skip
    base.update(kw)
    return DualHeadDistillationConfig(**base)


def image_pair():
    torch.manual_seed(0)
    teacher = ResNetForImageClassification(resnet_cfg(num_labels=NUM_LABELS))
    student = DualHeadForImageClassification(DualHeadConfig(backbone_config=resnet_cfg(), num_labels=NUM_LABELS))
    return teacher, student


# ---------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_losses_match_plain_reference(T):
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    assert hinton_kd_loss(z_s, z_t, T).item() == pytest.approx(ref.hinton_kd(z_s, z_t, T), rel=1e-5)
    assert binary_kl_norm_loss(z_s, z_t, T).item() == pytest.approx(ref.binary_kl_norm(z_s, z_t, T), rel=1e-5)
    assert binary_kl_loss(z_s, z_t, T).item() == pytest.approx(ref.binary_kl(z_s, z_t, T), rel=1e-5)
    # zero iff the student matches the teacher
    assert binary_kl_norm_loss(z_t, z_t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_binary_kl_norm_gradient_is_bounded_formula():
    # |Δ/T| < 18 keeps d inside the official clamp [1e-8, 1-1e-8], where the gradient is not cut
    z_s = torch.tensor([[9.0, -3.0, 0.5]], requires_grad=True)
    z_t = torch.tensor([[0.0, 1.0, 0.5]])
    T = 2.0
    binary_kl_norm_loss(z_s, z_t, T).backward()
    expected = T * (torch.sigmoid((z_s - z_t) / T) - 0.5)  # (T/N)(σ(Δ/T) − ½) with N = 1
    torch.testing.assert_close(z_s.grad, expected.detach())


@pytest.mark.parametrize(
    "mode, extra",
    [("ce", {}), ("kd", {"alpha": 0.7}), ("logit", {"alpha": 0.5}), ("naive", {}), ("dhkd", {"beta": 0.3, "gamma": 0.8}),
     ("dhkd", {"logit_loss": "binary_kl"})],
)  # fmt: skip
def test_compute_loss_matches_reference_per_mode(tmp_path, mode, extra):
    teacher, student = image_pair()
    args = make_args(tmp_path, mode=mode, **extra)
    trainer = DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ImageData())
    batch = {"pixel_values": ImageData().x[:6], "labels": ImageData().y[:6]}
    student.eval()  # deterministic BN/dropout so the reference sees the same logits
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        out = student(pixel_values=batch["pixel_values"])
        t = teacher.eval()(pixel_values=batch["pixel_values"]).logits
    z, aux, y = out.logits, out.aux_logits, batch["labels"]
    a, gm, b = args.alpha, args.gamma, args.beta
    logit_ref = ref.binary_kl if args.logit_loss == "binary_kl" else ref.binary_kl_norm
    expected = {
        "ce": gm * ref.ce(z, y),
        "kd": gm * ref.ce(z, y) + a * ref.hinton_kd(z, t, 4.0),
        "logit": a * logit_ref(z, t, 2.0),
        "naive": gm * ref.ce(z, y) + a * logit_ref(z, t, 2.0),
        "dhkd": gm * ref.ce(z, y) + b * ref.hinton_kd(z, t, 4.0) + a * logit_ref(aux, t, 2.0),
    }[mode]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _head_grads(tmp_path, mode):
    teacher, student = image_pair()
    trainer = DualHeadDistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, mode=mode), train_dataset=ImageData()
    )
    ds = ImageData()
    trainer.compute_loss(student.train(), {"pixel_values": ds.x[:8], "labels": ds.y[:8]}).backward()
    aux_grad = sum(p.grad.abs().sum() for p in student.aux_classifier.parameters() if p.grad is not None)
    return student, aux_grad


def test_naive_uses_one_head_dhkd_uses_two(tmp_path):
    _, aux_naive = _head_grads(tmp_path, "naive")
    assert float(aux_naive) == 0.0
    student, aux_dhkd = _head_grads(tmp_path, "dhkd")
    assert float(aux_dhkd) > 0.0
    assert student.classifier.weight.grad.abs().sum() > 0


def test_dhkd_main_head_gets_only_the_probability_loss(tmp_path):
    teacher, student = image_pair()
    trainer = DualHeadDistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, mode="dhkd"), train_dataset=ImageData()
    )
    ds = ImageData()
    student.eval()
    trainer.compute_loss(student, {"pixel_values": ds.x[:8], "labels": ds.y[:8]}).backward()
    g_total = student.classifier.weight.grad.clone()
    student.zero_grad()
    torch.nn.functional.cross_entropy(student(pixel_values=ds.x[:8]).logits, ds.y[:8]).backward()
    torch.testing.assert_close(g_total, student.classifier.weight.grad)


def test_dhkd_needs_aux_logits(tmp_path):
    teacher, _ = image_pair()
    single = ResNetForImageClassification(resnet_cfg(num_labels=NUM_LABELS))
    trainer = DualHeadDistillationTrainer(
        model=single, teacher_model=teacher, args=make_args(tmp_path, mode="dhkd"), train_dataset=ImageData()
    )
    with pytest.raises(ValueError, match="aux_logits"):
        trainer.compute_loss(single, {"pixel_values": ImageData().x[:4], "labels": ImageData().y[:4]})


# ------------------------------------------------------------------------------------ gradient alignment
@pytest.mark.parametrize("mode", ["naive", "dhkd"])
def test_gradient_alignment_matches_hand_projection(tmp_path, mode):
    teacher, student = image_pair()
    student.eval()  # fixed BN statistics: both passes see identical activations
    args = make_args(tmp_path, mode=mode, gradient_alignment=True, alpha=3.0)
    trainer = DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ImageData())
    ds = ImageData()
    batch = {"pixel_values": ds.x[:8], "labels": ds.y[:8]}
    params = [p for p in student.parameters() if p.requires_grad]

    # hand computation: two separate backward passes, flat vectors, projection in float64
    with torch.no_grad():
        t = teacher.eval()(pixel_values=batch["pixel_values"]).logits

    def flat_grad(loss_fn):
        student.zero_grad()
        loss_fn(student(pixel_values=batch["pixel_values"])).backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    g_ce = flat_grad(lambda o: torch.nn.functional.cross_entropy(o.logits, batch["labels"]))
    head = "aux_logits" if mode == "dhkd" else "logits"
    g_kd = flat_grad(lambda o: 3.0 * binary_kl_norm_loss(o[head], t, 2.0))
    expected = ref.pcgrad_one_sided(g_ce, g_kd)

    student.zero_grad()
    # train() would change BN; keep eval but tell the trainer this is a training step
    student.training = True
    loss = trainer.compute_loss(student, dict(batch))
    student.training = False
    loss.backward()
    got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert float(g_kd @ g_ce) < 0 or torch.allclose(got.double(), (g_ce + g_kd).double(), atol=1e-6)


def test_gradient_alignment_rejected_for_single_term_modes(tmp_path):
    with pytest.raises(ValueError, match="gradient_alignment"):
        make_args(tmp_path, mode="ce", gradient_alignment=True)


# ----------------------------------------------------------------------------------- trainer behaviour
def test_teacher_frozen_eval_not_in_optimizer(tmp_path):
    teacher, student = image_pair()
    teacher.train()
    trainer = DualHeadDistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=ImageData()
    )
    trainer.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    opt_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    logged = {k for row in trainer.state.log_history for k in row}
    assert {"loss", "loss_ce", "loss_logit_aux"} <= logged


def test_num_labels_mismatch_raises(tmp_path):
    teacher = ResNetForImageClassification(resnet_cfg(num_labels=NUM_LABELS + 1))
    _, student = image_pair()
    with pytest.raises(ValueError, match="num_labels"):
        DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path))


def test_bad_mode_raises(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        make_args(tmp_path, mode="dkd")


def test_compute_metrics_sees_only_main_head(tmp_path):
    teacher, student = image_pair()
    seen = {}

    def compute_metrics(pred):
        seen["predictions"] = pred.predictions
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = DualHeadDistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=ImageData(), eval_dataset=ImageData(8, seed=3), compute_metrics=compute_metrics,
    )  # fmt: skip
    metrics = trainer.evaluate()
    assert not isinstance(seen["predictions"], tuple) and seen["predictions"].shape == (8, NUM_LABELS)
    student.eval()
    with torch.no_grad():
        main = student(pixel_values=ImageData(8, seed=3).x).logits
    torch.testing.assert_close(torch.as_tensor(seen["predictions"]), main)
    assert "eval_accuracy" in metrics and "eval_loss_ce" in metrics


def test_logit_loss_until_turns_alpha_off(tmp_path):
    teacher, student = image_pair()
    args = make_args(tmp_path, mode="dhkd", logit_loss_until=0.5, max_steps=4)
    trainer = DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ImageData())
    trainer.state.max_steps = 4
    trainer.state.global_step = 1
    assert trainer._alpha_now() == 1.0
    trainer.state.global_step = 2
    assert trainer._alpha_now() == 0.0


def test_alpha_warmup_ramps_the_distillation_term(tmp_path):
    teacher, student = image_pair()
    args = make_args(tmp_path, mode="naive", alpha=2.0, alpha_warmup_ratio=0.5, max_steps=8)
    trainer = DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ImageData())
    trainer.state.max_steps = 8
    alphas = []
    for step in range(6):
        trainer.state.global_step = step
        alphas.append(trainer._alpha_now())
    assert alphas == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])  # 2·(step+1)/(0.5·8), then the full weight
    # the weight reaches the loss itself: total = CE + alpha_now · logit loss
    trainer.state.global_step = 0
    batch = {"pixel_values": ImageData().x[:4], "labels": ImageData().y[:4]}
    student.train()
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        out = student(pixel_values=batch["pixel_values"])
        t = teacher(pixel_values=batch["pixel_values"]).logits
    expected = ref.ce(out.logits, batch["labels"]) + 0.5 * ref.binary_kl_norm(out.logits, t, 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("value", [float("nan"), -0.1, 1.5])
def test_alpha_warmup_ratio_rejects_bad_values(tmp_path, value):
    with pytest.raises(ValueError, match="alpha_warmup_ratio"):
        make_args(tmp_path, alpha_warmup_ratio=value)


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    """One SGD step with batch 8 equals 2 accumulated micro-batches of 4 (no BatchNorm, no dropout)."""

    def one_step(bs, ga):
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(bert_cfg(num_labels=NUM_LABELS))
        student = DualHeadForSequenceClassification(
            DualHeadConfig(backbone_config=bert_cfg(), num_labels=NUM_LABELS, aux_head="linear")
        )
        args = make_args(tmp_path, mode="dhkd", beta=0.5, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                         max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
        DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=TextData(8)).train()
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    full, accumulated = one_step(8, 1), one_step(4, 2)
    torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-6)


def test_save_model_reloads_with_auto_class(tmp_path):
    from transformers import AutoModelForImageClassification

    teacher, student = image_pair()
    trainer = DualHeadDistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path), train_dataset=ImageData()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert "library_name: hf-collapse" in (tmp_path / "ckpt" / "README.md").read_text()  # the model card
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "ckpt", use_safetensors=True)
    assert isinstance(reloaded, DualHeadForImageClassification)


@pytest.mark.parametrize("field, value", [("alpha", float("nan")), ("temperature", float("nan")),
                                          ("kd_temperature", float("inf")), ("beta", float("inf")),
                                          ("gamma", -1.0), ("temperature", 0.0)])  # fmt: skip
def test_non_finite_or_out_of_range_weights_raise(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"DualHeadDistillationConfig\.{field} must be a finite number"):
        DualHeadDistillationConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_distill_cli_rejects_nan_in_one_line(capsys):
    from hf_collapse.cli import main

    assert main(["distill", "--output_dir", "x", "--alpha", "nan"]) == 2
    err = capsys.readouterr().err
    assert "alpha must be a finite number >= 0, got nan" in err and "Traceback" not in err


def _one_step_params(tmp_path, n, bs, ga, dataset=None, teacher=True, **kw):
    torch.manual_seed(0)
    t = BertForSequenceClassification(bert_cfg(num_labels=NUM_LABELS))
    student = DualHeadForSequenceClassification(
        DualHeadConfig(backbone_config=bert_cfg(), num_labels=NUM_LABELS, aux_head="linear")
    )
    args = make_args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                     optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, **kw)  # fmt: skip
    data = dataset(t) if dataset is not None else TextData(n)
    DualHeadDistillationTrainer(model=student, teacher_model=t if teacher else None, args=args,
                                train_dataset=data).train()  # fmt: skip
    return torch.cat([p.detach().flatten() for p in student.parameters()])


def _conflicting_teacher(n):
    """Cached teacher logits that favour the wrong class, so the distillation gradient opposes CE's."""
    from hf_collapse.trainers.teacher_logits import TeacherLogitsDataset

    def make(_teacher):
        data = TextData(n)
        logits = torch.full((n, NUM_LABELS), 4.0).scatter_(1, data.y[:, None], -4.0)
        return TeacherLogitsDataset(data, {"teacher_logits": logits})

    return make


@pytest.mark.parametrize("mode, alignment", [("dhkd", False), ("naive", False), ("naive", True), ("dhkd", True)])
def test_unequal_micro_batches_give_the_large_batch_update(tmp_path, mode, alignment):
    """2 + 2 + 1 accumulated samples take the same step as one batch of 5, with and without gradient alignment."""
    kw = dict(mode=mode, beta=0.5, alpha=3.0, gradient_alignment=alignment, dataset=_conflicting_teacher(5))
    full = _one_step_params(tmp_path, 5, 5, 1, **kw)
    split = _one_step_params(tmp_path, 5, 2, 3, **kw)
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-6)


def test_alignment_projects_the_accumulated_gradient_not_each_micro_batch(tmp_path):
    """The check above could pass if no projection happened: the aligned step must differ from the plain one."""
    kw = dict(mode="naive", alpha=3.0, dataset=_conflicting_teacher(5))
    plain = _one_step_params(tmp_path, 5, 2, 3, **kw)
    aligned = _one_step_params(tmp_path, 5, 2, 3, gradient_alignment=True, **kw)
    assert not torch.allclose(plain, aligned)


@pytest.mark.parametrize("as_hf_dataset", [False, True])
def test_cached_teacher_logits_equal_the_live_teacher(tmp_path, as_hf_dataset):
    from hf_collapse import precompute_teacher_logits

    def cached(teacher):
        data = TextData(8)
        if as_hf_dataset:
            import datasets

            data = datasets.Dataset.from_dict({"input_ids": data.ids.tolist(), "labels": data.y.tolist()})
        return precompute_teacher_logits(teacher, data, batch_size=3, dtype=torch.float32)

    kw = dict(mode="dhkd", beta=0.5)
    live = _one_step_params(tmp_path, 8, 4, 2, **kw)
    offline = _one_step_params(tmp_path, 8, 4, 2, dataset=cached, teacher=False, **kw)
    torch.testing.assert_close(offline, live, rtol=1e-5, atol=1e-6)


def test_cached_teacher_logits_with_a_padding_collator(tmp_path):
    """Variable-length text through DataCollatorWithPadding (the Trainer's default with a tokenizer): the cached
    columns bypass the padding, and the step equals the live teacher's."""
    from transformers import BertTokenizerFast, DataCollatorWithPadding

    from hf_collapse import precompute_teacher_logits

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(40)]]))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (int(n),), generator=g))
             for n in torch.randint(1, 9, (8,), generator=g)]  # fmt: skip
    items = [{"input_ids": tok(t)["input_ids"], "labels": i % NUM_LABELS} for i, t in enumerate(texts)]
    assert len({len(it["input_ids"]) for it in items}) > 1  # the padding is exercised
    collator = DataCollatorWithPadding(tok)

    def step(cached: bool):
        torch.manual_seed(0)
        t = BertForSequenceClassification(bert_cfg(num_labels=NUM_LABELS)).eval()
        student = DualHeadForSequenceClassification(
            DualHeadConfig(backbone_config=bert_cfg(), num_labels=NUM_LABELS, aux_head="linear")
        )
        data = precompute_teacher_logits(t, items, batch_size=3, dtype=torch.float32, data_collator=collator) \
            if cached else items  # fmt: skip
        args = make_args(tmp_path, mode="dhkd", beta=0.5, per_device_train_batch_size=4, max_steps=1, optim="sgd",
                         learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
        DualHeadDistillationTrainer(model=student, teacher_model=None if cached else t, args=args, train_dataset=data,
                                    data_collator=collator).train()  # fmt: skip
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    torch.testing.assert_close(step(cached=True), step(cached=False), rtol=1e-5, atol=1e-6)


def test_cached_logits_storage_and_top_k(tmp_path):
    import datasets

    from hf_collapse import precompute_teacher_logits
    from hf_collapse.trainers.teacher_logits import teacher_logits_from_batch

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(bert_cfg(num_labels=NUM_LABELS)).eval()
    data = TextData(6)
    with torch.no_grad():
        reference = teacher(input_ids=data.ids).logits
    hf = datasets.Dataset.from_dict({"input_ids": data.ids.tolist(), "labels": data.y.tolist()})
    half = precompute_teacher_logits(teacher, hf, batch_size=4)
    assert half.features["teacher_logits"].feature.dtype == "float16"
    torch.testing.assert_close(torch.tensor(half["teacher_logits"]), reference, rtol=1e-3, atol=1e-3)
    top = precompute_teacher_logits(teacher, data, top_k=2, dtype=torch.float32)
    batch = torch.utils.data.default_collate([top[i] for i in range(len(top))])
    dense = teacher_logits_from_batch(batch, NUM_LABELS)
    kept = reference.topk(2, dim=-1)
    torch.testing.assert_close(dense.gather(-1, kept.indices), kept.values)  # the kept classes are exact
    dropped = torch.ones_like(dense, dtype=torch.bool).scatter_(-1, kept.indices, False)
    smallest = kept.values[:, -1:].expand_as(dense)
    torch.testing.assert_close(dense[dropped], smallest[dropped])  # the others get the smallest kept value
    assert (reference[dropped] <= smallest[dropped]).all()  # an upper bound of the dropped logits
    full = teacher_logits_from_batch(torch.utils.data.default_collate(
        [precompute_teacher_logits(teacher, data, top_k=NUM_LABELS, dtype=torch.float32)[i] for i in range(6)]),
        NUM_LABELS)  # fmt: skip
    torch.testing.assert_close(full, reference)  # top_k = num_labels is exact
    with pytest.raises(ValueError, match="top_k"):
        precompute_teacher_logits(teacher, data, top_k=NUM_LABELS + 1)


def test_no_teacher_and_no_cached_logits_says_how_to_fix(tmp_path):
    _, student = image_pair()
    with pytest.raises(ValueError, match="precompute_teacher_logits"):
        DualHeadDistillationTrainer(model=student, args=make_args(tmp_path, mode="kd"), train_dataset=ImageData())


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay", "max_grad_norm"])
def test_inherited_training_numbers_must_be_finite(tmp_path, field):
    with pytest.raises(ValueError, match=rf"DualHeadDistillationConfig\.{field} must be a finite number, got nan"):
        make_args(tmp_path, **{field: float("nan")})


def test_distill_student_options_are_checked(capsys):
    from hf_collapse.cli import main

    assert main(["distill", "--output_dir", "x", "--mode", "ce", "--student_depths", "1,1"]) == 2
    assert "one entry per stage" in capsys.readouterr().err
    assert main(["distill", "--output_dir", "x", "--mode", "ce", "--train_limit", "0"]) == 2
    assert "--train_limit must be an integer >= 1" in capsys.readouterr().err
