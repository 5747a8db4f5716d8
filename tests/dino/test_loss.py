import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from support.dist_workers import center_worker
from surgenet_ssl.dino.loss import DINOLoss

LN3 = math.log(3.0)


def test_loss_of_known_logits_hand_computed():
    """2 global + 1 local crop, batch 1, 2 prototypes, center 0, teacher temp 0.04, student temp 0.1."""
    loss_fn = DINOLoss(out_dim=2, student_temp=0.1)
    teacher = torch.tensor([[0.0, 0.0], [0.04 * LN3, 0.0]])  # -> p = [.5, .5], [.75, .25]
    student = torch.tensor([[0.0, 0.0], [0.1 * LN3, 0.0], [0.0, 0.1 * LN3]])  # -> q = [.5,.5], [.75,.25], [.25,.75]
    loss = loss_fn(student, teacher, teacher_temp=0.04)
    h = lambda p, q: -sum(a * math.log(b) for a, b in zip(p, q, strict=True))  # noqa: E731
    pairs = [
        h([0.5, 0.5], [0.75, 0.25]),  # teacher 1, student 2
        h([0.5, 0.5], [0.25, 0.75]),  # teacher 1, student 3
        h([0.75, 0.25], [0.5, 0.5]),  # teacher 2, student 1
        h([0.75, 0.25], [0.25, 0.75]),  # teacher 2, student 3
    ]
    assert loss.item() == pytest.approx(sum(pairs) / 4, rel=1e-5)


def test_identical_views_are_skipped_and_pairs_averaged():
    """If the student matches the teacher on the same view only, the loss must not see those pairs."""
    k, b = 4, 3
    loss_fn = DINOLoss(out_dim=k)
    teacher = torch.randn(2 * b, k)
    # 2 global + 8 local crops of uniform student outputs: every pair costs exactly ln(k), for 18 pairs.
    student = torch.zeros(10 * b, k)
    assert loss_fn(student, teacher, 0.04).item() == pytest.approx(math.log(k), rel=1e-6)


def test_center_after_one_and_two_updates():
    loss_fn = DINOLoss(out_dim=3, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss_fn(torch.zeros(2, 3), t1, 0.04)  # 2 global crops, batch 1
    loss_fn.update_center()
    assert loss_fn.center.tolist() == [pytest.approx([0.2, 0.2, 0.2])]  # 0.1 * mean
    t2 = torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 10.0]])
    loss_fn(torch.zeros(2, 3), t2, 0.04)
    loss_fn.update_center()
    assert loss_fn.center.tolist() == [pytest.approx([0.18, 0.18, 0.18 + 1.0])]


def test_center_accumulates_over_micro_batches_until_update():
    loss_fn = DINOLoss(out_dim=2)
    loss_fn(torch.zeros(2, 2), torch.tensor([[2.0, 0.0], [2.0, 0.0]]), 0.04)
    loss_fn(torch.zeros(2, 2), torch.tensor([[0.0, 4.0], [0.0, 4.0]]), 0.04)
    assert loss_fn.center.abs().sum() == 0  # nothing moves before the optimizer step
    loss_fn.update_center()
    assert loss_fn.center.tolist() == [pytest.approx([0.1, 0.2])]


def test_centering_is_applied_to_the_teacher():
    loss_fn = DINOLoss(out_dim=2)
    loss_fn.center.copy_(torch.tensor([[5.0, 0.0]]))
    teacher = torch.tensor([[5.0, 0.0], [5.0, 0.0]])  # minus the center: uniform
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    assert loss_fn(student, teacher, 0.04).item() == pytest.approx(math.log(2))


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="global crops"):
        DINOLoss(out_dim=2)(torch.zeros(5, 2), torch.zeros(3, 2), 0.04)


def test_center_is_all_reduced_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=center_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[0] == results[1] == [pytest.approx([0.5, 0.5])]  # 0.1 * global mean 5
