"""Referrals: a code per customer; both sides rewarded on the referred customer's first purchase, once."""

from __future__ import annotations

import logging
from datetime import datetime

from loyalty.ledger import Book
from loyalty.state import AccountState

log = logging.getLogger(__name__)


async def link(book: Book, acct: AccountState, code: str, *, at: datetime) -> str:
    """Record who referred a new customer; refuse self-referral, cycles, late or repeated links. Returns the outcome."""
    if acct.referred_by is not None:
        outcome = "already_referred"
    elif acct.purchases_count > 0:
        outcome = "not_a_new_customer"
    else:
        referrer = await book.repo.customer_by_code(code)
        if referrer is None:
            outcome = "unknown_code"
        elif referrer == acct.customer_id:
            outcome = "self_referral"
        elif acct.customer_id in await book.repo.referral_ancestors(referrer):
            outcome = "cycle"
        else:
            acct.referred_by = referrer
            acct.dirty = True
            return "linked"
    log.info("referral of %s with code %r refused: %s", acct.customer_id, code, outcome)
    return outcome


async def reward_first_purchase(book: Book, acct: AccountState, *, at: datetime) -> None:
    """On a referred customer's first purchase, credit both sides their bonus (refs make it once)."""
    if acct.referred_by is None or acct.referral_rewarded:
        return
    acct.referral_rewarded = True
    acct.dirty = True
    programme = book.programme
    referrer = (await book.open([acct.referred_by], create=False)).get(acct.referred_by)
    data = {"referrer": acct.referred_by, "referred": acct.customer_id}
    if programme.referral_bonus_referred > 0:
        book.credit(
            acct,
            kind="referral_bonus",
            points=programme.referral_bonus_referred,
            ref=f"referral:{acct.customer_id}:referred",
            at=at,
            data=data,
            event_type="referral.rewarded",
        )
    if referrer is not None and programme.referral_bonus_referrer > 0:
        book.credit(
            referrer,
            kind="referral_bonus",
            points=programme.referral_bonus_referrer,
            ref=f"referral:{acct.customer_id}:referrer",
            at=at,
            data=data,
            event_type="referral.rewarded",
        )
