"""Decisions about a round in progress: wait, aggregate, retry or give up."""

from __future__ import annotations

from enum import StrEnum

from federated_learning.protocol.messages import TaskKind, UpdateSubmitted


class RoundDecision(StrEnum):
    WAIT = "wait"
    AGGREGATE = "aggregate"
    RETRY = "retry"
    FAIL = "fail"


def decide_round(
    *,
    accepted: int,
    responded: int,
    selected: int,
    target: int,
    min_clients: int,
    now: float,
    deadline_at: float,
    attempt: int,
    max_attempts: int,
) -> RoundDecision:
    """What to do with a collecting round.

    Aggregate once ``target`` updates are accepted, or once every selected agent has
    answered with at least ``min_clients`` accepted, or at the deadline with at least
    ``min_clients``. Short of that at the deadline: retry with a new selection while
    attempts remain, else fail.
    """
    if accepted >= target:
        return RoundDecision.AGGREGATE
    everyone_answered = responded >= selected
    if (everyone_answered or now >= deadline_at) and accepted >= min_clients:
        return RoundDecision.AGGREGATE
    if now >= deadline_at or everyone_answered:
        return RoundDecision.RETRY if attempt < max_attempts else RoundDecision.FAIL
    return RoundDecision.WAIT


def weighted_mean(values: list[tuple[float, int]]) -> float | None:
    """Example-weighted mean of ``(value, weight)`` pairs; None when there are none."""
    total = sum(weight for _, weight in values)
    if total <= 0:
        return None
    return sum(value * weight for value, weight in values) / total


def summarize_notices(
    notices: list[UpdateSubmitted],
) -> dict[str, float | int | None]:
    """Example-weighted training and evaluation figures of one round's accepted notices."""
    train = [n for n in notices if n.kind is TaskKind.TRAIN]
    evaluations = [n.evaluation for n in notices if n.evaluation is not None]
    return {
        "participants": len(notices),
        "num_examples": sum(n.num_examples for n in train),
        "train_loss": weighted_mean(
            [(n.train_loss, n.num_examples) for n in train if n.train_loss is not None]),
        "train_accuracy": weighted_mean(
            [(n.train_accuracy, n.num_examples) for n in train if n.train_accuracy is not None]),
        "eval_loss": weighted_mean([(e.loss, e.num_examples) for e in evaluations]),
        "eval_accuracy": weighted_mean([(e.accuracy, e.num_examples) for e in evaluations]),
        "eval_examples": sum(e.num_examples for e in evaluations),
        "upload_bytes": sum(n.upload_bytes for n in train),
        "dense_bytes": sum(n.dense_bytes for n in train),
    }
