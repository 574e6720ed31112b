"""The ledger: accounts locked for one transaction, changed in memory, written back in bulk.

Invariants kept here (and by CHECK constraints in the database):
* every change of a balance is one immutable ledger entry, so the balance equals the ledger sum;
* points live in lots; spending and expiry take the oldest lot first; the balance equals the sum
  of the lots' remaining points and is never negative;
* an account is changed only while its row is locked (`SELECT ... FOR UPDATE`, in id order), so
  concurrent requests on one account are serialised and cannot overspend;
* every entry has a `ref` derived from its cause (unique), so a retried cause cannot apply twice;
* a reversal takes what is spendable and books the rest as the account's points debt (`debt_change` of the
  entry), so the debt equals the ledger's sum of `debt_change` and is never negative; every credit while in debt
  is followed by a `debt_settlement` entry that takes the debt (or as much of it as the credit covers) from the
  lots just credited. So while the debt is above zero nothing is spendable, and oldest-first
  spending and expiry of the lots are untouched.
"""

from __future__ import annotations

import logging
import secrets
from base64 import b32encode
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from crm_common.contract.messages import LoyaltyEvent, LoyaltyEventType, MessageKind, MessageRequested
from loyalty.errors import InsufficientPoints
from loyalty.repository import LoyaltyRepository
from loyalty.schemas import ProgrammeConfig
from loyalty.settings import TOPIC_LOYALTY, TOPIC_MESSAGES
from loyalty.state import AccountState, Allocation, Entry, LotState, RedemptionState

log = logging.getLogger(__name__)

CENT = Decimal("0.01")
ZERO = Decimal(0)
CREDIT_KINDS = ("accrual", "goal_bonus", "referral_bonus", "welcome_bonus", "birthday_bonus", "offer_bonus")


def floor_points(value: Decimal) -> Decimal:
    """Points are kept to two decimals and rounded down when earned (never over-credit)."""
    return value.quantize(CENT, rounding=ROUND_DOWN)


