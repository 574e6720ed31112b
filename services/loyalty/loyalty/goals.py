"""Personal goals: offered on entry into a segment, tracked from purchases, awarded once, expired when unmet."""

from __future__ import annotations

from datetime import datetime, timedelta

from loyalty.ledger import CENT, Book
from loyalty.schemas import ProgrammeConfig
from loyalty.state import AccountState, GoalState


def count_purchase(book: Book, acct: AccountState, goal: GoalState, *, at: datetime) -> None:
    """Count a purchase towards an active goal; award the reward once when the target is met."""
    if goal.status != "active" or not (goal.assigned_at <= at < goal.due_at):
        return
    goal.progress += 1
    goal.dirty = True
    if goal.progress < goal.target:
        return
    goal.status = "completed"
    goal.closed_at = at
    book.credit(
        acct,
        kind="goal_bonus",
        points=goal.reward,
        ref=f"goal:{goal.id}",
        at=at,
        data={"goal_id": goal.id, "segment_key": goal.segment_key},
        event_type="goal.completed",
    )


async def assign(
    *,
    book: Book,
    programme: ProgrammeConfig,
    customer_id: str,
    segment_key: str,
    cause_id: str,
    at: datetime,
) -> GoalState | None:
    """Give the customer a goal for entering `segment_key` unless one is active; request the offer message."""
    rule = programme.goals
    if rule is None or segment_key not in rule.segment_keys:
        return None
    accounts = await book.open([customer_id], create=True, at=at)
    acct = accounts[customer_id]
    start = at
    goal = GoalState(
        id=f"{customer_id}:{cause_id}",
        customer_id=customer_id,
        segment_key=segment_key,
        target=rule.purchases,
        progress=0,
        reward=rule.reward,
        status="active",
        assigned_at=start,
        due_at=start + timedelta(days=rule.days),
        closed_at=None,
    )
    if not await book.repo.insert_goal(goal):  # one active goal at a time (or this cause was applied already)
        return None
    book.event(
        acct.customer_id,
        "goal.assigned",
        ref=f"goal:{goal.id}",
        at=start,
        points=goal.reward,
        data={
            "goal_id": goal.id,
            "purchases": goal.target,
            "days": rule.days,
            "due_at": goal.due_at.isoformat(),
        },
    )
    book.message(
        acct.customer_id,
        msg_id=f"loyalty:goal_offer:{goal.id}",
        template=rule.template,
        kind="marketing",
        expires_at=goal.due_at,
        variables={
            "purchases": goal.target,
            "days": rule.days,
            "reward_points": str(goal.reward.quantize(CENT)),
            "reward_value": str((goal.reward * programme.point_value).quantize(CENT)),
            "due_date": goal.due_at.date().isoformat(),
        },
    )
    return goal
