"""Training-step time of DHKD against KD (same student, same teacher, batch 64), the cost of gradient alignment, and
one distillation epoch with cached teacher logits against the same epoch with a live teacher.

    python benchmarks/dual_head_kd.py [--threads 2] [--repeats 7] [--epoch_images 2048]

Prints `dhkd / kd: ratio = X (ours Y s, baseline Z s)`, `dhkd+ga / kd: ...` and `cached-logits epoch / live-teacher
epoch: ...` (both through `Trainer.train()`, DHKD mode; the one-off `precompute_teacher_logits` pass is printed
apart); appends JSON lines to benchmarks/results/dual_head_kd.jsonl. Inputs are random 28×28 images (shape of
Fashion-MNIST); the student and teacher are the ResNets of examples/dual_head_kd.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import interleaved_median, report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument("--epoch_images", type=int, default=2048, help="images in the timed distillation epoch")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_collapse import DualHeadDistillationConfig, DualHeadDistillationTrainer
    from hf_collapse.scripts.distill import DistillScriptArguments, build_student

    teacher = ResNetForImageClassification(
        ResNetConfig(num_channels=1, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2],
                     layer_type="basic", num_labels=10)  # fmt: skip
    )
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(64, 1, 28, 28, generator=g), "labels": torch.randint(0, 10, (64,), generator=g)}
    tmp = tempfile.mkdtemp()

    def make_step(mode: str, ga: bool = False):
        torch.manual_seed(0)
        student = build_student(DistillScriptArguments())
        args = DualHeadDistillationConfig(output_dir=tmp, mode=mode, gradient_alignment=ga, report_to="none",
                                          use_cpu=True, optim="sgd", learning_rate=0.01, max_steps=10)  # fmt: skip
        trainer = DualHeadDistillationTrainer(model=student, teacher_model=teacher, args=args)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # normally set inside train()
        student.train()

        def step():
            for _ in range(a.steps):
                trainer.training_step(student, dict(batch))
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()

        return step

    kd, dhkd, dhkd_ga = make_step("kd"), make_step("dhkd"), make_step("dhkd", ga=True)
    ours, base = interleaved_median(dhkd, kd, repeats=a.repeats)
    report("dual_head_kd", "dhkd / kd training step", ours / a.steps, base / a.steps, a.repeats, a.threads, batch=64)
    ours, base = interleaved_median(dhkd_ga, kd, repeats=a.repeats)
    report("dual_head_kd", "dhkd+ga / kd training step", ours / a.steps, base / a.steps, a.repeats, a.threads, batch=64)

    # one epoch through Trainer.train(): cached teacher logits against the live teacher
    import time

    from hf_collapse import precompute_teacher_logits
    from hf_collapse.trainers.teacher_logits import TeacherLogitsDataset

    n = a.epoch_images
    images = {"pixel_values": torch.randn(n, 1, 28, 28, generator=g), "labels": torch.randint(0, 10, (n,), generator=g)}
    data = TeacherLogitsDataset([{k: v[i] for k, v in images.items()} for i in range(n)], {})
    t0 = time.perf_counter()
    cached = precompute_teacher_logits(teacher, data, batch_size=256, dtype=torch.float16)
    precompute_s = time.perf_counter() - t0
    print(f"precompute_teacher_logits over {n} images: {precompute_s:.2f} s (once)")

    from transformers import TrainerCallback

    class EpochTimer(TrainerCallback):
        """Wall time from `on_epoch_begin` to `on_epoch_end`: the epoch itself, without `train()`'s one-off setup and
        teardown (accelerate's `free_memory` runs a `gc.collect()` of ~0.4 s at the end of every `train()`)."""

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.t0

    def epoch(dataset, with_teacher: bool, mode: str = "dhkd") -> tuple[float, float]:
        """Seconds of one epoch, and of the whole `Trainer.train()` call (trainer construction excluded)."""
        torch.manual_seed(0)
        student = build_student(DistillScriptArguments())
        args = DualHeadDistillationConfig(output_dir=tmp, mode=mode, report_to="none", use_cpu=True,
                                          per_device_train_batch_size=64, num_train_epochs=1, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
        timer = EpochTimer()
        trainer = DualHeadDistillationTrainer(model=student, teacher_model=teacher if with_teacher else None,
                                              args=args, train_dataset=dataset, callbacks=[timer])  # fmt: skip
        t0 = time.perf_counter()
        trainer.train()
        return timer.seconds, time.perf_counter() - t0

    import statistics

    repeats = max(3, a.repeats // 2)
    epoch(cached, False), epoch(data, True)  # warm-up
    cached_runs, live_runs, floor_runs = [], [], []
    for _ in range(repeats):  # interleaved, as _common.interleaved_median
        cached_runs.append(epoch(cached, False))
        live_runs.append(epoch(data, True))
        floor_runs.append(epoch(data, False, mode="ce"))  # no teacher at all: the least any distillation epoch costs
    report("dual_head_kd", "cached-logits epoch / live-teacher epoch", statistics.median(r[0] for r in cached_runs),
           statistics.median(r[0] for r in live_runs), repeats, a.threads, images=n, batch=64,
           precompute_s=precompute_s)  # fmt: skip
    # the cached path's own overhead: whatever it costs above plain CE training of the same student. The cached/live
    # ratio itself is bounded below by floor/live, a property of the teacher/student sizes, not of the implementation
    report("dual_head_kd", "cached-logits epoch / no-teacher ce epoch", statistics.median(r[0] for r in cached_runs),
           statistics.median(r[0] for r in floor_runs), repeats, a.threads, images=n, batch=64,
           floor_over_live=statistics.median(r[0] for r in floor_runs) / statistics.median(r[0] for r in live_runs))
    report("dual_head_kd", "cached-logits train() / live-teacher train()", statistics.median(r[1] for r in cached_runs),
           statistics.median(r[1] for r in live_runs), repeats, a.threads, images=n, batch=64)  # fmt: skip


if __name__ == "__main__":
    main()