def round_points(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def new_referral_code() -> str:
    """A random, unguessable referral code (10 base32 characters)."""
    return b32encode(secrets.token_bytes(10)).decode()[:10]


@dataclass
class Book:
    """The accounts one transaction works on: locked on open, changed in memory, written by `flush`."""

    session: AsyncSession
    programme: ProgrammeConfig
    now: datetime
    publish_accruals: bool = True
    accounts: dict[str, AccountState] = field(default_factory=dict)
    new_lots: dict[str, LotState] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    events: list[LoyaltyEvent] = field(default_factory=list)
    requests: list[MessageRequested] = field(default_factory=list)
    allocations: dict[str, list[Allocation]] = field(default_factory=dict)
    redemptions: dict[str, RedemptionState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.repo = LoyaltyRepository(self.session)

    # -- accounts and lots -----------------------------------------------------------------------

    async def open(
        self, customer_ids: list[str], *, create: bool, at: datetime | dict[str, datetime] | None = None
    ) -> dict[str, AccountState]:
        """Lock and load accounts (creating missing ones when `create`); a new account gets the welcome bonus."""
        wanted = list(dict.fromkeys(customer_ids))
        ids = sorted(set(wanted) - self.accounts.keys())
        created: set[str] = set()
        if ids:
            for acct in await self.repo.lock_accounts(ids):
                self.accounts[acct.customer_id] = acct
            missing = [cid for cid in ids if cid not in self.accounts]
            if missing and create:
                codes = [new_referral_code() for _ in missing]
                created = await self.repo.insert_accounts(missing, codes, self.now)
                # Lock again: an account created concurrently by another transaction is not ours yet.
                for acct in await self.repo.lock_accounts(missing):
                    self.accounts[acct.customer_id] = acct
        bonus = self.programme.welcome_bonus
        for cid in sorted(created):
            if bonus > 0:
                self.credit(
                    self.accounts[cid],
                    kind="welcome_bonus",
                    points=bonus,
                    ref=f"welcome:{cid}",
                    at=(at.get(cid) if isinstance(at, dict) else at) or self.now,
                )
        return {cid: self.accounts[cid] for cid in wanted if cid in self.accounts}

    async def lots(self, acct: AccountState) -> dict[str, LotState]:
        """The account's open lots (loaded once per transaction), with the ones created in it."""
        if acct.lots is None:
            acct.lots = {lot.id: lot for lot in await self.repo.open_lots(acct.customer_id)}
            for lot in self.new_lots.values():
                if lot.customer_id == acct.customer_id:
                    acct.lots[lot.id] = lot
        return acct.lots

    async def spendable(self, acct: AccountState) -> Decimal:
        """Points that can be spent now: lots not yet past their expiry."""
        return sum(
            (lot.remaining for lot in (await self.lots(acct)).values() if lot.expires_at > self.now),
            ZERO,
        )

    # -- movements -------------------------------------------------------------------------------

    def _entry(
        self,
        acct: AccountState,
        *,
        kind: str,
        points: Decimal,
        ref: str,
        at: datetime,
        debt_change: Decimal = ZERO,
        lot_id: str | None = None,
        order_id: str | None = None,
        redemption_id: str | None = None,
        data: dict[str, Any] | None = None,
        event_type: LoyaltyEventType | None = None,
    ) -> None:
        acct.balance += points
        acct.points_debt += debt_change
        if acct.balance < 0 or acct.points_debt < 0:  # a bug, not a business case: the callers check first
            raise AssertionError(f"balance or debt of {acct.customer_id} would become negative")
        acct.dirty = True
        data = data or {}
        self.entries.append(
            Entry(
                ref=ref,
                customer_id=acct.customer_id,
                kind=kind,
                points=points,
                balance_after=acct.balance,
                debt_change=debt_change,
                occurred_at=at,
                recorded_at=self.now,
                lot_id=lot_id,
                order_id=order_id,
                redemption_id=redemption_id,
                data=data,
            )
        )
        if event_type:
            self.event(
                acct.customer_id,
                event_type,
                ref=ref,
                at=at,
                points=points,
                balance=acct.balance,
                data=data,
            )

    def event(
        self,
        customer_id: str,
        event_type: LoyaltyEventType,
        *,
        ref: str,
        at: datetime,
        points: Decimal | None = None,
        balance: Decimal | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Queue a `crm.loyalty.v1` event; its id derives from the cause, so a retry never doubles it."""
        self.events.append(
            LoyaltyEvent(
                id=f"loyalty:{event_type}:{ref}",
                type=event_type,
                customer_id=customer_id,
                occurred_at=at,
                points=points,
                balance=balance,
                data=data or {},
            )
        )

    def message(
        self,
        customer_id: str,
        *,
        msg_id: str,
        template: str,
        variables: dict[str, Any],
        kind: MessageKind = "transactional",
        expires_at: datetime | None = None,
    ) -> None:
        """Queue a MessageRequested command on `crm.messages.v1`."""
        self.requests.append(
            MessageRequested(
                id=msg_id,
                customer_id=customer_id,
                occurred_at=self.now,
                kind=kind,
                template=template,
                variables=variables,
                source_service="loyalty",
                expires_at=expires_at,
            )
        )

    def credit(
        self,
        acct: AccountState,
        *,
        kind: str,
        points: Decimal,
        ref: str,
        at: datetime,
        order_id: str | None = None,
        data: dict[str, Any] | None = None,
        event_type: LoyaltyEventType | None = None,
    ) -> None:
        """Add points in a new lot that expires `expiry_days` after `at`."""
        lot = LotState(
            id=ref,
            customer_id=acct.customer_id,
            kind=kind,
            earned_at=at,
            expires_at=at + timedelta(days=self.programme.expiry_days),
            points=points,
            remaining=points,
            is_new=True,
        )
        self.new_lots[ref] = lot
        if acct.lots is not None:
            acct.lots[ref] = lot
        data = {**(data or {}), "expires_at": lot.expires_at.isoformat()}
        self._entry(
            acct,
            kind=kind,
            points=points,
            ref=ref,
            at=at,
            lot_id=ref,
            order_id=order_id,
            data=data,
            event_type=event_type,
        )
        if acct.points_debt > 0:
            self.settle_debt(acct, [(lot, points)], cause=ref, at=at, order_id=order_id)

    async def debit(
        self,
        acct: AccountState,
        *,
        kind: str,
        points: Decimal,
        ref: str,
        at: datetime,
        prefer_lot: str | None = None,
        owe_shortfall: bool = False,
        order_id: str | None = None,
        redemption_id: str | None = None,
        data: dict[str, Any] | None = None,
        event_type: LoyaltyEventType | None = None,
    ) -> tuple[Decimal, list[tuple[str, Decimal]]]:
        """Take points from the oldest spendable lots first; return (points taken, [(lot id, points)]).

        More than is spendable is refused, unless `owe_shortfall`: then all that is spendable is taken and the
        rest becomes the account's points debt, in the same entry.
        """
        lots = await self.lots(acct)
        order = sorted(
            (lot for lot in lots.values() if lot.remaining > 0 and lot.expires_at > self.now),
            key=lambda lot: (lot.expires_at, lot.earned_at, lot.id),
        )
        if prefer_lot is not None:
            order.sort(key=lambda lot: lot.id != prefer_lot)
        available = sum((lot.remaining for lot in order), ZERO)
        shortfall = ZERO
        if points > available:
            if not owe_shortfall:
                raise InsufficientPoints(
                    f"{points} points asked, {available} available",
                    details={"requested": str(points), "available": str(available)},
                )
            shortfall = points - available
            points = available
        if points <= 0 and shortfall <= 0:
            return ZERO, []
        taken: list[tuple[str, Decimal]] = []
        left = points
        for lot in order:
            if left <= 0:
                break
            take = min(lot.remaining, left)
            lot.remaining -= take
            lot.dirty = True
            left -= take
            taken.append((lot.id, take))
        data = {**(data or {}), "lots": {lid: str(p) for lid, p in taken}}
        if shortfall > 0:
            data |= {"shortfall": str(shortfall), "debt_after": str(acct.points_debt + shortfall)}
        self._entry(
            acct,
            kind=kind,
            points=-points if points > 0 else ZERO,
            debt_change=shortfall,
            ref=ref,
            at=at,
            order_id=order_id,
            redemption_id=redemption_id,
            data=data,
            event_type=event_type,
        )
        return points, taken

    async def restore(
        self,
        acct: AccountState,
        *,
        parts: list[tuple[str, Decimal]],
        kind: str,
        ref: str,
        at: datetime,
        order_id: str | None = None,
        redemption_id: str | None = None,
        data: dict[str, Any] | None = None,
        event_type: LoyaltyEventType | None = None,
    ) -> Decimal:
        """Give points back to the lots they were taken from (a lot past expiry loses them at the next sweep)."""
        parts = [(lid, p) for lid, p in parts if p > 0]
        total = sum((p for _, p in parts), ZERO)
        if total <= 0:
            return ZERO
        lots = await self.lots(acct)
        missing = [lid for lid, _ in parts if lid not in lots]
        if missing:
            for lot in await self.repo.lots_by_ids(missing):
                lots[lot.id] = lot
        for lid, p in parts:
            lots[lid].remaining += p
            lots[lid].dirty = True
        self._entry(
            acct,
            kind=kind,
            points=total,
            ref=ref,
            at=at,
            order_id=order_id,
            redemption_id=redemption_id,
            data={**(data or {}), "lots": {lid: str(p) for lid, p in parts}},
            event_type=event_type,
        )
        if acct.points_debt > 0:
            self.settle_debt(
                acct,
                [(lots[lid], p) for lid, p in parts],
                cause=ref,
                at=at,
                order_id=order_id,
                redemption_id=redemption_id,
            )
        return total

    def settle_debt(
        self,
        acct: AccountState,
        credited: list[tuple[LotState, Decimal]],
        *,
        cause: str,
        at: datetime,
        order_id: str | None = None,
        redemption_id: str | None = None,
    ) -> Decimal:
        """Net the points debt against points just credited to lots, before they can be spent; return the points.

        Every credited point counts, also one returned to a lot past its expiry: returned redeemed points are often
        the very points the debt stands for (the reversal could not take them because a redemption held them),
        and that they came back late does not make the debt any larger. The debt being above zero means nothing
        was spendable before this credit (every earlier credit was netted first), so taking from the credited
        lots is spending oldest first.
        """
        left = acct.points_debt
        taken: list[tuple[str, Decimal]] = []
        for lot, credited_points in sorted(credited, key=lambda c: (c[0].expires_at, c[0].earned_at, c[0].id)):
            if left <= 0:
                break
            take = min(lot.remaining, credited_points, left)
            if take <= 0:
                continue
            lot.remaining -= take
            lot.dirty = True
            left -= take
            taken.append((lot.id, take))
        settled = acct.points_debt - left
        if settled <= 0:
            return ZERO
        self._entry(
            acct,
            kind="debt_settlement",
            points=-settled,
            debt_change=-settled,
            ref=f"debt:{cause}",
            at=at,
            order_id=order_id,
            redemption_id=redemption_id,
            data={
                "reverses": "debt",
                "settles": cause,
                "lots": {lid: str(p) for lid, p in taken},
                "debt_after": str(left),
            },
            event_type="points.reversed",
        )
        return settled

    # -- redemptions -----------------------------------------------------------------------------

    async def load_redemptions(self, ids: list[str]) -> None:
        missing = [i for i in dict.fromkeys(ids) if i not in self.redemptions]
        for r in await self.repo.get_redemptions(missing):
            self.redemptions[r.redemption_id] = r

    async def allocations_of(self, redemption_id: str) -> list[Allocation]:
        if redemption_id not in self.allocations:
            self.allocations[redemption_id] = await self.repo.redemption_lots(redemption_id)
        return self.allocations[redemption_id]

    async def return_redeemed(
        self,
        acct: AccountState,
        redemption: RedemptionState,
        points: Decimal,
        *,
        ref: str,
        at: datetime,
        reason: str,
        order_id: str | None = None,
    ) -> Decimal:
        """Return up to `points` of a redemption to the lots it took them from (latest-expiring first)."""
        points = min(points, redemption.points_applied - redemption.points_returned)
        if points <= 0:
            return ZERO
        parts: list[tuple[str, Decimal]] = []
        left = points
        for alloc in await self.allocations_of(redemption.redemption_id):
            give = min(alloc.points - alloc.returned, left)
            if give <= 0:
                continue
            alloc.returned += give
            alloc.dirty = True
            left -= give
            parts.append((alloc.lot_id, give))
            if left <= 0:
                break
        returned = await self.restore(
            acct,
            parts=parts,
            kind="reversal",
            ref=ref,
            at=at,
            order_id=order_id,
            redemption_id=redemption.redemption_id,
            data={"reverses": "redemption", "reason": reason},
            event_type="points.reversed",
        )
        redemption.points_returned += returned
        redemption.dirty = True
        return returned

    # -- writing back ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every change of this transaction with one bulk statement per table, then its messages."""
        repo = self.repo
        repo.defer()
        await repo.insert_lots(list(self.new_lots.values()))
        await repo.update_lots(
            [
                lot
                for acct in self.accounts.values()
                if acct.lots
                for lot in acct.lots.values()
                if lot.dirty and not lot.is_new
            ]
        )
        await repo.insert_ledger(self.entries)
        await repo.update_accounts([a for a in self.accounts.values() if a.dirty], self.now)
        await repo.update_redemptions([r for r in self.redemptions.values() if r.dirty])
        await repo.upsert_redemption_lots([a for allocs in self.allocations.values() for a in allocs if a.dirty])
        await repo.write_deferred()
        await repo.enqueue(TOPIC_LOYALTY, self.events)
        await repo.enqueue(TOPIC_MESSAGES, self.requests)
        self.new_lots.clear()
        self.entries.clear()
        self.events.clear()
        self.requests.clear()
        for a in self.accounts.values():
            a.dirty = False
            for lot in (a.lots or {}).values():
                lot.dirty = lot.is_new = False
        for r in self.redemptions.values():
            r.dirty = False
        for allocs in self.allocations.values():
            for al in allocs:
                al.dirty = False


async def load_programme(session: AsyncSession) -> ProgrammeConfig:
    """The programme's rules (the defaults until an operator configures them)."""
    row = await LoyaltyRepository(session).get_programme()
    return ProgrammeConfig.model_validate(row.config) if row else ProgrammeConfig()
