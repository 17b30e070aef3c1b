"""Mixture-of-Students (DeepSpeed-MoE §4): distil a PR-MoE teacher into a shallower student.

Loss = CE(student, labels) + α · T² · KL(p_teacher ‖ p_student), with p = softmax(logits / T)
(Hinton et al.: the T² keeps the soft-label gradients on the CE scale as T grows). The paper
finds that KD helps early and hurts late, when the student's capacity no longer lets it follow
the teacher, so KD is "staged": the trainer drops the term from step `kd_stop_step` on.

Student initialisation: the student (fewer layers, same widths) starts from teacher layers.
`align_layers` picks, for each student layer, a teacher layer with identical tensor shapes,
keeping the order, matching as many layers as possible and, among those alignments, the one
whose layers sit at the most similar relative depth (so first and last layers map to first and
last, and the layers dropped come from the middle). PR-MoE pyramids stay aligned: a student
layer with 64 experts only takes a teacher layer with 64 experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(softmax(t/T) ‖ softmax(s/T)), in fp32; [..., V] inputs."""
    s = student_logits.float().flatten(0, -2) / temperature
    t = teacher_logits.float().flatten(0, -2) / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                    reduction="batchmean")


def _layer_signatures(model: torch.nn.Module) -> list[tuple]:
    sigs = []
    for block in model.blocks:
        sigs.append(tuple((k, tuple(v.shape)) for k, v in block.state_dict().items()))
    return sigs


def align_layers(student: torch.nn.Module, teacher: torch.nn.Module) -> list[int | None]:
    """For each student layer, the teacher layer it starts from (None: no same-shaped layer)."""
    s_sig, t_sig = _layer_signatures(student), _layer_signatures(teacher)
    ns, nt = len(s_sig), len(t_sig)

    def depth_gap(j: int, i: int) -> float:
        return abs(j / max(ns - 1, 1) - i / max(nt - 1, 1))

    # best[j][i]: (matches, -distortion) aligning student[:j] with teacher[:i]
    best = [[(0, 0.0)] * (nt + 1) for _ in range(ns + 1)]
    for j in range(1, ns + 1):
        for i in range(1, nt + 1):
            cand = max(best[j - 1][i], best[j][i - 1])
            if s_sig[j - 1] == t_sig[i - 1]:
                m, d = best[j - 1][i - 1]
                cand = max(cand, (m + 1, d - depth_gap(j - 1, i - 1)))
            best[j][i] = cand
    mapping: list[int | None] = [None] * ns
    j, i = ns, nt
    while j > 0 and i > 0:
        if s_sig[j - 1] == t_sig[i - 1]:
            m, d = best[j - 1][i - 1]
            if best[j][i] == (m + 1, d - depth_gap(j - 1, i - 1)):
                mapping[j - 1] = i - 1
                j, i = j - 1, i - 1
                continue
        if best[j][i] == best[j][i - 1]:
            i -= 1
        else:
            j -= 1
    return mapping


@torch.no_grad()
def init_student_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module
                              ) -> list[int | None]:
    """Copy embeddings, final norm, head and aligned layers from the teacher; returns the
    layer mapping. Raises ValueError when widths differ (nothing is copied then)."""
    if student.config.d_model != teacher.config.d_model:
        raise ValueError(f"student_init='teacher' needs equal widths: student d_model "
                         f"{student.config.d_model}, teacher {teacher.config.d_model}")
    mapping = align_layers(student, teacher)
    t_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if name.startswith("blocks."):
            _, idx, rest = name.split(".", 2)
            src = mapping[int(idx)]
            if src is None:
                continue
            source = t_state[f"blocks.{src}.{rest}"]
        elif name in t_state and t_state[name].shape == tensor.shape:
            source = t_state[name]
        else:
            continue
        tensor.copy_(source)
    return mapping
