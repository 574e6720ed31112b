"""Contacts and consents from `customer_updated` events; unsubscribes from links."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from crm_common.contract.events import CustomerUpdatedProps
from notifier.models import Contact
from notifier.repository import NotifierRepository

PLAIN_FIELDS = (
    "email",
    "phone",
    "first_name",
    "last_name",
    "timezone",
    "locale",
    "preferred_channel",
)
CHANNELS = ("email", "sms", "push")


def set_consent(contact: Contact, channel: str, value: bool | None, at: datetime) -> bool:
    """Change one consent unless a newer change is already recorded; return whether it applied."""
    current_at = getattr(contact, f"consent_{channel}_at")
    if current_at is not None and at < current_at:
        return False
    setattr(contact, f"consent_{channel}", value)
    setattr(contact, f"consent_{channel}_at", at)
    return True


def apply_properties(contact: Contact, props: CustomerUpdatedProps, at: datetime) -> None:
    """Apply the fields an event carries: absent ones stay, null clears."""
    given = props.model_fields_set
    for name in PLAIN_FIELDS:
        if name in given:
            setattr(contact, name, getattr(props, name))
    if "push_tokens" in given:
        contact.push_tokens = list(dict.fromkeys(props.push_tokens or []))
    if "consents" in given:
        if props.consents is None:
            for channel in CHANNELS:
                set_consent(contact, channel, None, at)
        else:
            for channel in props.consents.model_fields_set:
                set_consent(contact, channel, getattr(props.consents, channel), at)
    contact.updated_at = max(contact.updated_at, at) if contact.updated_at else at


async def apply_customer_updates(
    *, repo: NotifierRepository, updates: list[tuple[str, CustomerUpdatedProps, datetime]]
) -> int:
    """Upsert the contacts of a batch of `customer_updated` events, in order."""
    if not updates:
        return 0
    contacts = await repo.lock_contacts([u[0] for u in updates])
    for customer_id, props, at in updates:
        contact = contacts.get(customer_id)
        if contact is None:
            contact = Contact(customer_id=customer_id, push_tokens=[], updated_at=at)
            repo.add(contact)
            contacts[customer_id] = contact
        apply_properties(contact, props, at)
    await repo.flush()
    return len(updates)


async def unsubscribe(*, repo: NotifierRepository, customer_id: str, channel: str, now: datetime) -> Contact | None:
    """Withdraw consent on one channel now; later sends on it are suppressed."""
    contact = (await repo.lock_contacts([customer_id])).get(customer_id)
    if contact is None:
        return None
    set_consent(contact, channel, False, now)
    await repo.flush()
    return contact


def contact_view(contact: Contact) -> dict[str, Any]:
    return {
        "customer_id": contact.customer_id,
        "email": contact.email,
        "phone": contact.phone,
        "push_tokens": len(contact.push_tokens or []),
        "first_name": contact.first_name,
        "last_name": contact.last_name,
        "timezone": contact.timezone,
        "locale": contact.locale,
        "preferred_channel": contact.preferred_channel,
        "consents": {
            ch: {
                "granted": getattr(contact, f"consent_{ch}"),
                "changed_at": getattr(contact, f"consent_{ch}_at"),
            }
            for ch in CHANNELS
        },
        "updated_at": contact.updated_at,
    }
