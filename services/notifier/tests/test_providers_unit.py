"""Provider plumbing without a network: rate limit, breaker, backoff bounds, SMS parts, tokens."""

from __future__ import annotations

import time

import pytest

from notifier.errors import BadToken
from notifier.providers import Breaker, RateLimiter, RetryPolicy, sms_segments
from notifier.tokens import TokenSigner


async def test_rate_limit_spreads_sends_beyond_the_burst():
    limiter = RateLimiter(20)
    started = time.monotonic()
    for _ in range(30):  # 20 in the burst, 10 more at 20/s
        await limiter.acquire()
    assert 0.4 <= time.monotonic() - started < 2.0


def test_breaker_opens_after_repeated_transient_failures_and_probes_after_cooldown():
    breaker = Breaker(threshold=3, cooldown_s=0.05)
    for _ in range(2):
        breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow() and breaker.state == "open"
    time.sleep(0.06)
    assert breaker.allow() and breaker.state == "half_open"
    breaker.success()
    assert breaker.state == "closed"


def test_backoff_is_exponential_with_full_jitter_and_capped():
    retry = RetryPolicy(retries=5, base_s=0.1, max_s=1.0)
    for attempt in range(8):
        delays = [retry.delay(attempt) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= min(1.0, 0.1 * 2**attempt)
    assert len({round(retry.delay(3), 6) for _ in range(20)}) > 1


def test_sms_cost_counts_parts_gsm_and_unicode():
    assert sms_segments("x" * 160) == 1
    assert sms_segments("x" * 161) == 2
    assert sms_segments("ü" * 70) == 1
    assert sms_segments("ü" * 71) == 2


def test_tokens_are_bound_to_their_purpose_and_secret():
    signer = TokenSigner("k1")
    token = signer.sign("open", {"m": "m1"})
    assert signer.verify("open", token) == {"m": "m1"}
    for purpose, verifier in (("click", signer), ("open", TokenSigner("k2"))):
        with pytest.raises(BadToken):
            verifier.verify(purpose, token)
